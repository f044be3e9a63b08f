"""``qformer eval`` end to end on tiny checkpoints: Ray Data actors, eval.json, the sheet."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.eval import metrics
from pipeline.checkpoint.lookup import find_checkpoint
from pipeline.checkpoint.rebuild import load_trained_model
from pipeline.data.prepared import read_rows
from pipeline.eval.heldout import CaptionGallery, EvalInputs, resolve_data
from pipeline.io.storage import Location
from pipeline.model import build_llm_tokenizer, image_preprocessing
from pipeline.model.losses import image_text_similarity
from pipeline.model.generate import DecodingSpec, generate_captions, prefix_ids
from pipeline.eval.scoring import ScoringSpec, Stage2Scorer
from tests.helpers import tensorboard_images, tensorboard_scalars

SAMPLES = 48


def _brute_force_i2t(checkpoint, prepared: str) -> tuple[np.ndarray, np.ndarray]:
    """ITC scores (N, C) of the first SAMPLES images vs the gallery, one sample at a time."""
    source = find_checkpoint(Location.of(checkpoint))
    model = load_trained_model(source)
    data = resolve_data([prepared])
    gallery = CaptionGallery.read(data.shards)
    rows = read_rows(data.shards, ["key", "caption", "image", "qformer_input_ids", "qformer_attention_mask"], SAMPLES)
    build = EvalInputs(image_preprocessing(source.model_spec.vision), 1)
    with torch.no_grad():
        texts = torch.cat([model.text_features(torch.as_tensor(gallery.input_ids[i : i + 1]),
                                               torch.as_tensor(gallery.attention_mask[i : i + 1]))
                           for i in range(len(gallery.captions))])  # (C, E)
        images = torch.cat([
            model.image_features(model.query_image(model.encode_image(build(rows.slice(i, 1))["pixel_values"])))
            for i in range(rows.num_rows)
        ])  # (N, Q, E)
    reference = gallery.index_of(rows.column("caption").to_pylist())
    return image_text_similarity(images, texts).numpy(), reference


def test_stage1_eval_writes_consistent_recalls_and_a_sheet(tiny_checkpoints, prepared_demo, tmp_path):
    out = tmp_path / "eval1"
    stage_folder = str(tiny_checkpoints[1].parent)  # resolved through complete.json
    code = main(["eval", stage_folder, "--data", prepared_demo, "--out", str(out),
                 "--max-samples", str(SAMPLES), "--batch-size", "16", "--itm-top-k", "3", "--examples", "6"])
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["checkpoint"] == str(tiny_checkpoints[1])
    assert report["objective"] == 1 and report["step"] == 3 and report["samples"] == SAMPLES
    m = report["metrics"]
    for direction in ("i2t", "t2i"):
        assert 0 <= m[f"{direction}_r1"] <= m[f"{direction}_r5"] <= m[f"{direction}_r10"] <= 1
    assert m["caption_accuracy"] == m["i2t_r1"]
    assert {"i2t_itm_r1", "itm_accuracy", "itm_positive_accuracy", "itm_negative_accuracy"} <= set(m)
    assert "i2t_itm_r5" not in m  # only 3 candidates were re-ranked

    scores, reference = _brute_force_i2t(stage_folder, prepared_demo)
    assert m["caption_chance"] == pytest.approx(1 / scores.shape[1], abs=1e-6)
    ranks = [int((scores[i] > scores[i, reference[i]]).sum()) for i in range(SAMPLES)]
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == pytest.approx(np.mean([r < k for r in ranks]), abs=1e-6)
    best_image = {}
    for caption in set(reference.tolist()):
        order = np.argsort(-scores[:, caption], kind="stable")
        best_image[caption] = reference[order[0]] == caption
    expected_t2i = np.mean([best_image[c] for c in reference])  # every sample's caption a query
    assert m["t2i_r1"] == pytest.approx(expected_t2i, abs=1e-6)

    assert len(report["examples"]) == 6
    assert all(len(e["retrieved"]) == 3 and "itm_match_probability" in e for e in report["examples"])
    assert (out / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "sheet.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 6 and report["examples"][0]["caption"] in html
    # The metrics and the sheet in TensorBoard, at the checkpoint's step; the command's log beside.
    scalars = tensorboard_scalars(str(out))
    [(step, value)] = scalars["eval/caption_accuracy"]
    assert step == 3 and value == pytest.approx(m["caption_accuracy"], abs=1e-6)  # float32 there
    assert tensorboard_images(str(out)) == {"eval/sheet": [3]}
    assert len(list((out / "logs").glob("eval-*.log"))) == 1


def test_stage2_eval_generates_captions_and_scores_them(tiny_checkpoints, prepared_demo, tmp_path):
    (tmp_path / "sets").mkdir()
    os.symlink(prepared_demo, tmp_path / "sets" / "test")
    code = main(["eval", str(tiny_checkpoints[2]), "--data", str(tmp_path / "sets"), "--split", "test",
                 "--max-samples", "16", "--batch-size", "8", "--beams", "2", "--max-new-tokens", "4"])
    assert code == 0
    # Not inside the checkpoint (keep-last-N deletion would remove it): beside the stage folders.
    out = tiny_checkpoints[2].parent.parent / "eval" / f"stage2-{tiny_checkpoints[2].name}"
    assert not (tiny_checkpoints[2] / "eval").exists()
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    assert report["samples"] == 16 and report["data"].endswith("sets/test")
    assert {"exact_match", "token_f1", "beam_exact_match", "beam_token_f1"} <= set(m)
    assert m["perplexity"] == pytest.approx(np.exp(m["caption_loss"]), rel=1e-4)
    example = report["examples"][0]
    assert example["generated_exact_match"] == metrics.exact_match(example["generated"], example["caption"])
    assert (out / "sheet.png").exists()


def test_stage2_scorer_matches_the_training_loss_and_a_hand_written_greedy_loop(tiny_checkpoints, prepared_demo):
    source = find_checkpoint(Location.of(str(tiny_checkpoints[2])))
    model = load_trained_model(source)
    spec = source.model_spec
    tokenizer = build_llm_tokenizer(spec.llm)
    rows = read_rows(resolve_data([prepared_demo]).shards,
                     ["key", "caption", "image", "llm_input_ids", "llm_attention_mask"], 4)
    inputs = EvalInputs(image_preprocessing(spec.vision), 2)(rows)
    out = Stage2Scorer(model, tokenizer, ScoringSpec(decoding=DecodingSpec(max_new_tokens=3)))(inputs)
    with torch.no_grad():
        loss = model(**inputs).loss_lm
    assert out["nll_sum"].sum() / out["tokens"].sum() == pytest.approx(float(loss), rel=1e-5)

    with torch.no_grad():
        embeds = model.language_projection(model.query_image(model.encode_image(inputs["pixel_values"])))
        start = prefix_ids(tokenizer, "")  # the LLM's begin-of-text, as training's texts start
        tokens = torch.tensor([start] * 4, dtype=torch.long)  # (4, len(start))
        for _ in range(3):  # greedy, recomputing the whole prefix each time (no cache)
            words = model.language_model.get_input_embeddings()(tokens)
            logits = model.language_model(inputs_embeds=torch.cat([embeds, words], dim=1)).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = []
    for row in tokens[:, len(start):].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        expected.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert generate_captions(model, tokenizer, inputs["pixel_values"], DecodingSpec(max_new_tokens=3)) == expected
    assert list(out["generated"]) == expected


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/ckpt", "--data", "/nonexistent/data"], "no such folder"),
    (["eval", "CKPT", "--data", "/nonexistent/data"], "has no manifest.json"),
    (["eval", "CKPT", "--data", "/nonexistent/*.parquet"], "matches no file"),
])
def test_eval_cli_errors_are_one_line_exit_2(tiny_checkpoints, args, message, capsys):
    args = [str(tiny_checkpoints[1]) if a == "CKPT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
