"""Starting a model from released BLIP-2 weights (``init_from``): our transformers export read
back, transformers Blip2 folders built from configs, LAVIS-named ``.pth`` files; strictly."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

from pipeline.checkpoint.initial import check_initial_weights, load_initial_weights
from pipeline.checkpoint.sources import InitError, resolve_init_source
from pipeline.errors import EXIT_USAGE
from pipeline.export import export_checkpoint
from pipeline.export.compat import image_token_id
from pipeline.export.transformers_format import blip2_config
from pipeline.io.storage import StorageError
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer, build_qformer_tokenizer
from pipeline.model.adapters.lavis import to_lavis
from pipeline.model.adapters.transformers_blip2 import PRETRAINING_FILE
from pipeline.spec.model import ModelSpec
from pipeline.spec.storage import StorageSpec

from tests.export.helpers import Trained, model_section, random_batch, train_and_checkpoint

HUB_RETRIEVAL_GAPS = ("lm_head.*", "temp")
"""What a transformers Blip2ForImageTextRetrieval lacks: the ITG head and the ITC temperature."""


def _trained_and_exported(towers, tmp_path_factory, objective: int) -> tuple[Trained, Path]:
    """A trained model of ``objective`` (Blip2VisionModel tower) and its transformers export folder."""
    trained = train_and_checkpoint(tmp_path_factory.mktemp("runs") / f"objective{objective}",
                                   model_section(towers.blip2_vision, towers.bert, towers.llm), objective=objective)
    out = export_checkpoint(str(trained.checkpoint), tmp_path_factory.mktemp("export") / f"stage{objective}").out_dir
    return trained, out


@pytest.fixture(scope="module")
def stage1(towers, tmp_path_factory) -> tuple[Trained, Path]:
    return _trained_and_exported(towers, tmp_path_factory, 1)


@pytest.fixture(scope="module")
def stage2(towers, tmp_path_factory) -> tuple[Trained, Path]:
    return _trained_and_exported(towers, tmp_path_factory, 2)


def _fresh(spec: ModelSpec, objective: int) -> Blip2Pretrainer:
    torch.manual_seed(123)  # another initialisation than the trained model's
    return Blip2Pretrainer(spec, objective=objective).eval()


def _trainable_names(model: Blip2Pretrainer) -> set[str]:
    return set(model.trainable_state_dict())


def test_a_stage1_export_loads_back_into_a_model_that_computes_the_same(stage1):
    trained, folder = stage1
    source = resolve_init_source(str(folder))
    assert source.kind == "transformers" and source.where == str(folder)
    fresh = _fresh(trained.model.spec, 1)
    batch = random_batch(trained.model, seed=40)
    with torch.no_grad():
        before = fresh(**batch)
    report = load_initial_weights(fresh, source)
    lines = report.tensor_lines()

    assert set(report.loaded) == _trainable_names(fresh) and not report.fresh and not report.left_out
    assert "transformers Blip2 model" in report.summary() and len(lines) == len(report.loaded)
    assert "  loaded qformer.encoder.layer.0.crossattention.attention.query.weight (32, 32)" in lines
    with torch.no_grad():
        ours, theirs = trained.model(**batch), fresh(**batch)
    assert not torch.allclose(before.itm_logits, ours.itm_logits)  # it did start elsewhere
    for field in ("sim_i2t", "sim_t2i", "itm_logits", "itg_logits", "loss"):
        torch.testing.assert_close(getattr(theirs, field), getattr(ours, field), rtol=0, atol=0)


def test_the_itc_temperature_survives_export_and_import(stage1, tmp_path):
    trained, folder = stage1
    learnt = trained.model.temp.detach().clone()
    assert float(learnt) != pytest.approx(trained.model.spec.losses.init_temperature)
    fresh = _fresh(trained.model.spec, 1)
    load_initial_weights(fresh, resolve_init_source(str(folder)))
    assert torch.equal(fresh.temp.detach(), learnt)

    # Without the file beside the model (transformers' own conversion keeps no temperature and
    # no ITG head) the gap is an error unless the spec accepts it; then the init value stays.
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / PRETRAINING_FILE).unlink()
    with pytest.raises(InitError, match=r"6 of the model's trainable tensors are not in it \(lm_head"):
        check_initial_weights(_fresh(trained.model.spec, 1), resolve_init_source(str(plain)))
    fresh = _fresh(trained.model.spec, 1)
    report = load_initial_weights(fresh, resolve_init_source(str(plain), allow_missing=HUB_RETRIEVAL_GAPS))
    assert sorted(report.fresh) == sorted(n for n in _trainable_names(fresh) if n.startswith(("lm_head.", "temp")))
    assert report.fresh["temp"] == "allowed; not in the source"
    assert float(fresh.temp.detach()) == pytest.approx(trained.model.spec.losses.init_temperature)
    torch.testing.assert_close(fresh.itm_head.weight, trained.model.itm_head.weight, rtol=0, atol=0)


def test_a_stage2_export_loads_back_with_the_same_lm_logits(stage2):
    trained, folder = stage2
    fresh = _fresh(trained.model.spec, 2)
    report = load_initial_weights(fresh, resolve_init_source(str(folder)))
    assert set(report.loaded) == _trainable_names(fresh) == {
        *(n for n in report.loaded if n.startswith(("qformer.", "ln_vision."))),
        "query_tokens", "language_projection.weight", "language_projection.bias"}
    batch = random_batch(trained.model, seed=41)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, trained.model(**batch).logits, rtol=0, atol=0)


def test_across_objectives_only_the_parts_of_one_objective_differ(stage1, stage2):
    trained1, folder1 = stage1
    trained2, folder2 = stage2
    # Stage 1 -> stage 2: the caption side is left out, the LLM projection is new; no opt-in.
    into2 = _fresh(trained2.model.spec, 2)
    report = load_initial_weights(into2, resolve_init_source(str(folder1)))
    assert sorted(report.fresh) == ["language_projection.bias", "language_projection.weight"]
    assert {n.split(".")[0] for n in report.left_out} == {
        "embeddings", "vision_projection", "text_projection", "itm_head", "lm_head", "temp", "qformer"}
    torch.testing.assert_close(into2.query_tokens, trained1.model.query_tokens, rtol=0, atol=0)
    # Stage 2 (Blip2ForConditionalGeneration, e.g. Salesforce/blip2-opt-2.7b) -> stage 1.
    into1 = _fresh(trained1.model.spec, 1)
    report = load_initial_weights(into1, resolve_init_source(str(folder2)))
    assert sorted(report.left_out) == ["language_projection.bias", "language_projection.weight"]
    assert "itm_head.weight" in report.fresh and "temp" in report.fresh
    assert report.fresh["itm_head.weight"].startswith("objective 2, which the source was built for")
    layer = into1.qformer.encoder.layer[1]
    torch.testing.assert_close(layer.output_query.dense.weight,
                               trained2.model.qformer.encoder.layer[1].output_query.dense.weight, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Blip2ForImageTextRetrieval, Blip2ForConditionalGeneration, Blip2Model])
def test_a_transformers_blip2_folder_fills_the_right_tensors(stage1, stage2, tmp_path, cls):
    """A folder as the hub has them, built from a config: every trainable tensor of ours takes
    the tensor of the same name there, ``ln_vision`` the tower's ``post_layernorm``."""
    trained, _ = stage1 if cls is Blip2ForImageTextRetrieval else stage2
    model = trained.model
    tokenizer = build_qformer_tokenizer(model.spec.qformer) if model.objective == 1 else build_llm_tokenizer(model.spec.llm)
    torch.manual_seed(7)
    released = cls(blip2_config(model, image_token_id(tokenizer))).eval()
    released.save_pretrained(tmp_path / "released")
    theirs = released.state_dict()

    fresh = _fresh(model.spec, model.objective)
    allow = HUB_RETRIEVAL_GAPS if cls is Blip2ForImageTextRetrieval else ()
    report = load_initial_weights(fresh, resolve_init_source(str(tmp_path / "released"), allow_missing=allow))
    assert report.frozen == 0  # the towers' tensors are not even read
    for name, tensor in fresh.trainable_state_dict().items():
        if name.startswith(("lm_head.", "temp")):
            assert name in report.fresh
            continue
        their_name = "vision_model.post_layernorm." + name.removeprefix("ln_vision.") if name.startswith("ln_vision.") else name
        assert torch.equal(tensor, theirs[their_name]), name
    assert not torch.equal(fresh.query_tokens, model.query_tokens)


def test_an_llm_projection_for_an_llm_of_another_width_starts_fresh(stage2, tmp_path):
    trained, folder = stage2
    wider = tmp_path / "wider-llm"
    tokenizer = AutoTokenizer.from_pretrained(trained.model.spec.llm.name)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
                     ).save_pretrained(wider)
    spec = trained.model.spec.model_copy(update={"llm": trained.model.spec.llm.model_copy(update={"name": str(wider)})})
    fresh = _fresh(spec, 2)
    report = load_initial_weights(fresh, resolve_init_source(str(folder)))
    assert report.fresh == {name: "the source's LLM takes width 32, this one 48"
                            for name in ("language_projection.weight", "language_projection.bias")}
    torch.testing.assert_close(fresh.query_tokens, trained.model.query_tokens, rtol=0, atol=0)


def _save_lavis(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint as LAVIS's runner saves it: the state dict under "model", and the rest."""
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "config": {"model": {"arch": "blip2"}}, "scaler": None, "epoch": 9}, path)
    return path


def test_a_lavis_checkpoint_fills_the_right_tensors(stage1, tmp_path):
    trained, _ = stage1
    lavis = to_lavis(trained.model.trainable_state_dict())
    lavis["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)  # frozen: never loaded
    path = _save_lavis(tmp_path / "blip2_pretrained.pth", lavis)
    source = resolve_init_source(str(path))
    assert source.kind == "lavis"
    fresh = _fresh(trained.model.spec, 1)
    report = load_initial_weights(fresh, source)
    assert set(report.loaded) == _trainable_names(fresh) and report.frozen == 1

    saved = torch.load(path, weights_only=True)["model"]
    layer0, layer1 = fresh.qformer.encoder.layer[0], fresh.qformer.encoder.layer[1]
    pairs = {
        "Qformer.bert.encoder.layer.0.attention.self.query.weight": layer0.attention.attention.query.weight,
        "Qformer.bert.encoder.layer.0.crossattention.self.value.weight": layer0.crossattention.attention.value.weight,
        "Qformer.bert.encoder.layer.0.crossattention.output.dense.bias": layer0.crossattention.output.dense.bias,
        "Qformer.bert.encoder.layer.1.intermediate.dense.weight": layer1.intermediate.dense.weight,
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight": layer1.output_query.LayerNorm.weight,
        "Qformer.bert.embeddings.LayerNorm.weight": fresh.qformer.layernorm.weight,
        "Qformer.bert.embeddings.word_embeddings.weight": fresh.embeddings.word_embeddings.weight,
        "Qformer.cls.predictions.transform.dense.weight": fresh.lm_head.transform.dense.weight,
        "Qformer.cls.predictions.bias": fresh.lm_head.decoder.bias,
        "query_tokens": fresh.query_tokens, "ln_vision.bias": fresh.ln_vision.bias,
        "vision_proj.weight": fresh.vision_projection.weight, "text_proj.bias": fresh.text_projection.bias,
        "itm_head.weight": fresh.itm_head.weight,
    }
    for lavis_name, param in pairs.items():
        assert torch.equal(saved[lavis_name], param), lavis_name
    assert saved["temp"].shape == () and fresh.temp.shape == (1,) and float(saved["temp"]) == float(fresh.temp.detach())
    batch = random_batch(trained.model, seed=42)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).itm_logits, trained.model(**batch).itm_logits, rtol=0, atol=0)


def test_a_lavis_stage2_checkpoint_gives_the_opt_projection(stage2, tmp_path):
    trained, _ = stage2
    path = _save_lavis(tmp_path / "blip2_pretrained_opt.pth", to_lavis(trained.model.trainable_state_dict()))
    assert "opt_proj.weight" in torch.load(path, weights_only=True)["model"]
    fresh = _fresh(trained.model.spec, 2)
    report = load_initial_weights(fresh, resolve_init_source(str(path)))
    assert set(report.loaded) == _trainable_names(fresh)
    torch.testing.assert_close(fresh.language_projection.weight, trained.model.language_projection.weight,
                               rtol=0, atol=0)


def test_a_lavis_checkpoint_on_s3(stage1, tmp_path, s3_endpoint):
    import s3fs

    trained, _ = stage1
    path = _save_lavis(tmp_path / "blip2_pretrained.pth", to_lavis(trained.model.trainable_state_dict()))
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).put(str(path), "test-bucket/lavis/blip2_pretrained.pth")
    storage = StorageSpec(endpoint_url=s3_endpoint)
    source = resolve_init_source("s3://test-bucket/lavis/blip2_pretrained.pth", storage)
    assert source.kind == "lavis" and source.options["endpoint_url"] == s3_endpoint
    fresh = _fresh(trained.model.spec, 1)
    assert set(load_initial_weights(fresh, source).loaded) == _trainable_names(fresh)
    torch.testing.assert_close(fresh.itm_head.weight, trained.model.itm_head.weight, rtol=0, atol=0)
    with pytest.raises(InitError, match="s3://test-bucket/lavis/other.pth: no such file or folder"):
        resolve_init_source("s3://test-bucket/lavis/other.pth", storage)
    with pytest.raises(StorageError, match="s3://no-such-bucket/blip2.pth: the bucket does not exist"):
        resolve_init_source("s3://no-such-bucket/blip2.pth", storage)


class _Payload:
    """An object a pickle would have to construct: what weights_only refuses."""


def test_unreadable_and_unrelated_sources_are_one_line_errors(stage1, tmp_path, towers):
    trained, folder = stage1
    spec = trained.model.spec
    with pytest.raises(InitError, match="no such file or folder") as err:
        resolve_init_source(str(tmp_path / "nothing" / "here"))
    assert err.value.exit_status == EXIT_USAGE and "\n" not in str(err.value)
    with pytest.raises(InitError, match="Salesforce/blip2-opt-2.7b: no such file or folder, and not a "
                                        "transformers model that can be loaded"):
        resolve_init_source("Salesforce/blip2-opt-2.7b")  # the hub is not reachable here
    with pytest.raises(InitError, match="is a transformers 'bert' model, not a BLIP-2 one"):
        resolve_init_source(str(towers.bert))

    torch.save({"model": {"x": _Payload()}}, tmp_path / "code.pth")
    with pytest.raises(InitError, match="refused to load: it holds objects other than tensors"):
        check_initial_weights(trained.model, resolve_init_source(str(tmp_path / "code.pth")))

    # A checkpoint of an unrelated model: an error naming what differs, unless the spec accepts
    # it; then nothing loads and the stage starts from its initialisation, said in one line.
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50))
    unrelated = _save_lavis(tmp_path / "bert.pth", dict(bert.state_dict()))
    with pytest.raises(InitError) as err:
        check_initial_weights(_fresh(spec, 1), resolve_init_source(str(unrelated)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"LAVIS checkpoint {unrelated} does not fit")
    assert re.search(r": \d+ of the model's trainable tensors are not in it \(itm_head.bias, itm_head.weight, "
                     r"lm_head.decoder.bias, lm_head.transform.LayerNorm.bias, \.\.\. \d+ more\); 2 have another "
                     r"shape there \(embeddings.position_embeddings.weight \(512, 32\) in the source, \(64, 32\) "
                     r"here, embeddings.word_embeddings.weight \(50, 32\) in the source, \(75, 32\) here\); \d+ of "
                     r"its tensors have no place in the model \(embeddings.LayerNorm.bias, ", message)
    assert "init_from_allow_missing / init_from_allow_unexpected" in message
    fresh = _fresh(spec, 1)
    before = {name: t.clone() for name, t in fresh.trainable_state_dict().items()}
    report = load_initial_weights(fresh, resolve_init_source(str(unrelated), allow_missing=("*",),
                                                             allow_unexpected=("*",)))
    assert not report.loaded and report.summary().endswith("nothing in it fits this model (allowed by the spec): "
                                                   "the stage starts from model.qformer.init")
    assert all(torch.equal(t, before[name]) for name, t in fresh.trainable_state_dict().items())


def test_shapes_and_gaps_of_the_same_objective_are_errors(stage1, tmp_path):
    trained, folder = stage1
    more_queries = trained.model.spec.model_copy(update={
        "qformer": trained.model.spec.qformer.model_copy(update={"num_query_tokens": 6})})
    with pytest.raises(InitError, match=r"1 have another shape there \(query_tokens \(1, 4, 32\) in the "
                                        r"source, \(1, 6, 32\) here\)"):
        check_initial_weights(_fresh(more_queries, 1), resolve_init_source(str(folder)))
    # A stage-1 source without its ITM head is no stage-2 result: that gap is not excused.
    state = to_lavis(trained.model.trainable_state_dict())
    del state["itm_head.weight"], state["itm_head.bias"]
    with pytest.raises(InitError, match=r"2 of the model's trainable tensors are not in it \(itm_head"):
        check_initial_weights(_fresh(trained.model.spec, 1),
                              resolve_init_source(str(_save_lavis(tmp_path / "partial.pth", state))))


def test_a_training_checkpoint_a_stage_folder_or_an_own_format_export_is_a_source(stage1, tmp_path):
    trained, _ = stage1
    own = export_checkpoint(str(trained.checkpoint), tmp_path / "own", export_format="own").out_dir
    for where, expected in ((trained.checkpoint, trained.checkpoint),
                            (trained.checkpoint.parent, trained.checkpoint), (own, own)):
        source = resolve_init_source(str(where))
        assert source.kind == "checkpoint" and source.where == str(expected)
        fresh = _fresh(trained.model.spec, 1)
        assert set(load_initial_weights(fresh, source).loaded) == _trainable_names(fresh)
        torch.testing.assert_close(fresh.temp, trained.model.temp, rtol=0, atol=0)
    with pytest.raises(InitError, match=r"neither a checkpoint folder .* \(nor a transformers model "
                                        r"folder: no config.json\)"):
        resolve_init_source(str(tmp_path))
