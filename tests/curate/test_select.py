"""Which candidate captions, and which samples, curation keeps (pure functions)."""

from __future__ import annotations

import numpy as np

from pipeline.curate.select import Candidates, choose, decide, top_fraction_cut
from pipeline.data.drops import Drop
from pipeline.spec.curate import SelectSpec


def test_candidates_are_the_web_caption_then_each_new_synthetic_text_once():
    candidates = Candidates.of("a red circle", ["A red  circle", "a blue circle", "", "a blue circle", "a red square"])
    assert candidates.texts == ("a red circle", "a blue circle", "a red square")
    assert candidates.origins == ("web", "synthetic", "synthetic")
    assert Candidates.of("a cat", None).texts == ("a cat",)


def test_the_best_captions_are_kept_ties_to_the_web_caption_and_none_below_min_score():
    scores = np.array([0.5, 0.9, 0.5, 0.2], np.float32)
    assert choose(scores, SelectSpec(keep=2)) == [1, 0]
    assert choose(scores, SelectSpec(keep=3)) == [1, 0, 2]
    assert choose(scores, SelectSpec(keep=3, min_score=0.6)) == [1]
    assert decide(scores, SelectSpec(keep=2, min_score=0.95), None) == ([], Drop.SCORE_TOO_LOW)


def test_a_synthetic_caption_displaces_the_web_caption_only_by_more_than_the_web_margin():
    scores = np.array([0.50, 0.52, 0.56, 0.1], np.float32)  # the web caption first
    assert choose(scores, SelectSpec(keep=1)) == [2]
    assert choose(scores, SelectSpec(keep=2, web_margin=0.03)) == [2, 0]  # 0.56 beats 0.53, 0.52 does not
    assert choose(scores, SelectSpec(keep=1, web_margin=0.1)) == [0]
    assert choose(scores, SelectSpec(keep=3, web_margin=0.1, min_score=0.51)) == [2, 1]  # on the score itself


def test_the_top_fraction_cut_keeps_that_fraction_of_the_corpus_and_every_tie():
    best = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.5, 0.2, 0.8, 0.6, 0.4], np.float32)
    assert top_fraction_cut(best, 0.3) == np.float32(0.7)
    assert (best >= top_fraction_cut(best, 0.3)).sum() == 3
    assert (best >= top_fraction_cut(best, 0.5)).sum() == 6  # the fifth best, 0.5, is held by two
    assert top_fraction_cut(best, 1.0) == np.float32(0.1)
    kept, drop = decide(np.array([0.65, 0.6], np.float32), SelectSpec(keep=2), cut=0.7)
    assert (kept, drop) == ([0, 1], Drop.SCORE_NOT_IN_TOP_FRACTION)
    assert decide(np.array([0.75, 0.6], np.float32), SelectSpec(keep=1), cut=0.7) == ([0], None)
