"""``qformer bench towers``: four workers on one node hold a bfloat16 SmolLM2 once when they map
the node's file, where each held its own copy before."""

from __future__ import annotations

import pytest

from pipeline.assets import SMOLLM2
from pipeline.bench.towers import WORKER_OVERHEAD_BYTES, host_memory, measure_towers
from pipeline.spec.model import LLMSpec

WORKERS = 4


def test_host_memory_counts_shared_pages_once_in_pss():
    memory = host_memory()
    assert 0 < memory.pss <= memory.rss <= memory.peak_rss


@pytest.mark.slow
def test_four_workers_hold_the_tower_once(ray_2cpus):
    # bfloat16 from SmolLM2's float32 file: each worker's own copy is a cast, nothing shared.
    spec = LLMSpec(name=SMOLLM2, dtype="bfloat16")
    own = measure_towers(spec, WORKERS, shared=False)
    mapped = measure_towers(spec, WORKERS, shared=True)

    assert mapped.tower_bytes == own.tower_bytes > 200 * 2**20
    # Summed PSS: the tower once (+10%), plus each worker's overhead (WORKER_OVERHEAD_BYTES).
    assert mapped.pss <= mapped.tower_bytes * 1.10 + WORKERS * WORKER_OVERHEAD_BYTES
    # Before: a copy in each worker, the same bound missed by far.
    assert own.pss > WORKERS * own.tower_bytes * 0.95
    # RSS counts the shared pages in every worker: it cannot tell the two apart.
    assert mapped.rss > WORKERS * mapped.tower_bytes
