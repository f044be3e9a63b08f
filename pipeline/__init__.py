"""qformer-pipeline: Ray-distributed data and pretraining pipeline for BLIP-2 style models.

The package imports without a running Ray cluster; ``pipeline.cli`` is the thin command-line
layer over the library modules.
"""

__version__ = "0.1.0"
