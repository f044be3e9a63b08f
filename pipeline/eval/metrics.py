"""Evaluation metrics as pure functions of scores, features and strings (numpy only).

Retrieval when many images share a caption (easy-VQA: thousands of images, 24 captions): an
image's *relevant* captions are the gallery texts equal to its reference caption, and a
caption's relevant images are the images whose reference equals it. So

* image -> text: the gallery is the set of distinct captions; recall@k is the fraction of
  images whose reference caption is among the k best-scored distinct captions. recall@1 is the
  caption retrieval accuracy among all distinct captions (chance: 1 / number of captions).
* text -> image: the queries are the distinct captions, each weighted by how many samples carry
  it (the same as querying with every sample's caption); recall@k is the weighted fraction of
  queries with at least one relevant image among the k best-scored images.

Ties are broken by gallery order, so results do not depend on the sort implementation.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def ranking(scores: np.ndarray) -> np.ndarray:
    """(Q, G) scores -> (Q, G) gallery indices, best first, ties in gallery order."""
    return np.argsort(-scores, axis=1, kind="stable")


def recall_at_k(
    scores: np.ndarray,
    relevant: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    weights: np.ndarray | None = None,
) -> dict[int, float]:
    """Fraction of queries with at least one relevant gallery item among their k best.

    Args:
        scores: (Q, G) higher is better; ``-inf`` marks items a query never retrieves.
        relevant: (Q, G) bool.
        ks: Cut-offs; a k above G counts the whole gallery.
        weights: (Q,) query weights (e.g. how many samples carry a distinct caption); equal
            weights when None.

    Returns:
        ``{k: recall}`` for each k.

    Raises:
        ValueError: shapes differ or there is no query.
    """
    if scores.shape != relevant.shape or scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"need equal (Q, G) shapes with Q > 0, got {scores.shape} and {relevant.shape}")
    weights = np.ones(scores.shape[0]) if weights is None else np.asarray(weights, np.float64)
    order = ranking(scores)  # (Q, G)
    ranked_relevant = np.take_along_axis(relevant, order, axis=1)  # (Q, G)
    retrievable = np.take_along_axis(np.isfinite(scores), order, axis=1)  # (Q, G)
    hits = np.cumsum(ranked_relevant & retrievable, axis=1) > 0  # (Q, G): a hit within the first j+1
    total = weights.sum()
    return {k: float((weights * hits[:, min(k, scores.shape[1]) - 1]).sum() / total) for k in ks}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, G) scores -> (Q, min(k, G)) indices of the best-scored gallery items, best first."""
    return ranking(scores)[:, :k]


def rerank(itc_scores: np.ndarray, candidates: np.ndarray, match_scores: np.ndarray) -> np.ndarray:
    """BLIP-2's re-ranking: each query's ITC top-k candidates scored by ITM + ITC, the rest out.

    Args:
        itc_scores: (Q, G) ITC scores.
        candidates: (Q, k) gallery indices of each query's candidates.
        match_scores: (Q, k) ITM scores (the match logit) of those query/candidate pairs.

    Returns:
        (Q, G) scores: ``match + itc`` at the candidates, ``-inf`` elsewhere.
    """
    reranked = np.full(itc_scores.shape, -np.inf, np.float64)  # (Q, G)
    rows = np.arange(itc_scores.shape[0])[:, None]  # (Q, 1)
    reranked[rows, candidates] = match_scores + itc_scores[rows, candidates]
    return reranked


def matching_accuracy(positive_logits: np.ndarray, negative_logits: np.ndarray) -> dict[str, float]:
    """Accuracy of ITM decisions (match when the match logit beats the no-match logit).

    Args:
        positive_logits: (P, 2) (no match, match) logits of true pairs.
        negative_logits: (M, 2) logits of false pairs (e.g. an image with its hardest wrong caption).

    Returns:
        ``accuracy`` over all pairs, ``positive_accuracy`` and ``negative_accuracy``.
    """
    positive = positive_logits[:, 1] > positive_logits[:, 0]  # (P,)
    negative = negative_logits[:, 1] <= negative_logits[:, 0]  # (M,)
    return {
        "accuracy": float(np.concatenate([positive, negative]).mean()),
        "positive_accuracy": float(positive.mean()),
        "negative_accuracy": float(negative.mean()),
    }


def normalize_caption(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (the SQuAD rules)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the normalised strings are equal."""
    return normalize_caption(prediction) == normalize_caption(reference)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised token multisets (1.0 when both are empty)."""
    predicted, expected = normalize_caption(prediction).split(), normalize_caption(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean token negative log-likelihood)."""
    return float(np.exp(nll_sum / max(tokens, 1)))
