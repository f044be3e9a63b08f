"""Model-based curation of prepared shards (``qformer curate``): near-duplicate images, BLIP's
CapFilt (synthetic captions, every caption ranked by image-text similarity, the best kept), and
score filters, with a provenance row for every sample.

Modules: ``run`` (the phases and the manifest), ``work`` (each phase on one shard, in a Ray Data
actor), ``tasks`` (a shard and its files), ``captioners`` and ``rankers`` (the models),
``sources`` (checkpoints or transformers models), ``select`` (which captions and samples are
kept).
"""
