"""The device a benchmark measures: which one, the peak it is measured against, a clock for the
phases of a step, and its peak memory."""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UsageError

KNOWN_BF16_PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gb200",), 2500.0),
    (("b200",), 2250.0),
    (("gh200",), 989.0),
    (("h200", "nvl"), 836.0),
    (("h200",), 989.0),
    (("h100", "nvl"), 835.0),
    (("h100", "pcie"), 756.0),
    (("h100",), 989.0),  # SXM
    (("a100",), 312.0),
    (("a800",), 312.0),
    (("a30",), 165.0),
    (("a40",), 149.7),
    (("a10",), 125.0),
    (("l40s",), 362.0),
    (("l40",), 181.0),
    (("l4",), 121.0),
)
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s by the words of a GPU's name: NVIDIA's
datasheet figures (which give twice these "with sparsity"), as torchtitan and nanochat tabulate
them. Every word must appear in the lower-cased name, split at non-alphanumerics; the first match
wins, so variants come before their family. Not listed, and so measured: the A10G (AWS's part,
without an NVIDIA datasheet), V100 and T4 (no bf16), and anything newer."""


class BenchError(UsageError):
    """A benchmark cannot run as asked (no such device, a batch size the objective cannot use...)."""


@dataclass(frozen=True)
class Peak:
    """What achieved FLOP/s are compared with.

    Attributes:
        flops_per_s: The peak.
        source: Where it comes from, in words.
    """

    flops_per_s: float
    source: str


def pick_device(choice: str) -> torch.device:
    """``auto`` (the GPU if there is one), ``cpu`` or ``cuda``.

    Raises:
        BenchError: ``cuda`` without a usable GPU.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise BenchError(f"--device: must be auto, cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def known_bf16_peak(name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU named ``name`` from :data:`KNOWN_BF16_PEAKS`, or None."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for pattern, tflops in KNOWN_BF16_PEAKS:
        if set(pattern) <= words:
            return tflops * 1e12
    return None


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, *, seconds: float = 0.3) -> float:
    """FLOP/s of square matrix products in ``dtype`` on ``device``, the best of repeated timings.

    8192-wide on a GPU (large enough to fill it), 1024-wide on a CPU.
    """
    side = 8192 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    out = torch.empty(side, side, device=device, dtype=dtype)
    best, spent, repeats = 0.0, 0.0, 1
    torch.mm(a, b, out=out)  # warm-up: kernel selection, thread pools
    while spent < seconds:
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        _synchronize(device)
        elapsed = time.perf_counter() - started
        best = max(best, 2 * side**3 * repeats / elapsed)
        spent += elapsed
        repeats *= 2
    return best


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The datasheet bf16 peak of a known GPU; otherwise a measured matrix-product peak."""
    name = device_name(device)
    if device.type == "cuda" and dtype == torch.bfloat16:
        known = known_bf16_peak(name)
        if known is not None:
            return Peak(known, f"dense bf16 datasheet peak of {name}")
    measured = measured_matmul_peak(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    return Peak(measured, f"measured {dtype_name} matmul peak of {name} (no datasheet figure)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Named points in time within one step; a phase lasts from the point before its mark to it.

    On a GPU the points are CUDA events: the GPU's own timeline, read after one synchronisation
    at the end, so the clock does not stall the asynchronous work it times. On a CPU: wall clock.
    Marks may come from autograd's backward thread.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._points: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        """End the phase ``name`` now."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._points.append((name, event))
        else:
            self._points.append((name, time.perf_counter()))

    def phases(self) -> dict[str, float]:
        """Seconds of each phase, in order (the first mark only starts the clock)."""
        _synchronize(self.device)
        phases = {}
        for (_, start), (name, end) in zip(self._points, self._points[1:]):
            if self.device.type == "cuda":
                phases[name] = start.elapsed_time(end) / 1000
            else:
                phases[name] = end - start
        return phases


def reset_peak_memory(device: torch.device) -> None:
    """Start :func:`peak_memory`'s count now, where the device allows it (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes and what they are: CUDA's max allocated since :func:`reset_peak_memory`, or on
    a CPU the process's peak resident set, which cannot be reset (it covers the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated during the timed steps"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process peak RSS (whole process so far)"
