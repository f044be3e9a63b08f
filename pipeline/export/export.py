"""``qformer export``: a training checkpoint as a transformers Blip2 folder, or in our own format.

The trained weights come from the checkpoint (``trainable.safetensors``, already consolidated over
ZeRO ranks); the frozen towers from the names in the checkpoint's model spec. The folder is
written under a temporary name and moved into place when complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.checkpoint.format import read_trainable
from pipeline.checkpoint.lookup import TrainedCheckpoint
from pipeline.checkpoint.rebuild import rebuild_model
from pipeline.export.compat import transformers_blockers
from pipeline.export.own_format import write_own_folder
from pipeline.export.record import EXPORT_RECORD, OWN_FORMAT
from pipeline.export.source import ExportError, resolve_checkpoint
from pipeline.export.transformers_format import write_transformers_folder
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.model.llm import build_llm_tokenizer
from pipeline.model.qformer import build_qformer_tokenizer

ExportFormat = Literal["auto", "transformers", "own"]

log = logging.getLogger("qformer.export")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        out_dir: The export folder.
        record: Its ``qformer_export.json`` (``record["format"]`` is ``"transformers"`` or
            ``"qformer"``).
        blockers: Why the transformers format was not possible (empty if it was, or not tried).
    """

    out_dir: Path
    record: dict
    blockers: list[str]


def export_checkpoint(
    checkpoint: str,
    out_dir: str | Path,
    *,
    stage: str | None = None,
    export_format: ExportFormat = "auto",
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a training checkpoint.

    Args:
        checkpoint: A checkpoint folder, a finished stage folder, or a run folder with ``stage``;
            local or ``s3://``.
        out_dir: Local folder to create.
        stage: Stage name (needed for a run folder).
        export_format: ``"transformers"`` (an error when not exactly representable), ``"own"``,
            or ``"auto"``: transformers when representable, else our own format.
        storage_options: fsspec options for an ``s3://`` checkpoint.
        overwrite: Replace ``out_dir`` if it is an earlier export.

    Returns:
        What was written.

    Raises:
        CheckpointError: Missing or invalid checkpoint.
        ExportError: Unusable ``out_dir``, or a transformers export asked for a model it cannot
            represent.
    """
    source = resolve_checkpoint(checkpoint, stage=stage, storage_options=storage_options)
    out = _check_out_dir(Path(out_dir), overwrite)
    log.info(
        "export: %s (stage %s, model stage %d, step %d)",
        source.location.url, source.stage.name, source.objective, source.step,
    )
    weights, weights_file = read_trainable(source.location)  # parsed: an unreadable file is refused
    if export_format == "own":
        return _write(out, lambda folder: write_own_folder(source, weights_file, folder, blockers=[]), [])

    model = _build_model(source, weights)
    tokenizer = _processor_tokenizer(source)
    blockers = transformers_blockers(model, tokenizer)
    if not blockers:
        log.info("export: writing a transformers Blip2 folder to %s", out)
        return _write(out, lambda folder: write_transformers_folder(model, tokenizer, source, folder), [])
    if export_format == "transformers":
        raise ExportError("not exactly representable as a transformers Blip2 model: " + "; ".join(blockers))
    log.info("export: transformers' Blip2 classes cannot compute this model exactly (%s); "
             "writing our own format to %s", "; ".join(blockers), out)
    return _write(out, lambda folder: write_own_folder(source, weights_file, folder, blockers=blockers),
                  blockers)


def _check_out_dir(out: Path, overwrite: bool) -> Path:
    if "://" in str(out):
        raise ExportError(f"OUT_DIR must be a local folder, got {out}")
    out = out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"{out} exists and is not empty (--overwrite replaces an earlier export)")
        if not (out / EXPORT_RECORD).is_file():
            raise ExportError(f"{out} is not an earlier export (no {EXPORT_RECORD}); not replacing it")
    return out


def _write(out: Path, write: Callable[[Path], dict], blockers: list[str]) -> ExportResult:
    """Run ``write(folder)`` on a staging folder beside ``out``, then move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        record = write(staging)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kind = "our own format" if record["format"] == OWN_FORMAT else record["transformers_class"]
    log.info("export: wrote %s (%s)", out, kind)
    return ExportResult(out, record, blockers)


def _build_model(source: TrainedCheckpoint, weights: dict[str, torch.Tensor]) -> Blip2Pretrainer:
    """Our model with the frozen towers of the spec and the checkpoint's trained weights."""
    spec = source.job.model
    log.info("export: loading the frozen towers (vision %s%s)", spec.vision.name,
             f", LLM {spec.llm.name}" if source.objective == 2 else "")
    return rebuild_model(spec, source.objective, weights, source.location.url)


def _processor_tokenizer(source: TrainedCheckpoint):
    """The tokenizer the exported processor uses: the Q-Former's (stage 1) or the LLM's (stage 2)."""
    spec = source.job.model
    if source.objective == 1:
        tokenizer = build_qformer_tokenizer(spec.qformer)
        tokenizer.model_max_length = spec.qformer.max_text_length  # truncate as training did
    else:
        tokenizer = build_llm_tokenizer(spec.llm)
        tokenizer.padding_side = "left"  # prompts of a batch end where generation starts
    return tokenizer
