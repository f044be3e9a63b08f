"""Tiny towers, and tiny models trained for a few steps and checkpointed as training does."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.assets import TINY_LLAMA, resolve_tokenizer
from pipeline.model import Blip2Pretrainer, ModelSpec, build_llm_tokenizer, build_qformer_tokenizer
from pipeline.train.checkpoint import METADATA, METRICS, TRAINABLE
from pipeline.train.trained import COMPLETE
from tests.model.tiny import COLORS, SHAPES, save_bert, save_vision_tower

IMAGE_SIZE = 32
BATCH = 4
STAGES = [
    {"name": "stage1", "losses": {"itc": 1.0, "itm": 1.0, "itg": 1.0}, "steps": 3, "batch_size": BATCH},
    {"name": "stage2", "losses": {"lm": 1.0}, "steps": 3, "batch_size": BATCH},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Towers:
    """Folders of tiny frozen towers (width 32, 32 px images)."""

    blip2_vision: Path
    """A Blip2VisionModel (what transformers' Blip2 classes hold)."""
    dinov2_vision: Path
    """A Dinov2 ViT (which they cannot hold)."""
    bert: Path
    """A 4-layer BERT with its caption tokenizer."""
    llm: Path
    """A Llama with the SmolLM2 tokenizer and 64 spare embedding rows, as OPT or Qwen have."""


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> Towers:
    root = tmp_path_factory.mktemp("towers")
    # Blip2VisionConfig's default init (1e-10) makes a tower that ignores its input image.
    blip2 = save_vision_tower("blip2", root / "blip2", initializer_range=0.02)
    return Towers(blip2, save_vision_tower("dinov2", root / "dinov2"), save_bert(root / "bert"),
                  _save_llm_with_spare_rows(root / "llm"))


def _save_llm_with_spare_rows(out: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(TINY_LLAMA))
    torch.manual_seed(0)
    # A wide init makes greedy captions vary from image to image and from token to token.
    config = LlamaConfig(vocab_size=len(tokenizer) + 64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def model_section(vision: Path | str, bert: Path, llm: Path | str) -> dict:
    """The ``model:`` section of a tiny job (4 queries, 16-d ITC features, 12 caption tokens)."""
    return {
        "vision": {"name": str(vision), "dtype": "float32", "image_size": IMAGE_SIZE},
        "qformer": {"bert": str(bert), "num_query_tokens": 4, "embed_dim": 16, "max_text_length": 12},
        "llm": {"name": str(llm), "dtype": "float32"},
    }


def captions(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(COLORS)} {rng.choice(SHAPES)}" for _ in range(count)]


def square_images(count: int, seed: int) -> list[Image.Image]:
    """Random RGB images at the training size, so resizing is the identity."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
            for _ in range(count)]


@dataclass
class Trained:
    """A model trained for a few steps and its checkpoint folder (``run/stageN/step-...``)."""

    model: Blip2Pretrainer
    checkpoint: Path

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent


def train_and_checkpoint(run_dir: Path, model: dict, stage: int, steps: int = 3) -> Trained:
    """Train the stage-``stage`` model of ``model`` on random batches and write its checkpoint.

    AdamW at a high learning rate moves every trainable weight away from its initialisation, so
    an export that lost a weight would compute something else. The checkpoint has the files and
    metadata training writes, and the stage folder a ``complete.json`` naming it.
    """
    job = {
        "run": {"name": run_dir.name, "storage": str(run_dir.parent)},
        "model": model,
        "data": {"prepared": str(run_dir / "prepared")},
        "stages": STAGES,
    }
    torch.manual_seed(stage)
    trained = Blip2Pretrainer(ModelSpec.model_validate(model), stage=stage)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        trained(**_random_batch(trained, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stage_spec = STAGES[stage - 1]
    folder = run_dir / stage_spec["name"] / f"step-{steps:08d}"
    folder.mkdir(parents=True)
    weights = {name: t.float().contiguous() for name, t in trained.trainable_state_dict().items()}
    save_file(weights, str(folder / TRAINABLE))
    metadata = {
        "stage": stage_spec["name"], "stage_index": stage - 1, "step": steps,
        "samples_seen": steps * BATCH, "world_size": 1, "zero_stage": 2, "spec": job,
        "saved_at": time.time(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder / METADATA).write_text(json.dumps(metadata, indent=1))
    (folder / METRICS).write_text("")
    complete = {"stage": stage_spec["name"], "step": steps, "checkpoint": str(folder)}
    (folder.parent / COMPLETE).write_text(json.dumps(complete))
    return Trained(trained.eval(), folder)


def _random_batch(model: Blip2Pretrainer, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    texts = captions(BATCH, seed)
    if model.stage == 1:
        tokenizer = build_qformer_tokenizer(model.spec.qformer)
        enc = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"]}
    tokenizer = build_llm_tokenizer(model.spec.llm)
    enc = tokenizer([t + tokenizer.eos_token for t in texts], padding="max_length", max_length=8,
                    return_tensors="pt")
    return {"pixel_values": pixels, "llm_input_ids": enc["input_ids"],
            "llm_attention_mask": enc["attention_mask"]}
