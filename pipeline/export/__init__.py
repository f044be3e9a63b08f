"""Export trained checkpoints: transformers Blip2 model folders, or our own format.

Typical use::

    from pipeline.export import export_checkpoint, load_exported

    result = export_checkpoint("runs/demo/stage2", "exports/demo-stage2")
    if result.record["format"] == "qformer":     # transformers could not represent it exactly
        model = load_exported("exports/demo-stage2")

Modules: ``source`` (find the checkpoint, read its weights), ``compat`` (is the
model exactly representable by transformers' Blip2 classes), ``transformers_format`` and
``own_format`` (the two folder writers; the latter also loads), ``record`` (the
``qformer_export.json`` both write), ``export`` (the command's flow).
"""

from pipeline.export.export import ExportFormat, ExportResult, export_checkpoint
from pipeline.export.own_format import load_exported
from pipeline.export.source import ExportError

__all__ = ["ExportError", "ExportFormat", "ExportResult", "export_checkpoint", "load_exported"]
