"""Candidate captions of an image, and which of them (and which images) are kept: pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.data.drops import Drop
from pipeline.data.prepared import SYNTHETIC, WEB
from pipeline.spec.curate import SelectSpec


@dataclass(frozen=True)
class Candidates:
    """The distinct captions of one image, the web caption first, and where each came from."""

    texts: tuple[str, ...]
    origins: tuple[str, ...]

    @classmethod
    def of(cls, web: str, synthetic: list[str] | None) -> "Candidates":
        """The web caption and the synthetic ones, each distinct text once (a synthetic caption
        equal to the web caption, after whitespace and case, is the web caption)."""
        texts, origins, seen = [web], [WEB], {_normal(web)}
        for text in synthetic or ():
            text = " ".join(text.split())
            if text and _normal(text) not in seen:
                seen.add(_normal(text))
                texts.append(text)
                origins.append(SYNTHETIC)
        return cls(tuple(texts), tuple(origins))


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def choose(scores: np.ndarray, spec: SelectSpec) -> list[int]:
    """Indexes of the kept candidates, best first: the top ``keep`` among those scoring at least
    ``min_score``, the web caption (``scores[0]``, as :class:`Candidates` orders them) ranked as
    if it scored ``web_margin`` more (ties: the earlier candidate, so the web caption, first)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-(float(scores[i]) + (spec.web_margin if i == 0 else 0.0)), i))
    if spec.min_score is not None:
        ranked = [i for i in ranked if scores[i] >= spec.min_score]
    return ranked[: spec.keep]


def top_fraction_cut(best_scores: np.ndarray, fraction: float) -> float:
    """The score a sample's best must reach to be among the top ``fraction`` of the corpus: the
    ``ceil(fraction * N)``-th highest best score (ties at the cut are all kept)."""
    ordered = np.sort(best_scores)[::-1]
    return float(ordered[max(1, math.ceil(fraction * len(ordered))) - 1])


def decide(scores: np.ndarray, spec: SelectSpec, cut: float | None) -> tuple[list[int], Drop | None]:
    """The kept candidates of an image and, when the sample is dropped, why."""
    kept = choose(scores, spec)
    if not kept:
        return [], Drop.SCORE_TOO_LOW
    if cut is not None and scores[kept[0]] < cut:
        return kept, Drop.SCORE_NOT_IN_TOP_FRACTION
    return kept, None
