"""``qformer bench towers``: host memory of a frozen LLM in N workers on one node, loaded by each
worker (as before towers were shared) vs mapped from the node's one file.

N Ray actors on this node (Ray Train's workers are actors too) each load the LLM of a spec and
run it once on a few tokens, so every weight page it computes with is in memory; then, with every
worker holding its tower, each worker's memory is read from ``/proc``. RSS counts a page shared
by N processes N times; PSS (proportional set size) counts 1/N of it in each, so the PSS summed
over workers is what the node really holds. Each worker's figures are taken relative to its own
before it loaded anything (its imported libraries are the same in both modes), and compared with
the tower's bytes: about N times them when each worker loads its own copy, about once when they
map the node's file. The node's file is deleted first, so the shared figures include its build.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.assets import SMOLLM2, resolve_model
from pipeline.spec.model import DType, LLMSpec

TARGET_OVERHEAD = 0.10
"""The shared towers' summed PSS may exceed the tower's bytes by this fraction (plus each worker's
own overhead, :data:`WORKER_OVERHEAD_BYTES`)."""

WORKER_OVERHEAD_BYTES = 48 * 2**20
"""What a worker may add besides the tower: the model classes' modules imported at load, the
skeleton's Python objects and non-persistent buffers, one forward's activations and allocator
slack. Measured at about 21 MB a worker for SmolLM2 in either mode (PSS added beyond the
tower's share), bounded with room to spare."""


@dataclass(frozen=True)
class HostMemory:
    """A process's resident memory, in bytes.

    Attributes:
        rss: Resident pages, shared ones counted whole.
        pss: Resident pages, each shared page divided by the number of processes mapping it.
        peak_rss: The highest RSS the process has had (``VmHWM``).
    """

    rss: int
    pss: int
    peak_rss: int


def host_memory(pid: int | str = "self") -> HostMemory:
    """The resident memory of process ``pid`` (this one by default), from ``/proc`` (Linux)."""
    rollup = _kilobytes(Path(f"/proc/{pid}/smaps_rollup").read_text())
    status = _kilobytes(Path(f"/proc/{pid}/status").read_text())
    return HostMemory(rss=rollup["Rss"], pss=rollup["Pss"], peak_rss=status["VmHWM"])


def _kilobytes(text: str) -> dict[str, int]:
    """``Name:  123 kB`` lines as bytes by name."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's memory before it loaded the tower and while it holds it, after computing."""

    before: HostMemory
    holding: HostMemory

    @property
    def pss(self) -> int:
        """PSS the tower added."""
        return self.holding.pss - self.before.pss

    @property
    def rss(self) -> int:
        """RSS the tower added."""
        return self.holding.rss - self.before.rss


class TowerWorker:
    """A Ray actor that loads the LLM, computes with it once and reports its memory."""

    def __init__(self):
        import torch

        import pipeline.model.towers  # noqa: F401 (imported before the baseline, as in both modes)

        torch.set_num_threads(1)
        self.tower = None
        self.before = host_memory()

    def load(self, spec_json: str, shared: bool) -> int:
        """Load the LLM of ``spec_json`` (mapped from the node's file when ``shared``, else this
        worker's own copy), run it on a few tokens; returns the tower's bytes."""
        import torch

        from pipeline.model.llm import load_language_model
        from pipeline.model.towers import load_tower

        spec = LLMSpec.model_validate_json(spec_json)
        self.tower = load_tower("llm", spec) if shared else load_language_model(spec)
        with torch.no_grad():
            self.tower(torch.arange(8).view(1, 8))  # (1, 8) ids; the tied head reads every row
        tensors = [*self.tower.parameters(), *self.tower.buffers()]
        return sum({t.data_ptr(): t.nbytes for t in tensors}.values())

    def memory(self) -> WorkerMemory:
        """Memory before loading, and now."""
        return WorkerMemory(self.before, host_memory())


@dataclass(frozen=True)
class TowersRun:
    """N workers holding one tower, loaded one way."""

    shared: bool
    tower_bytes: int
    workers: list[WorkerMemory]

    @property
    def pss(self) -> int:
        """PSS the towers added, summed over workers: what the node holds for them."""
        return sum(worker.pss for worker in self.workers)

    @property
    def rss(self) -> int:
        """RSS the towers added, summed over workers (shared pages counted in each)."""
        return sum(worker.rss for worker in self.workers)

    @property
    def bound(self) -> int:
        """The most the shared towers may add: the tower once, +10%, plus each worker's overhead."""
        return int(self.tower_bytes * (1 + TARGET_OVERHEAD)) + len(self.workers) * WORKER_OVERHEAD_BYTES


def measure_towers(spec: LLMSpec, workers: int, *, shared: bool) -> TowersRun:
    """Start ``workers`` actors on this node, load the LLM in each (at once), measure, stop them.

    Ray must be running on this node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.model.towers import tower_file

    if shared:
        tower_file("llm", spec).unlink(missing_ok=True)  # measured with its build
    actor = ray.remote(num_cpus=0)(TowerWorker)
    node = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node, soft=False)
    actors = [actor.options(scheduling_strategy=strategy).remote() for _ in range(workers)]
    try:
        sizes = ray.get([a.load.remote(spec.model_dump_json(), shared) for a in actors])
        memory = ray.get([a.memory.remote() for a in actors])  # every worker holds its tower
    finally:
        for a in actors:
            ray.kill(a)
    return TowersRun(shared, sizes[0], memory)


def run_towers_benchmark(llm: str = SMOLLM2, dtypes: tuple[DType, ...] = ("float32", "bfloat16"),
                         workers: int = 4, out: str | None = None) -> dict:
    """Both ways of loading, for each dtype, side by side on the console; a JSON report to ``out``.

    Returns:
        The report: per dtype, the tower's bytes and each way's summed PSS and RSS, per-worker
        figures, and whether the shared towers met the target.
    """
    from pipeline.ray_runtime import ensure_ray

    resolve_model(llm)  # converted once, before the workers start
    ensure_ray()
    report = {"llm": llm, "workers": workers, "node": os.uname().nodename, "dtypes": {}}
    print(f"{llm}: {workers} workers on one node, memory the tower adds (summed over workers)")
    print(f"{'dtype':<10}{'tower MB':>10}{'own PSS':>10}{'own RSS':>10}{'mapped PSS':>12}{'mapped RSS':>12}"
          f"{'PSS ratio':>11}{'bound MB':>10}  target")
    for dtype in dtypes:
        spec = LLMSpec(name=llm, dtype=dtype)
        own, mapped = (measure_towers(spec, workers, shared=shared) for shared in (False, True))
        met = mapped.pss <= mapped.bound
        report["dtypes"][dtype] = {
            "tower_bytes": mapped.tower_bytes, "bound_bytes": mapped.bound, "target_met": met,
            **{name: {"pss": run.pss, "rss": run.rss, "workers": [asdict(w) for w in run.workers]}
               for name, run in (("own_copies", own), ("mapped", mapped))},
        }
        print(f"{dtype:<10}{_mb(mapped.tower_bytes):>10}{_mb(own.pss):>10}{_mb(own.rss):>10}"
              f"{_mb(mapped.pss):>12}{_mb(mapped.rss):>12}{own.pss / mapped.pss:>10.1f}x"
              f"{_mb(mapped.bound):>10}  {'met' if met else 'MISSED'}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"report: {out}")
    return report


def _mb(size: int) -> str:
    return f"{size / 2**20:.0f}"
