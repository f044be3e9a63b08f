"""From the scorers' per-sample outputs to metrics and examples (see ``pipeline.eval.metrics`` for
how retrieval is defined when many images share a caption)."""

from __future__ import annotations

import numpy as np

from pipeline.eval import metrics
from pipeline.eval.heldout import CaptionGallery

RECALL_KS = (1, 5, 10)

DEFINITIONS = {
    "i2t_r{k}": "image -> text recall@k: the image's reference caption is among the k best of the "
                "held-out set's distinct captions by ITC score",
    "caption_accuracy": "i2t_r1: caption retrieval accuracy among all distinct captions "
                        "(chance: caption_chance)",
    "t2i_r{k}": "text -> image recall@k: an image carrying the query caption is among the k best "
                "images by ITC score; queries are the distinct captions weighted by their sample counts",
    "i2t_itm_r{k}": "i2t_r{k} after BLIP-2's re-ranking of each image's ITC top-k captions by "
                    "ITM match logit + ITC score",
    "itm_accuracy": "ITM decisions on (image, its caption) and (image, its hardest wrong caption "
                    "by ITC) pairs",
    "exact_match": "generated caption equals the reference after normalisation (lower case, no "
                   "punctuation or articles)",
    "token_f1": "F1 of the normalised token multisets of generated and reference captions",
    "caption_loss": "mean next-token negative log-likelihood of the reference captions under the "
                    "frozen LLM with the visual prompt (no label smoothing)",
    "perplexity": "exp(caption_loss)",
    "query_cosine": "mean cosine similarity between the query outputs of one image (pairs of "
                    "distinct queries, averaged over images): 1 when the queries collapse to one vector",
}


def stage1_metrics(outputs: dict[str, np.ndarray], gallery: CaptionGallery) -> dict[str, float]:
    """Retrieval and matching metrics from :class:`pipeline.eval.scoring.Stage1Scorer` outputs.

    Args:
        outputs: Concatenated scorer outputs of N images (``itc`` (N, C), ``gallery_index`` (N,),
            and the ITM fields when ITM ran).
        gallery: The C distinct captions.
    """
    itc, reference = outputs["itc"], outputs["gallery_index"]
    count = len(gallery.captions)
    relevant = np.zeros(itc.shape, bool)  # (N, C)
    relevant[np.arange(len(reference)), reference] = True
    i2t = metrics.recall_at_k(itc, relevant, RECALL_KS)
    weights = np.bincount(reference, minlength=count)  # (C,) images carrying each caption
    queried = weights > 0
    t2i = metrics.recall_at_k(itc.T[queried], relevant.T[queried], RECALL_KS, weights[queried])
    result = {
        **{f"i2t_r{k}": v for k, v in i2t.items()},
        **{f"t2i_r{k}": v for k, v in t2i.items()},
        "caption_accuracy": i2t[1],
        "caption_chance": 1.0 / count,
        "query_cosine": float(outputs["query_cosine"].mean()),
    }
    if "candidates" in outputs:
        reranked = metrics.rerank(itc, outputs["candidates"], outputs["candidate_match"])
        top_k = outputs["candidates"].shape[1]
        ks = [k for k in RECALL_KS if k <= top_k]
        result.update({f"i2t_itm_r{k}": v for k, v in metrics.recall_at_k(reranked, relevant, ks).items()})
        matching = metrics.matching_accuracy(outputs["positive_logits"], outputs["negative_logits"])
        result.update({f"itm_{name}": value for name, value in matching.items()})
    return result


def stage2_metrics(outputs: dict[str, np.ndarray], captions: list[str]) -> dict[str, float]:
    """Captioning metrics from :class:`pipeline.eval.scoring.Stage2Scorer` outputs.

    Args:
        outputs: Concatenated scorer outputs of N images.
        captions: The N reference captions, in the same order.
    """
    loss = float(outputs["nll_sum"].sum() / max(int(outputs["tokens"].sum()), 1))
    result = {"caption_loss": loss, "perplexity": float(np.exp(loss)),
              "query_cosine": float(outputs["query_cosine"].mean())}
    for prefix, field in (("", "generated"), ("beam_", "beam_generated")):
        if field in outputs:
            pairs = list(zip(outputs[field], captions))
            result[f"{prefix}exact_match"] = float(np.mean([metrics.exact_match(p, r) for p, r in pairs]))
            result[f"{prefix}token_f1"] = float(np.mean([metrics.token_f1(p, r) for p, r in pairs]))
    return result


def examples(outputs: dict[str, np.ndarray], keys: list[str], gallery: CaptionGallery | None,
             top: int = 3) -> list[dict]:
    """What the sheet shows for the samples ``keys`` (those present in ``outputs``).

    Stage 1: the ``top`` best captions by ITC (with the ITM match probability of the first when
    ITM ran); stage 2: the generated caption(s) and whether they match the reference.
    """
    position = {key: i for i, key in enumerate(outputs["key"])}
    chosen = []
    for key in keys:
        if key not in position:
            continue
        i = position[key]
        reference = str(outputs["caption"][i])
        example = {"key": key, "caption": reference}
        if "itc" in outputs:
            best = metrics.ranking(outputs["itc"][i : i + 1])[0, :top]
            example["retrieved"] = [
                {"caption": gallery.captions[j], "score": round(float(outputs["itc"][i, j]), 4),
                 "correct": gallery.captions[j] == reference}
                for j in best
            ]
            if "positive_logits" in outputs:
                logits = outputs["positive_logits"][i]
                example["itm_match_probability"] = round(float(_softmax(logits)[1]), 4)
        for field in ("generated", "beam_generated"):
            if field in outputs:
                text = str(outputs[field][i])
                example[field] = text
                example[f"{field}_exact_match"] = metrics.exact_match(text, reference)
        chosen.append(example)
    return chosen


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def held_out_line(stage: str, record: dict) -> str:
    """One line of a stage's held-out figures for the end of ``qformer train``.

    Args:
        stage: The stage name.
        record: The stage's last evaluation: metric names without the ``eval_`` prefix, with
            ``step`` and ``samples``.
    """
    if "caption_accuracy" in record:
        figures = [f"caption retrieval accuracy {record['caption_accuracy']:.3f} "
                   f"(chance {record['caption_chance']:.3f})", f"text->image R@1 {record['t2i_r1']:.3f}"]
        if "itm_accuracy" in record:
            figures.append(f"ITM accuracy {record['itm_accuracy']:.3f}")
    else:
        figures = [f"caption token F1 {record['token_f1']:.3f}", f"exact match {record['exact_match']:.3f}",
                   f"caption loss {record['caption_loss']:.3f}"]
    return (f"stage {stage}: held out at step {record['step']}, {record['samples']} samples: "
            + ", ".join(figures))
