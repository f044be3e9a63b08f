"""Write a trained model as a transformers Blip2 model folder: weights, config, processor.

Stage 1 becomes ``Blip2ForImageTextRetrieval`` (ITC similarities and ITM logits), stage 2
``Blip2ForConditionalGeneration`` (captioning through the frozen LLM). The names are mapped by
:mod:`pipeline.model.adapters.transformers_blip2`, which ``init_from`` reads such folders with:
``ln_vision`` becomes the tower's ``vision_model.post_layernorm``, and the pretraining-only
``lm_head`` (ITG) and ``temp`` (ITC temperature), which transformers' classes have no place for,
go beside the model in ``qformer_pretraining.safetensors``, so that a stage can continue from the
export exactly. Call only when :func:`pipeline.export.compat.transformers_blockers` finds
nothing: then the folder computes exactly what our model does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    Blip2Config,
    Blip2Processor,
    CLIPImageProcessorPil,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import PILImageResampling

from pipeline.export.compat import IMAGE_TOKEN, image_token_id
from pipeline.export.record import TRANSFORMERS_FORMAT, export_record, write_record
from pipeline.export.source import ExportError
from pipeline.model.adapters.transformers_blip2 import (
    PRETRAINING_FILE,
    TRANSFORMERS_CLASSES,
    pretraining_only,
    to_transformers,
)
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.model.vision import image_preprocessing
from pipeline.checkpoint.lookup import TrainedCheckpoint


def blip2_state_dict(model: Blip2Pretrainer) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' Blip2 names, in float32 (frozen weights held in 16
    bits are widened exactly), without the pretraining-only ones."""
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in to_transformers(model.full_state_dict()).items()}


def blip2_config(model: Blip2Pretrainer, image_token_index: int) -> Blip2Config:
    """The ``Blip2Config`` of the exported model.

    Args:
        model: The trained model.
        image_token_index: Id of ``<image>`` in the processor's tokenizer. Stage 1: the
            retrieval model strips the first ``num_query_tokens`` ids (the processor's image
            tokens) from its text input; stage 2: these ids mark where the visual prompt goes.
    """
    sub_configs = {
        "vision_config": model.vision_model.config.to_dict(),
        "qformer_config": model.qformer.config.to_dict(),
    }
    if model.objective == 2:
        sub_configs["text_config"] = model.language_model.config.to_dict()
    for sub_config in sub_configs.values():
        sub_config["dtype"] = "float32"
    config = Blip2Config(
        **sub_configs,
        num_query_tokens=model.num_query_tokens,
        image_text_hidden_size=model.spec.qformer.embed_dim,
        image_token_index=image_token_index,
    )
    config.dtype = torch.float32
    return config


def build_transformers_model(model: Blip2Pretrainer, config: Blip2Config) -> PreTrainedModel:
    """The transformers model holding ``model``'s weights (shared where already float32).

    Raises:
        ExportError: The names or shapes do not map one to one (a bug, never a partial export).
    """
    cls = TRANSFORMERS_CLASSES[model.objective]
    with torch.device("meta"):  # no random init of towers that are overwritten anyway
        exported = cls(config)
    state = blip2_state_dict(model)
    try:
        missing, unexpected = exported.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise ExportError(f"weights do not fit {cls.__name__}: {err}") from err
    if missing or unexpected:
        raise ExportError(
            f"weights do not map onto {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if model.objective == 2:
        exported.generation_config = copy.deepcopy(model.language_model.generation_config)
    return exported.eval()


def build_processor(model: Blip2Pretrainer, tokenizer: PreTrainedTokenizerBase) -> Blip2Processor:
    """``Blip2Processor`` preparing images and text as our data pipeline did.

    Images: shorter side resized to the training size (bicubic), centre square crop, scaled to
    [0, 1] and normalised with the tower's mean and std. Text: ``tokenizer`` (the Q-Former's for
    stage 1, the LLM's for stage 2), after ``num_query_tokens`` ``<image>`` placeholders.
    """
    prep = image_preprocessing(model.spec.vision)
    # The PIL implementation, which needs no torchvision; it is saved as a CLIPImageProcessor.
    images = CLIPImageProcessorPil(
        size={"shortest_edge": prep.image_size},
        crop_size={"height": prep.image_size, "width": prep.image_size},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=list(prep.mean),
        image_std=list(prep.std),
        do_convert_rgb=True,
    )
    # Blip2Processor adds <image> to the tokenizer it is given.
    return Blip2Processor(images, copy.deepcopy(tokenizer), num_query_tokens=model.num_query_tokens)


def write_transformers_folder(
    model: Blip2Pretrainer,
    tokenizer: PreTrainedTokenizerBase,
    source: TrainedCheckpoint,
    out_dir: Path,
) -> dict:
    """Write ``model`` as a transformers folder loadable with ``from_pretrained``.

    Args:
        model: The trained model, trainable weights loaded.
        tokenizer: The processor's tokenizer (see :func:`build_processor`).
        source: The checkpoint it came from.
        out_dir: An existing, empty folder.

    Returns:
        The export record written to ``qformer_export.json``.
    """
    token_id = image_token_id(tokenizer)
    exported = build_transformers_model(model, blip2_config(model, token_id))
    exported.save_pretrained(out_dir)
    beside = pretraining_only(model.trainable_state_dict())
    if beside:
        save_file({name: t.float().contiguous() for name, t in beside.items()}, str(out_dir / PRETRAINING_FILE))
    processor = build_processor(model, tokenizer)
    processor.save_pretrained(out_dir)
    if processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != token_id:
        raise ExportError(f"the processor gave {IMAGE_TOKEN} another id than {token_id}")
    details = {
        "transformers_class": type(exported).__name__,
        "image_token_index": token_id,
        # Beside the model, in PRETRAINING_FILE: transformers ignores them, init_from loads them.
        "pretraining_only": sorted(beside),
        # 16-bit frozen towers run in float32 here unless loaded with a 16-bit dtype: outputs
        # then agree to 16-bit precision rather than exactly (see the README).
        "stored_dtype": "float32",
        "frozen_tower_dtypes": {"vision": model.spec.vision.dtype,
                                **({"llm": model.spec.llm.dtype} if model.objective == 2 else {})},
    }
    if model.objective == 1:
        details["temperature"] = float(model.temp.detach().clamp(
            model.spec.losses.min_temperature, model.spec.losses.max_temperature))
    record = export_record(source, TRANSFORMERS_FORMAT, **details)
    write_record(out_dir, record)
    (out_dir / "README.md").write_text(_readme(model, record))
    return record


def _readme(model: Blip2Pretrainer, record: dict) -> str:
    cls, q = record["transformers_class"], model.num_query_tokens
    head = (
        f"# BLIP-2 `{cls}` exported by `qformer export`\n\n"
        f"Trained by qformer-pipeline, stage `{record['stage_name']}` (model stage "
        f"{record['stage']}), step {record['step']}; source checkpoint `{record['checkpoint']}`.\n"
        "This folder loads with plain transformers and computes what the trained model computes "
        "(see Precision below; the export tests compare them).\n\n"
        "Files: `config.json` + `model.safetensors` (the whole model in float32: frozen towers "
        "and trained parts), processor and tokenizer files, `qformer_export.json` (the source, "
        "the model spec, versions, what transformers has no place for) and this README.\n\n"
    )
    dtypes = set(record["frozen_tower_dtypes"].values())
    if dtypes == {"float32"}:
        precision = "Precision: everything is float32, as in training; the outputs equal ours.\n\n"
    else:
        precision = (
            f"Precision: training ran the frozen towers in {' and '.join(sorted(dtypes))} and the "
            "trained parts in float32. Everything is stored in float32 here (16-bit weights widen "
            "exactly), so loaded as it is the towers compute in float32 and the outputs agree "
            "with training's to 16-bit precision, not bit for bit. `dtype=torch.bfloat16` runs "
            "all but the Q-Former and the query tokens in 16 bits.\n\n"
        )
    images = (
        "Images: the processor resizes the shorter side to the training size (bicubic), crops "
        "the centre square and normalises with the vision tower's mean and std, as the training "
        "data pipeline did.\n\n"
    )
    if model.objective == 1:
        usage = (
            "```python\n"
            "from transformers import Blip2ForImageTextRetrieval, Blip2Processor\n\n"
            "model = Blip2ForImageTextRetrieval.from_pretrained(FOLDER).eval()\n"
            "processor = Blip2Processor.from_pretrained(FOLDER)\n"
            "inputs = processor(images=images, text=captions, padding=True, truncation=True, "
            "return_tensors=\"pt\")\n"
            "itm = model(**inputs, use_image_text_matching_head=True).logits_per_image  "
            "# (B, 2): (no match, match) per image/caption pair\n"
            "itc = model(**inputs).logits_per_image  # (B_images, B_captions) cosine similarity\n"
            "```\n\n"
            f"Captions go through the Q-Former's BERT tokenizer (`[CLS] caption [SEP]`, at most "
            f"{model.spec.qformer.max_text_length} tokens as in training); the processor puts "
            f"{q} `<image>` ids (id {record['image_token_index']}) in front, which the model strips "
            "(`config.image_token_index`).\n\n"
            "ITC: transformers returns the cosine similarity (max over the queries) with no "
            f"temperature; the training logits were these divided by the learnt temperature "
            f"{record['temperature']:.6g}. Rankings are the same.\n\n"
            "Pretraining only, with no place in `Blip2ForImageTextRetrieval`: the ITG head "
            "`lm_head.*` (BERT masked-LM head on the caption embeddings) and the temperature "
            f"`temp`. They are in `{PRETRAINING_FILE}` beside the model, which transformers "
            "ignores; a qformer-pipeline stage given this folder as `init_from` loads them too.\n"
        )
    else:
        usage = (
            "```python\n"
            "from transformers import Blip2ForConditionalGeneration, Blip2Processor\n\n"
            "model = Blip2ForConditionalGeneration.from_pretrained(FOLDER).eval()\n"
            "processor = Blip2Processor.from_pretrained(FOLDER)\n"
            "inputs = processor(images=images, text=[\"\"] * len(images), return_tensors=\"pt\")\n"
            "ids = model.generate(**inputs, max_new_tokens=30, do_sample=False)\n"
            "captions = processor.batch_decode(ids[:, inputs[\"input_ids\"].shape[1]:], "
            "skip_special_tokens=True)\n"
            "```\n\n"
            f"The processor puts {q} `<image>` ids (id {record['image_token_index']}, a spare row "
            "of the LLM's embedding table) before the text; the model puts the projected query "
            "outputs there. `text=\"\"` starts the caption as training did (after the LLM "
            "tokenizer's own leading special tokens, if it adds any); a text prompt goes there "
            "too. Give `do_sample=False` for the deterministic decoding of `qformer eval`.\n"
        )
    return head + usage + "\n" + images + precision
