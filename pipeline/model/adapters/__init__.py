"""State-dict adapters: our BLIP-2 weights to and from other formats, as pure name and shape
mappings (no files are read or written here; ``pipeline.checkpoint.sources`` reads, and
``pipeline.export`` writes).

- :mod:`~pipeline.model.adapters.transformers_blip2`: transformers' ``Blip2ForImageTextRetrieval``,
  ``Blip2ForConditionalGeneration`` and ``Blip2Model``.
- :mod:`~pipeline.model.adapters.lavis`: LAVIS's ``blip2``/``blip2_opt`` checkpoints.
"""
