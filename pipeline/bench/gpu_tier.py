"""The GPU acceptance tier's checks, parametrised by device (``tests/gpu``; docs/gpu.md).

Each check returns its figures as a JSON-ready mapping; the GPU tests run them on CUDA at real
shapes, and a CPU test runs the very same functions on the CPU with tiny towers (skipping only
what needs CUDA: pinned memory), so that they do not rot between the times a GPU is at hand.

- :func:`bench_step`: ``qformer bench step`` for one objective, as a newcomer types it.
- :func:`engine_round_trips`: the real DeepSpeed engine in one process (a 1-rank NCCL group on a
  GPU, gloo on a CPU; no Ray), for each scenario (ZeRO stage, objective): a few steps of the
  training step, a checkpoint, a fresh engine resumed from it, the losses of both compared,
  the frozen towers' dtypes and placement, and captions generated on the device.
- :func:`pinned_transfer`: the loader's 8-bit batches, page-locked on a GPU, copied to the
  device and normalised there.

Nothing here imports Ray: a GPU machine with torch, transformers and the wheels docs/gpu.md
lists runs it all.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.assets import tiny_model_section

LOSS_TOLERANCE = {"cpu": 0.0, "cuda": 1e-3}
"""Largest relative difference between a resumed run's losses and the uninterrupted run's. A CPU
run is deterministic: equal to the bit. CUDA kernels may sum in another order from run to run
(atomics in the backward of embeddings and attention), so the two agree to bf16 rounding."""


@dataclass(frozen=True)
class Scenario:
    """One engine round trip.

    Attributes:
        zero_stage: DeepSpeed's ZeRO stage (0, 2 or 3).
        objective: 1 (ITC + ITM + ITG, captions by the ITG head) or 2 (LM through the frozen LLM,
            captions by the LLM).
        steps: Training steps of the uninterrupted run.
        resume_at: The step whose checkpoint the second engine resumes from.
        batch_size: Samples per step.
    """

    zero_stage: int
    objective: int
    steps: int = 4
    resume_at: int = 2
    batch_size: int = 4

    @property
    def name(self) -> str:
        return f"zero{self.zero_stage}-objective{self.objective}"


SCENARIOS = (Scenario(0, 1), Scenario(2, 1), Scenario(3, 1), Scenario(3, 2))
"""ZeRO-0, -2 and -3 on stage 1; ZeRO-3 (the one that partitions parameters) on stage 2 too."""

TIER_WHEELS = (
    "deepspeed", "einops", "hjson", "msgpack", "ninja", "psutil", "py-cpuinfo",  # DeepSpeed, built --no-deps
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # job specs
    "pyarrow", "pillow", "braceexpand",  # prepared shards and their JPEGs (the training loader, storage)
    "pytest", "pluggy", "iniconfig", "pygments",  # the tier itself
)
"""The distributions the tier's wheel folder holds (docs/gpu.md, .ci/gpu-wheels): everything the
tier imports beyond torch, transformers and what they require."""

BASE_DISTRIBUTIONS = ("torch", "transformers")
"""What a GPU machine is assumed to have, with everything they require."""

_LEFT_IMPORTABLE = ("pandas",)
"""Absent on a GPU machine, but not blockable by a ``None`` in ``sys.modules``: pyarrow looks
pandas up there and fails on ``None`` (where pandas is truly absent it does without it)."""


def offline_blocklist() -> tuple[str, ...]:
    """Top-level modules of every installed distribution that a GPU machine with only
    :data:`BASE_DISTRIBUTIONS` (and their requirements) and :data:`TIER_WHEELS` would lack: made
    unimportable, they let a CPU run show that the tier needs nothing else."""
    import importlib.metadata as metadata

    allowed = _requirement_closure(BASE_DISTRIBUTIONS) | {_canonical(name) for name in TIER_WHEELS}
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if (not any(_canonical(d) in allowed for d in dists) and module.isidentifier()
                and module not in ("pipeline", *_LEFT_IMPORTABLE)):
            blocked.add(module)
    return tuple(sorted(blocked))


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_closure(names: tuple[str, ...]) -> set[str]:
    """``names`` and, recursively, what each installed one requires (extras left out)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [_canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_canonical(requirement.name))
    return seen


_WITHOUT = """
import runpy, sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
module = sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _python(module: str, blocked: tuple[str, ...]) -> list[str]:
    """The command line running ``python -m module`` with ``blocked`` modules unimportable
    (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` answers None)."""
    return [sys.executable, "-c", _WITHOUT, ",".join(blocked), module]


def bench_step(*, preset: str, objective: int, device: str, out: Path, batch_size: int | None = None,
               steps: int = 3, blocked: tuple[str, ...] = (), timeout_s: float = 600) -> dict:
    """Run ``qformer bench step`` for one objective in its own process; its JSON report.

    Args:
        preset: ``tiny`` or ``paper``.
        objective: 1 or 2.
        device: ``cpu`` or ``cuda``.
        out: Where the command writes its report.
        batch_size: None lets the command choose (on a GPU: the largest power of two that fits).
        steps: Timed steps.
        blocked: Modules made unimportable in the command's process (:func:`offline_blocklist`).
        timeout_s: The command's time limit.

    Raises:
        RuntimeError: the command failed (its output's end in the message).
    """
    args = ["bench", "step", "--preset", preset, "--objective", str(objective), "--device", device,
            "--steps", str(steps), "--out", str(out)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    started = time.perf_counter()
    result = subprocess.run([*_python("pipeline", blocked), *args], capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"qformer {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                           f"\n{result.stderr[-4000:]}")
    report = json.loads(Path(out).read_text())
    report["command"] = "qformer " + " ".join(args)
    report["wall_s"] = time.perf_counter() - started
    report["stdout"] = result.stdout
    return report


def engine_round_trips(device: str, folder: Path, scenarios: tuple[Scenario, ...] = SCENARIOS,
                       *, blocked: tuple[str, ...] = (), timeout_s: float = 600) -> dict[str, dict]:
    """Run every scenario in one new process holding a 1-rank process group (``blocked``
    modules unimportable there); figures by name.

    A scenario that fails does not stop the others: its figures are ``{"error": ...}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    request = folder / "request.json"
    out = folder / "figures.json"
    request.write_text(json.dumps({"device": device, "folder": str(folder),
                                   "scenarios": [asdict(s) for s in scenarios]}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "DS_ACCELERATOR": "cpu" if device == "cpu" else "cuda"}
    result = subprocess.run([*_python("pipeline.bench.gpu_tier", blocked), str(request), str(out)],
                            capture_output=True, text=True, timeout=timeout_s, env=env)
    if not out.is_file():
        raise RuntimeError(f"the engine process failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-6000:]}")
    return json.loads(out.read_text())


def _main(request_path: str, out_path: str) -> None:
    """The engine process: one process group, the scenarios in turn, figures to ``out_path``."""
    import traceback

    import torch.distributed as dist

    request = json.loads(Path(request_path).read_text())
    device = torch.device(request["device"])
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    figures = {}
    try:
        for raw in request["scenarios"]:
            scenario = Scenario(**raw)
            try:
                figures[scenario.name] = round_trip(scenario, device, Path(request["folder"]) / scenario.name)
            except Exception:  # reported, and the next scenario runs
                figures[scenario.name] = {"error": traceback.format_exc()[-4000:]}
            print(f"{scenario.name}: {json.dumps(figures[scenario.name])[:2000]}", flush=True)
        Path(out_path).write_text(json.dumps(figures, indent=1))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Without the interpreter's teardown, where a DeepSpeed engine's native threads sometimes
    # abort the process after the work succeeded (see tests/train/helpers.py).
    os._exit(0)


def tier_job(scenario: Scenario, root: Path, precision: str = "bf16"):
    """The one-stage job of a scenario: tiny towers, the vision tower in float16 and the LLM in
    bfloat16 (each frozen tower in its own dtype, neither DeepSpeed's), ``precision`` training."""
    from pipeline.spec import JobSpec
    from pipeline.spec.loader import validate_spec

    model = tiny_model_section(num_query_tokens=4, embed_dim=16)
    model["vision"]["dtype"], model["llm"]["dtype"] = "float16", "bfloat16"
    losses = {"itc": 1.0, "itm": 1.0, "itg": 1.0} if scenario.objective == 1 else {"lm": 1.0}
    raw = {
        "run": {"name": "gpu-tier", "storage": str(root / "runs"), "seed": 7},
        "scaling": {"workers": 1, "cpus_per_worker": 1},
        "model": model,
        "data": {"prepared": str(root / "unused"), "decode_threads": 1, "prefetch_batches": 2},
        "deepspeed": {"zero_stage": scenario.zero_stage, "precision": precision},
        "stages": [{"name": f"stage{scenario.objective}", "losses": losses, "steps": scenario.steps,
                    "batch_size": scenario.batch_size, "checkpoint_every": scenario.resume_at,
                    "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1}}],
    }
    return validate_spec(raw, JobSpec)


def round_trip(scenario: Scenario, device: torch.device, folder: Path) -> dict:
    """Train ``scenario.steps`` steps, checkpoint at ``resume_at``, resume a fresh engine from the
    checkpoint and train to the same step; the figures of both (inside a process group)."""
    from pipeline.bench.device import device_name
    from pipeline.train.engine import build_engine, engine_dtypes, select_accelerator
    from pipeline.train.state import gather_state

    select_accelerator(device)
    folder.mkdir(parents=True, exist_ok=True)
    job = tier_job(scenario, folder)
    loader = _loader(job, folder, pin_memory=device.type == "cuda")
    plan = _plan(job, scenario, device)
    placeholder = _placeholder(loader, plan)

    engine = build_engine(job, job.stages[0], plan, folder=None, saved=None, init_weights=None,
                          placeholder=placeholder, rank=0)
    towers = tower_report(engine)
    checkpoint = folder / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    saved = {"step": scenario.resume_at, "samples_seen": scenario.resume_at * scenario.batch_size}

    def save(step: int) -> None:
        if step == scenario.resume_at:
            started = time.perf_counter()
            gather_state(engine).save(checkpoint)
            timings["checkpoint_save_s"] = time.perf_counter() - started

    timings: dict[str, float] = {}
    straight, step_s = _train(engine, plan, loader, placeholder, 0, scenario.steps, after_step=save)
    dtypes = engine_dtypes(engine)
    del engine
    _release(device)

    started = time.perf_counter()
    engine = build_engine(job, job.stages[0], plan, folder=str(checkpoint), saved=saved, init_weights=None,
                          placeholder=placeholder, rank=0)
    timings["resume_s"] = time.perf_counter() - started
    resumed, _ = _train(engine, plan, loader, placeholder, scenario.resume_at, scenario.steps)
    captions, caption_s = _captions(engine, job, scenario, loader, plan)
    compared = straight[scenario.resume_at:]
    difference = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(compared, resumed))
    figures = {
        "device": device_name(device),
        "zero_stage": scenario.zero_stage,
        "objective": scenario.objective,
        "precision": job.deepspeed.precision,
        "batch_size": scenario.batch_size,
        "losses": straight,
        "resumed_losses": resumed,
        "resumed_from_step": scenario.resume_at,
        "max_relative_loss_difference": difference,
        "loss_tolerance": LOSS_TOLERANCE[device.type],
        "losses_equal": difference <= LOSS_TOLERANCE[device.type],
        "dtypes": dtypes,
        "towers": towers,
        "step_s_median": statistics.median(step_s),
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.iterdir()),
        **timings,
        "captions": captions,
        "caption_s": caption_s,
        "pinned_batches": loader.pin_memory,
    }
    if device.type == "cuda":
        figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del engine
    _release(device)
    return figures


def tower_report(engine) -> dict:
    """Where the frozen towers are and what they hold: their dtypes and devices, whether any
    parameter is partitioned by ZeRO-3 (``ds_id``) or empty, and whether any reached the
    trainable module's state dict."""
    towers = engine.module.towers
    held = {"vision": towers.vision, "llm": towers.language_model}
    return {
        "dtypes": {role: sorted({str(p.dtype).removeprefix("torch.") for p in tower.parameters()})
                   for role, tower in held.items() if tower is not None},
        "devices": sorted({str(p.device) for tower in towers.modules() for p in tower.parameters()}),
        "partitioned": any(hasattr(p, "ds_id") for tower in towers.modules() for p in tower.parameters()),
        "whole": all(p.numel() > 0 for tower in towers.modules() for p in tower.parameters()),
        "in_state_dict": [k for k in engine.module.state_dict() if k.startswith(("vision_model.", "language_model."))],
        "trainable_partitioned": any(hasattr(p, "ds_id") for p in engine.module.parameters()),
    }


def _loader(job, folder: Path, *, pin_memory: bool):
    """The training loader over a synthetic prepared shard of the job's shapes."""
    from pipeline.assets import model_config
    from pipeline.bench.decode import TextShape, synthetic_images, write_shard
    from pipeline.data.prepared import text_kind
    from pipeline.io.storage import Location
    from pipeline.model import image_preprocessing
    from pipeline.train.loader import LoaderConfig
    from pipeline.train.seeds import data_seed

    spec, stage = job.model, job.stages[0]
    texts = {"qformer": TextShape(spec.qformer.max_text_length, model_config(spec.qformer.bert).vocab_size),
             "llm": TextShape(12, model_config(spec.llm.name).vocab_size)}
    shard = write_shard(folder / "shard.parquet", synthetic_images(16), 4 * stage.batch_size * stage.steps, texts)
    return LoaderConfig(shards=(Location.of(str(shard)),), batch_size=stage.batch_size,
                        image_size=image_preprocessing(spec.vision).image_size, text=text_kind(stage.objective),
                        seed=data_seed(job.run.seed, 0), decode_threads=1, prefetch_batches=2,
                        pin_memory=pin_memory)


def _plan(job, scenario: Scenario, device: torch.device):
    from pipeline.data.batches import PixelNormalizer
    from pipeline.data.prepared import MODEL_INPUTS, text_kind
    from pipeline.model import image_preprocessing
    from pipeline.spec.losses import logged_fields
    from pipeline.train.step import StepPlan
    from pipeline.train.streams import StreamPlan

    pre = image_preprocessing(job.model.vision)
    return StepPlan(StreamPlan.of(1, 0, 1), job.deepspeed.gradient_accumulation_steps, scenario.batch_size,
                    job.run.seed, 0, logged_fields(scenario.objective),
                    MODEL_INPUTS[text_kind(scenario.objective)][1], device, PixelNormalizer(pre.mean, pre.std))


def _placeholder(loader, plan) -> dict[str, torch.Tensor]:
    from pipeline.data.batches import to_device
    from pipeline.train.loader import placeholder_batch

    return to_device(placeholder_batch(loader), plan.device, plan.normalizer)


def _train(engine, plan, loader, placeholder, start: int, stop: int, after_step=None) -> tuple[list[float], list[float]]:
    """Steps ``start`` to ``stop`` through the training step; each step's total loss and seconds."""
    from pipeline.train.loader import BatchStream
    from pipeline.train.step import train_step

    losses, seconds = [], []
    with BatchStream(loader, rank=0, world_size=1, start_step=start) as stream:
        for step in range(start, stop):
            started = time.perf_counter()
            sums = train_step(engine, plan, [stream], placeholder, step)
            losses.append(sums[0].item())  # waits for the device
            seconds.append(time.perf_counter() - started)
            if after_step is not None:
                after_step(step + 1)
    return losses, seconds


def _captions(engine, job, scenario: Scenario, loader, plan) -> tuple[list[str], float]:
    """Captions of the first batch's images, generated on the device by the trained model (under
    ZeRO-3, whose parameters are partitioned, by a plain copy holding the gathered weights, as
    periodic evaluation does)."""
    from pipeline.checkpoint.rebuild import rebuild_model
    from pipeline.data.batches import PIXELS, to_device
    from pipeline.model import build_llm_tokenizer, build_qformer_tokenizer
    from pipeline.model.generate import DecodingSpec, generate_captions, generate_itg_captions
    from pipeline.train.loader import BatchStream
    from pipeline.train.state import zero3_masters

    model = engine.module
    if scenario.zero_stage == 3:
        model = rebuild_model(job.model, scenario.objective, zero3_masters(engine), "the tier's engine")
        model.to(plan.device)
    model.eval()
    with BatchStream(loader, rank=0, world_size=1) as stream:
        pixels = to_device(next(stream), plan.device, plan.normalizer)[PIXELS]
    decoding = DecodingSpec(max_new_tokens=8)
    started = time.perf_counter()
    if scenario.objective == 1:
        captions = generate_itg_captions(model, build_qformer_tokenizer(job.model.qformer), pixels, decoding)
    else:
        captions = generate_captions(model, build_llm_tokenizer(job.model.llm), pixels, decoding)
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    return captions, time.perf_counter() - started


def pinned_transfer(device: str, folder: Path, *, batch_size: int = 64, image_size: int = 224,
                    repeats: int = 5) -> dict:
    """Batches of the training loader at ``image_size``: 8-bit pixels (page-locked when the
    device is a GPU), copied to the device and normalised there; checked against normalising
    on the host, and the copy timed against a float32 copy of the same pixels."""
    from pipeline.bench.decode import TextShape, synthetic_images, write_shard
    from pipeline.data.batches import PIXELS, PixelNormalizer, to_device
    from pipeline.io.storage import Location
    from pipeline.train.loader import BatchStream, LoaderConfig

    target = torch.device(device)
    pinned = target.type == "cuda"
    folder.mkdir(parents=True, exist_ok=True)
    texts = {"qformer": TextShape(32, 30522), "llm": TextShape(32, 50272)}
    shard = write_shard(folder / "shard.parquet", synthetic_images(16), batch_size, texts)
    config = LoaderConfig(shards=(Location.of(str(shard)),), batch_size=batch_size, image_size=image_size,
                          text="qformer", decode_threads=2, pin_memory=pinned)
    normalizer = PixelNormalizer((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    with BatchStream(config, rank=0, world_size=1) as stream:
        batch = dict(next(stream))
    pixels = batch[PIXELS]  # (B, 3, S, S) uint8
    on_device = to_device(batch, target, normalizer)[PIXELS]
    expected = normalizer(pixels.clone())  # on the host
    figures = {
        "device": str(target),
        "pixels_dtype": str(pixels.dtype).removeprefix("torch."),
        "pixels_shape": list(pixels.shape),
        "pinned": pixels.is_pinned() if pinned else False,
        "normalised_dtype": str(on_device.dtype).removeprefix("torch."),
        "normalised_device": str(on_device.device),
        "max_difference_from_host": (on_device.cpu() - expected).abs().max().item(),
        "uint8_bytes": pixels.numel(),
    }
    as_float = expected.pin_memory() if pinned else expected
    figures["uint8_copy_s"] = _copy_seconds(pixels, target, repeats)
    figures["float32_copy_s"] = _copy_seconds(as_float, target, repeats)
    figures["uint8_gb_per_s"] = pixels.numel() / figures["uint8_copy_s"] / 1e9
    return figures


def _copy_seconds(tensor: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of copying ``tensor`` to ``device`` (asynchronously, then waited for)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        moved = tensor.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
        del moved
    return max(statistics.median(times), 1e-9)


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
