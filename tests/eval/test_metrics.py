"""Evaluation metrics against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval import metrics
from pipeline.eval.heldout import CaptionGallery
from pipeline.eval.summary import stage1_metrics, stage2_metrics


def test_recall_at_k_counts_a_query_once_any_relevant_item_is_within_k():
    scores = np.array([
        [0.9, 0.8, 0.1, 0.0],   # relevant item ranked 2nd
        [0.1, 0.2, 0.3, 0.4],   # relevant item ranked 1st
        [0.5, 0.4, 0.3, 0.2],   # relevant item ranked 4th
    ])
    relevant = np.array([
        [False, True, False, False],
        [False, False, False, True],
        [False, False, False, True],
    ])
    assert metrics.recall_at_k(scores, relevant, ks=(1, 2, 3, 4, 10)) == {
        1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3), 4: 1.0, 10: 1.0}
    weighted = metrics.recall_at_k(scores, relevant, ks=(1, 2), weights=np.array([1, 3, 0]))
    assert weighted == {1: pytest.approx(3 / 4), 2: 1.0}


def test_recall_breaks_ties_by_gallery_order_and_never_retrieves_minus_infinity():
    tied = np.array([[0.5, 0.5, 0.5]])
    assert metrics.recall_at_k(tied, np.array([[False, True, False]]), ks=(1, 2)) == {1: 0.0, 2: 1.0}
    excluded = np.array([[0.3, -np.inf]])
    assert metrics.recall_at_k(excluded, np.array([[False, True]]), ks=(1, 2)) == {1: 0.0, 2: 0.0}
    with pytest.raises(ValueError):
        metrics.recall_at_k(tied, np.ones((2, 3), bool))


def test_rerank_scores_only_the_candidates_with_match_plus_contrastive():
    itc = np.array([[0.9, 0.5, 0.4, 0.1]])
    reranked = metrics.rerank(itc, np.array([[0, 1]]), np.array([[-2.0, 3.0]]))
    np.testing.assert_allclose(reranked, [[-1.1, 3.5, -np.inf, -np.inf]])
    relevant = np.array([[False, True, False, False]])
    assert metrics.recall_at_k(itc, relevant, ks=(1,))[1] == 0.0
    assert metrics.recall_at_k(reranked, relevant, ks=(1,))[1] == 1.0


def test_matching_accuracy():
    positive = np.array([[0.0, 1.0], [2.0, 1.0]])        # right, wrong
    negative = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, -1.0]])  # right, wrong, right
    assert metrics.matching_accuracy(positive, negative) == {
        "accuracy": pytest.approx(3 / 5), "positive_accuracy": 0.5, "negative_accuracy": pytest.approx(2 / 3)}


def test_caption_normalisation_exact_match_and_token_f1():
    assert metrics.normalize_caption("  A Red, circle! ") == "red circle"
    assert metrics.exact_match("a red circle", "The red circle.")
    assert not metrics.exact_match("a red circle", "a red square")
    assert metrics.token_f1("a red circle", "a red square") == pytest.approx(0.5)
    assert metrics.token_f1("red red circle", "red circle") == pytest.approx(0.8)
    assert metrics.token_f1("blue", "red circle") == 0.0
    assert metrics.token_f1("", "the") == 1.0
    assert metrics.perplexity(np.log(4.0) * 6, 6) == pytest.approx(4.0)


def _gallery(captions):
    n = len(captions)
    return CaptionGallery(tuple(captions), np.zeros((n, 4), np.int64), np.ones((n, 4), np.int64), np.ones(n))


def test_stage1_metrics_from_scorer_outputs():
    gallery = _gallery(["a red circle", "a blue circle", "a red square"])
    # Four images: references 0, 0, 1, 2. Image 1 prefers caption 1 (a miss at 1, a hit at 2).
    itc = np.array([
        [0.9, 0.1, 0.2],
        [0.4, 0.6, 0.1],
        [0.1, 0.8, 0.3],
        [0.0, 0.1, 0.7],
    ])
    outputs = {
        "itc": itc,
        "gallery_index": np.array([0, 0, 1, 2]),
        "candidates": np.array([[0, 2], [1, 0], [1, 2], [2, 1]]),
        "candidate_match": np.array([[1.0, 0.0], [-1.0, 2.0], [1.0, 0.0], [1.0, 0.0]]),
        "positive_logits": np.array([[0.0, 1.0]] * 4),
        "negative_logits": np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]]),
        "query_cosine": np.array([1.0, 0.5, 0.5, 0.0]),
    }
    result = stage1_metrics(outputs, gallery)
    assert result["i2t_r1"] == result["caption_accuracy"] == pytest.approx(3 / 4)
    assert result["i2t_r5"] == result["i2t_r10"] == 1.0
    assert result["i2t_itm_r1"] == 1.0  # re-ranking fixes image 1
    assert result["caption_chance"] == pytest.approx(1 / 3)
    # Text -> image: "a red circle" (weight 2) finds image 0 first; "a blue circle" (1) finds
    # image 2 first; "a red square" (1) finds image 3 first.
    assert result["t2i_r1"] == 1.0
    assert result["itm_accuracy"] == pytest.approx(7 / 8)
    assert result["query_cosine"] == pytest.approx(0.5)


def test_stage2_metrics_from_scorer_outputs():
    outputs = {
        "nll_sum": np.array([2.0, 4.0]),
        "tokens": np.array([2, 4]),
        "generated": np.array(["a red circle", "a blue square"], dtype=object),
        "query_cosine": np.array([0.25, 0.75]),
    }
    result = stage2_metrics(outputs, ["A red circle.", "a red square"])
    assert result["exact_match"] == 0.5
    assert result["token_f1"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["caption_loss"] == pytest.approx(1.0)
    assert result["perplexity"] == pytest.approx(np.e)
    assert result["query_cosine"] == pytest.approx(0.5)
