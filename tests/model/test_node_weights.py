"""Frozen towers once per node: built by one process, mapped by all, computing bit for bit what a
normally loaded tower computes."""

from __future__ import annotations

import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from pipeline.model.llm import load_language_model
from pipeline.model.node_weights import NodeWeightsError, node_shared_module
from pipeline.model.towers import load_tower, tower_file
from pipeline.model.vision import VisionTowerError, encode_images, load_vision_tower
from pipeline.spec.model import LLMSpec, VisionTowerSpec

from .tiny import IMAGE_SIZE, LLM_VOCAB, save_llm


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Tower files of these tests in their own cache folder."""
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path / "cache"))


def _counted_llm(spec_json: str, counter: str):
    """Load the LLM the usual way, one line in ``counter`` per build (slowly: the racers overlap)."""
    with open(counter, "a") as f:
        f.write("built\n")
    time.sleep(1)
    model = load_language_model(LLMSpec.model_validate_json(spec_json))
    return model


def _race(path: str, spec_json: str, counter: str, start, logits) -> None:
    """One racing process: wait for the start, map the LLM, return its logits on fixed ids."""
    spec = LLMSpec.model_validate_json(spec_json)
    start.wait()
    model = node_shared_module(Path(path), build=partial(_counted_llm, spec_json, counter),
                               skeleton=partial(load_language_model, spec, weights=False))
    with torch.no_grad():
        logits.put(model(torch.arange(LLM_VOCAB).view(2, -1)).logits.tolist())


def test_racing_processes_build_once(llm_dirs, tmp_path):
    spec = LLMSpec(name=str(llm_dirs("llama")), dtype="float32")
    path, counter = tmp_path / "towers" / "llm.safetensors", tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    start, logits = context.Barrier(2), context.Queue()
    racers = [context.Process(target=_race, args=(str(path), spec.model_dump_json(), str(counter), start, logits))
              for _ in range(2)]
    for racer in racers:
        racer.start()
    results = [logits.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
        assert racer.exitcode == 0
    assert counter.read_text() == "built\n"
    with torch.no_grad():
        expected = load_language_model(spec)(torch.arange(LLM_VOCAB).view(2, -1)).logits
    assert results[0] == results[1] == expected.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_mapped_llm_is_the_loaded_llm(llm_dirs, kind, dtype):
    spec = LLMSpec(name=str(llm_dirs(kind)), dtype=dtype)
    loaded, mapped = load_language_model(spec), load_tower("llm", spec)

    assert _tensors(mapped).keys() == _tensors(loaded).keys()
    for name, tensor in _tensors(loaded).items():
        assert _tensors(mapped)[name].dtype == tensor.dtype and torch.equal(_tensors(mapped)[name], tensor), name
    # Tied input and output embeddings stay one parameter.
    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tied == (mapped.get_output_embeddings().weight is mapped.get_input_embeddings().weight)
    assert _mapped_from(mapped, tower_file("llm", spec))
    ids = torch.randint(0, LLM_VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, loaded(ids).logits)
    assert not mapped.training and not any(p.requires_grad for p in mapped.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["dinov2", "blip2"])
def test_mapped_vision_tower_is_the_loaded_one(vision_dirs, kind, dtype):
    spec = VisionTowerSpec(name=str(vision_dirs(kind)), dtype=dtype)
    loaded, mapped = load_vision_tower(spec), load_tower("vision", spec)

    assert mapped.config.num_hidden_layers == loaded.config.num_hidden_layers  # the last one dropped
    assert _mapped_from(mapped, tower_file("vision", spec))
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encode_images(mapped, images), encode_images(loaded, images))


def test_loading_a_tower_draws_no_random_numbers(llm_dirs):
    spec = LLMSpec(name=str(llm_dirs("llama")), dtype="float32")
    torch.manual_seed(0)
    expected = torch.randn(4)
    for _ in range(2):  # building the node's file, then mapping it
        torch.manual_seed(0)
        load_tower("llm", spec)
        assert torch.equal(torch.randn(4), expected)


def test_a_changed_checkpoint_or_dtype_gets_another_file(llm_dirs, tmp_path):
    folder = save_llm("llama", tmp_path / "llm")
    spec = LLMSpec(name=str(folder), dtype="float32")
    first = tower_file("llm", spec)
    assert tower_file("llm", spec.model_copy(update={"dtype": "bfloat16"})) != first
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert tower_file("llm", spec) != first


def test_truncated_file_is_rebuilt(llm_dirs, tmp_path):
    spec = LLMSpec(name=str(llm_dirs("llama")), dtype="float32")
    path, counter = tmp_path / "llm.safetensors", tmp_path / "builds.txt"

    def load():
        return node_shared_module(path, build=partial(_counted_llm, spec.model_dump_json(), str(counter)),
                                  skeleton=partial(load_language_model, spec, weights=False))

    load()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)  # a write cut short
    mapped = load()
    assert counter.read_text() == "built\nbuilt\n"
    ids = torch.arange(LLM_VOCAB).view(2, -1)
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, load_language_model(spec)(ids).logits)


def test_file_of_another_module_is_refused(llm_dirs, tmp_path):
    path = tmp_path / "llm.safetensors"
    llama, opt = (LLMSpec(name=str(llm_dirs(kind)), dtype="float32") for kind in ("llama", "opt"))
    node_shared_module(path, build=partial(load_language_model, llama),
                       skeleton=partial(load_language_model, llama, weights=False))
    with pytest.raises(NodeWeightsError, match="in the module"):
        node_shared_module(path, build=partial(load_language_model, opt),
                           skeleton=partial(load_language_model, opt, weights=False))


def test_build_errors_reach_the_caller_as_raised(vision_dirs, tmp_path):
    # A vision config over weights that are not there: the building process's error, unchanged.
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((vision_dirs("blip2") / "config.json").read_text())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(VisionTowerError, match="not in the checkpoint"):
        load_tower("vision", VisionTowerSpec(name=str(folder), dtype="float32"))


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _mapped_from(module: torch.nn.Module, path: Path) -> bool:
    """Whether every parameter and buffer is a view of one mapping of the whole of ``path``."""
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in _tensors(module).values()}
    return storages == {(next(iter(storages))[0], path.stat().st_size)}
