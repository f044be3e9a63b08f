"""Packaged and tiny model names resolve offline, also when many processes ask at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import assets

LOAD = """
from transformers import AutoConfig
from pipeline.assets import resolve_model
print(AutoConfig.from_pretrained(resolve_model("tiny:vit")).model_type)
"""


def test_concurrent_first_use_builds_one_complete_folder(tmp_path):
    env = {**os.environ, "QFORMER_CACHE": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=240) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [err[-800:] for _, err in results]
    assert [out.strip().splitlines()[-1] for out, _ in results] == ["dinov2"] * 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["tiny-vit"]


def _build_on_rank(rank: int, port: int, cache: str, names: list[str]) -> None:
    import torch.distributed as dist

    os.environ["QFORMER_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # as a Ray Train worker of rank 1 that is first to need the folders
            for name in names:
                assets.resolve_model(name)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_distributed_rank_other_than_0_builds_complete_folders(tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModel

    from tests.helpers import free_port

    names = ["tiny:vit", "tiny:llama"]
    mp.spawn(_build_on_rank, args=(free_port(), str(tmp_path), names), nprocs=2)
    for name in names:
        [folder] = tmp_path.glob(name.replace(":", "-") + "*")  # tiny-llama-v3: a versioned name
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        AutoModel.from_pretrained(folder)


def test_a_folder_marked_complete_but_empty_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    (tmp_path / "tiny-vit").mkdir()
    (tmp_path / "tiny-vit" / ".complete").touch()  # as left by an earlier version on rank 1
    folder = assets.resolve_model("tiny:vit")
    assert (tmp_path / "tiny-vit" / "config.json").exists() and folder == str(tmp_path / "tiny-vit")


def test_building_a_folder_leaves_the_callers_random_state_as_it_was(tmp_path, monkeypatch):
    """A training worker that converts an asset first (a cold cache) draws the same random
    initialisation afterwards as one that finds it built (tiny builders seed torch, real ones
    draw random weights before loading the converted ones)."""
    import torch

    monkeypatch.setenv("QFORMER_CACHE", str(tmp_path))
    torch.manual_seed(123)
    warm = torch.rand(4)
    torch.manual_seed(123)
    assets.resolve_model("tiny:vit")  # built now: the cache is empty
    assert torch.equal(torch.rand(4), warm)


def test_unknown_packaged_names_are_rejected():
    with pytest.raises(assets.AssetError, match="unknown packaged model"):
        assets.resolve_model("pypi:not-a-model")
    with pytest.raises(assets.AssetError, match="unknown tiny model"):
        assets.resolve_model("tiny:nothing")
    assert assets.resolve_model("facebook/dinov2-small") == "facebook/dinov2-small"


def test_config_names_are_architectures_at_the_papers_shapes():
    vision = assets.model_config(assets.EVA_VIT_G)
    assert (vision.model_type, vision.hidden_size, vision.num_hidden_layers, vision.image_size,
            vision.patch_size) == ("blip_2_vision_model", 1408, 39, 224, 14)
    bert = assets.model_config(assets.BERT_BASE)
    assert (bert.model_type, bert.hidden_size, bert.num_hidden_layers, bert.vocab_size) == ("bert", 768, 12, 30522)
    opt = assets.model_config(assets.OPT_2_7B)
    assert (opt.model_type, opt.hidden_size, opt.num_hidden_layers, opt.num_attention_heads, opt.ffn_dim,
            opt.vocab_size) == ("opt", 2560, 32, 32, 10240, 50272)
    assert assets.model_config("tiny:vit").model_type == "dinov2"  # other names: their config file


def test_config_names_have_no_files_to_load():
    with pytest.raises(assets.AssetError, match="config:eva-vit-g is an architecture without files"):
        assets.resolve_model(assets.EVA_VIT_G)
    with pytest.raises(assets.AssetError, match="no tokenizer"):
        assets.resolve_tokenizer(assets.OPT_2_7B)
    with pytest.raises(assets.AssetError, match="unknown architecture 'config:nothing'"):
        assets.model_config("config:nothing")


def test_smollm2_texts_start_as_its_pretraining_documents_do():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_tokenizer(assets.SMOLLM2))
    ids = tokenizer("The cat sat on the mat and looked out of the window.").input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|endoftext|>" == tokenizer.bos_token
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("The cat sat")
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model(assets.SMOLLM2))
    assert model.config.bos_token_id == ids[0]  # stage 2 keeps it out of the labels

    # Why: SmolLM2 reads a text after <|endoftext|> as it was trained to (measured 2.70 vs 3.83).
    def loss(tokens: list[int], scored_from: int) -> float:
        labels = torch.tensor([tokens])
        labels[:, :scored_from] = -100
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens]), labels=labels).loss.item()

    assert loss(ids, scored_from=2) < loss(ids[1:], scored_from=1) - 0.5


def test_smollm2_captions_end_as_its_pretraining_documents_end():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_tokenizer(assets.SMOLLM2))
    assert tokenizer.eos_token == "<|endoftext|>" == tokenizer.bos_token
    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model(assets.SMOLLM2))
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id

    # Why: the Instruct GGUF's own end-of-text, <|im_end|>, ends chat turns; after a plain caption
    # the frozen LLM finds it far less likely (measured 17.9 nats against 11.4), and stage 2 has
    # to learn that much more before it captions.
    caption = tokenizer("a red circle").input_ids

    def end_loss(end_id: int) -> float:
        tokens = torch.tensor([[*caption, end_id]])
        labels = torch.full_like(tokens, -100)
        labels[:, -1] = end_id
        with torch.no_grad():
            return model(input_ids=tokens, labels=labels).loss.item()

    assert end_loss(tokenizer.eos_token_id) < end_loss(tokenizer.convert_tokens_to_ids("<|im_end|>")) - 3
