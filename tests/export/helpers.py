"""Tiny models trained for a few steps and checkpointed as training does, for the export tests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

from pipeline.checkpoint.format import COMPLETE, METADATA, METRICS, TRAINABLE
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer, build_qformer_tokenizer
from pipeline.spec.model import ModelSpec
from tests.model.tiny import COLORS, SHAPES

IMAGE_SIZE = 32
BATCH = 4
STAGES = [
    {"name": "stage1", "losses": {"itc": 1.0, "itm": 1.0, "itg": 1.0}, "steps": 3, "batch_size": BATCH},
    {"name": "stage2", "losses": {"lm": 1.0}, "steps": 3, "batch_size": BATCH},
]


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


def train_and_checkpoint(run_dir: Path, model: dict, objective: int, steps: int = 3) -> Trained:
    """Train the objective-``objective`` model of ``model`` on random batches and write its checkpoint.

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
    torch.manual_seed(objective)
    trained = Blip2Pretrainer(ModelSpec.model_validate(model), objective=objective)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        trained(**random_batch(trained, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stage_spec = STAGES[objective - 1]
    folder = run_dir / stage_spec["name"] / f"step-{steps:08d}"
    folder.mkdir(parents=True)
    weights = {name: t.float().contiguous() for name, t in trained.trainable_state_dict().items()}
    save_file(weights, str(folder / TRAINABLE))
    metadata = {
        "stage": stage_spec["name"], "stage_index": objective - 1, "step": steps,
        "samples_seen": steps * BATCH, "world_size": 1, "zero_stage": 2, "spec": job,
        "saved_at": time.time(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (folder / METADATA).write_text(json.dumps(metadata, indent=1))
    (folder / METRICS).write_text("")
    complete = {"stage": stage_spec["name"], "step": steps, "checkpoint": str(folder)}
    (folder.parent / COMPLETE).write_text(json.dumps(complete))
    return Trained(trained.eval(), folder)


def random_batch(model: Blip2Pretrainer, seed: int) -> dict[str, torch.Tensor]:
    """A batch of random images and captions for ``model``'s objective (BERT or LLM tokens)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    texts = captions(BATCH, seed)
    if model.objective == 1:
        tokenizer = build_qformer_tokenizer(model.spec.qformer)
        enc = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"]}
    tokenizer = build_llm_tokenizer(model.spec.llm)
    enc = tokenizer([t + tokenizer.eos_token for t in texts], padding="max_length", max_length=8,
                    return_tensors="pt")
    return {"pixel_values": pixels, "llm_input_ids": enc["input_ids"],
            "llm_attention_mask": enc["attention_mask"]}
