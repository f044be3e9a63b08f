"""Tiny curation models: our own stage-1/stage-2 checkpoints (written as training writes them, not
trained) and transformers BLIP, CLIP and SigLIP models built from configs and saved with
``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    BertTokenizer,
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from pipeline.assets import tiny_model_section
from pipeline.model import Blip2Pretrainer
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.model.tiny import caption_vocab


def tiny_job(prepared: str) -> dict:
    """A two-stage job over the tiny towers, as a spec mapping (only its spec matters here)."""
    return {
        "run": {"name": "tiny", "storage": "runs"},
        "model": tiny_model_section(num_query_tokens=4, embed_dim=16),
        "data": {"prepared": prepared},
        "deepspeed": {"precision": "fp32"},
        "stages": [{"name": "stage1", "losses": {"itc": 1.0, "itm": 1.0}, "steps": 3, "batch_size": 4},
                   {"name": "stage2", "losses": {"lm": 1.0}, "steps": 3, "batch_size": 4}],
    }


def write_checkpoint(folder: Path, prepared: str, stage_index: int, seed: int = 0) -> Path:
    """A checkpoint folder of a freshly initialised tiny model (``trainable.safetensors`` +
    ``metadata.json``), inside a stage folder that names it as its final checkpoint."""
    job = validate_spec(tiny_job(prepared), JobSpec)
    stage = job.stages[stage_index]
    torch.manual_seed(seed)
    model = Blip2Pretrainer(job.model, objective=stage.objective, loss_weights=stage.losses)
    if stage.objective == 2:  # a wide projection: the random LLM's next tokens vary with the image
        with torch.no_grad():
            model.language_projection.weight.normal_(0, 2.0)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, str(folder / "trainable.safetensors"))
    metadata = {"stage": stage.name, "stage_index": stage_index, "step": 3, "world_size": 1,
                "spec": job.model_dump(mode="json")}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    (folder.parent / "complete.json").write_text(json.dumps({"checkpoint": str(folder), "step": 3}))
    return folder


def _bert_tokenizer(out: Path) -> BertTokenizerFast:
    vocab = caption_vocab()
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(out)
    return BertTokenizerFast.from_pretrained(out)


def save_tiny_blip(out: Path) -> Path:
    """A tiny ``BlipForConditionalGeneration`` captioner with its processor (32 px images)."""
    tokenizer = _bert_tokenizer(out / "tokenizer")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
                bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
                sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


def _dual_encoder_configs(tokenizer: BertTokenizerFast) -> tuple[dict, dict]:
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    return text, vision


def save_tiny_clip(out: Path) -> Path:
    """A tiny ``CLIPModel`` with its processor (a WordPiece tokenizer stands in for CLIP's BPE)."""
    tokenizer = _bert_tokenizer(out / "tokenizer")
    tokenizer.model_max_length = 16
    torch.manual_seed(0)
    text, vision = _dual_encoder_configs(tokenizer)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


def save_tiny_siglip(out: Path) -> Path:
    """A tiny ``SiglipModel`` with its processor."""
    tokenizer = _bert_tokenizer(out / "tokenizer")
    tokenizer.model_max_length = 16
    torch.manual_seed(0)
    text, vision = _dual_encoder_configs(tokenizer)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(out)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                    tokenizer=tokenizer).save_pretrained(out)
    return out
