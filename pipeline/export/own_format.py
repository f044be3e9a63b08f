"""Our own export format: the trained weights plus the config that rebuilds the model.

Used when transformers' Blip2 classes cannot compute the model exactly (another vision tower
than ``Blip2VisionModel``, say), or when asked for. The folder holds::

    trainable.safetensors   the checkpoint's trainable weights, unchanged (HF Blip2 names)
    qformer_export.json     format, stage, the model spec, source checkpoint, versions, and why
                            a transformers export was not possible
    README.md               what the files are and how to load them

The frozen towers are not copied: :func:`load_exported` loads them from the names in the model
spec (hub ids, ``pypi:``/``tiny:`` names, or absolute local folders), as training did.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from pipeline.checkpoint.format import TRAINABLE
from pipeline.checkpoint.lookup import TrainedCheckpoint
from pipeline.checkpoint.rebuild import rebuild_model
from pipeline.export.record import FORMAT_VERSION, OWN_FORMAT, export_record, read_record, write_record
from pipeline.export.source import ExportError
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.spec.model import ModelSpec


def write_own_folder(
    source: TrainedCheckpoint, weights: bytes, out_dir: Path, *, blockers: list[str]
) -> dict:
    """Write the own-format folder of a checkpoint.

    Args:
        source: The checkpoint.
        weights: Its ``trainable.safetensors`` bytes, copied unchanged.
        out_dir: An existing, empty folder.
        blockers: Why the transformers format was not used (empty: it was not asked for).

    Returns:
        The export record written to ``qformer_export.json``.
    """
    (out_dir / TRAINABLE).write_bytes(weights)
    record = export_record(source, OWN_FORMAT, transformers_blockers=blockers)
    write_record(out_dir, record)
    (out_dir / "README.md").write_text(_readme(record))
    return record


def load_exported(folder: str | Path) -> Blip2Pretrainer:
    """Rebuild the trained model from an own-format export folder.

    Args:
        folder: A folder written by ``qformer export`` in our own format.

    Returns:
        The model of the exported stage, trained weights loaded, in eval mode.

    Raises:
        ExportError: The folder is not an own-format export, or its weights do not fit its spec.

    Example:
        >>> model = load_exported("exports/demo-stage2")
        >>> captions = generate_captions(model, tokenizer, images)
    """
    folder = Path(folder)
    try:
        record = read_record(folder)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from err
    if record.get("format") != OWN_FORMAT:
        raise ExportError(
            f"{folder} is a {record.get('format')!r} export; load it with transformers' "
            f"{record.get('transformers_class', 'Blip2')}.from_pretrained"
        )
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"{folder} has format version {record['format_version']}; this code reads up to {FORMAT_VERSION}"
        )
    spec = ModelSpec.model_validate(record["model"])
    weights = load_file(folder / TRAINABLE)
    return rebuild_model(spec, record["stage"], weights, str(folder / TRAINABLE))


def _readme(record: dict) -> str:
    blockers = record["transformers_blockers"]
    why = (
        "It is in qformer-pipeline's own format because transformers' Blip2 classes cannot "
        "compute this model exactly:\n\n" + "".join(f"- {reason}\n" for reason in blockers)
        if blockers
        else "It is in qformer-pipeline's own format because that was asked for "
        "(`qformer export --format own`).\n"
    )
    return (
        f"# BLIP-2 Q-Former exported by `qformer export` (own format)\n\n"
        f"Trained by qformer-pipeline, stage `{record['stage_name']}` (model stage "
        f"{record['stage']}), step {record['step']}; source checkpoint `{record['checkpoint']}`.\n"
        f"{why}\n"
        "Files:\n\n"
        f"- `{TRAINABLE}`: the trained weights, unchanged from the checkpoint, under "
        "transformers' Blip2 parameter names (`query_tokens`, `qformer.*`, `ln_vision.*` = "
        "`vision_model.post_layernorm`, and for stage 1 `embeddings.*`, `vision_projection`, "
        "`text_projection`, `itm_head`, the ITG head `lm_head.*` and the ITC temperature `temp`; "
        "for stage 2 `language_projection`).\n"
        "- `qformer_export.json`: the model spec (towers, Q-Former shape), the stage, the source "
        "checkpoint, library versions, and the reasons above.\n\n"
        "The frozen vision tower and LLM are not in this folder; the loader takes them from the "
        "names in the model spec (`model.vision.name`, `model.llm.name`), which must be "
        "reachable where the folder is loaded.\n\n"
        "```python\n"
        "from pipeline.export import load_exported\n\n"
        "model = load_exported(FOLDER)  # a pipeline.model.Blip2Pretrainer, in eval mode\n"
        "```\n"
    )
