"""``qformer bench step``: one worker's training step, phase by phase, on whatever device is here.

One process, no Ray and no DeepSpeed (this module imports neither, so it runs on a GPU machine
with only torch, transformers and pure-Python wheels): the model, the training loader and a plain
PyTorch optimizer step. Per objective (1: ITC + ITM + ITG against the frozen vision tower; 2: LM
through the frozen LLM) it reports the median time of each phase, samples/s, the step's FLOPs
(``torch.utils.flop_counter``, forward and backward, frozen towers included since they run),
achieved TFLOP/s and MFU, and peak memory; next to the loader's single-threaded image rate and
plain PIL decoding of the same JPEGs, and how many decode threads a step needs.

Presets: ``tiny`` (the tiny random towers) and ``paper`` (random weights at BLIP-2's shapes:
EVA ViT-g/14 at 224 px, a BERT-base Q-Former with 32 queries, OPT-2.7B; built from configs on the
device, never downloaded). On a GPU everything runs in bf16: frozen towers held in bf16, the
trainable parts as fp32 weights under bf16 autocast, AdamW in fp32.

The phases are cut inside the model's own ``forward``: the bench wraps the model's public
``frozen_image_tokens`` (and, for objective 2, ``visual_prompt``, whose output's gradient marks
the end of the LLM's backward) to mark where they end, so it times exactly the computation
training runs. Batches cross to the device as 8-bit pixels and are normalised there, as in training.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq
import torch

from pipeline.assets import BERT_BASE, EVA_VIT_G, MINILM, OPT_2_7B, is_config_only, model_config, tiny_model_section
from pipeline.bench.decode import DecodeRates, TextShape, decode_rates, synthetic_images, write_shard
from pipeline.bench.device import (
    BenchError,
    Peak,
    StepClock,
    device_name,
    device_peak,
    peak_memory,
    pick_device,
    reset_peak_memory,
)
from pipeline.bench.flops import flop_counter
from pipeline.bench.plain import optimizer_step
from pipeline.data.batches import PixelNormalizer, to_device
from pipeline.data.prepared import MODEL_INPUTS, TextKind, text_kind
from pipeline.io.storage import Location
from pipeline.model import Blip2Pretrainer, ImagePreprocessing, image_preprocessing
from pipeline.spec.losses import Objective, losses_of
from pipeline.spec.model import ModelSpec
from pipeline.spec.prep import TokenizerSpec
from pipeline.spec.train import DataSpec, DeepSpeedSpec, OptimizerSpec
from pipeline.train.loader import BatchStream, LoaderConfig
from pipeline.train.optim import build_optimizer
from pipeline.versions import library_versions

WARMUP_STEPS = 2
"""Untimed steps first; the first of them counts the FLOPs."""
SEARCH_LIMIT = 1024
"""The batch-size search on a GPU stops at this many samples per step."""
DISTINCT_IMAGES = 256
"""Distinct JPEGs in the synthetic shard (cycled to fill a batch) and in the decode timings."""

OBJECTIVE_TITLES = {1: "ITC + ITM + ITG against the frozen vision tower", 2: "LM through the frozen LLM"}
COMMUNICATION_NOTE = ("0 in one process: no feature all-gather (ITC/ITM) or gradient all-reduce; "
                      "`qformer bench train` measures the distributed path")

# Marks the step makes, in order; each ends the phase it names.
_MARKS: dict[Objective, tuple[str, ...]] = {
    1: ("data_wait", "vision_forward", "qformer_forward", "qformer_backward", "optimizer_step"),
    2: ("data_wait", "vision_forward", "qformer_forward", "llm_forward", "llm_backward",
        "qformer_backward", "optimizer_step"),
}
_FORWARD_END: dict[Objective, str] = {1: "qformer_forward", 2: "llm_forward"}
# Phases as reported: sums of marked ones.
_PHASES: dict[Objective, dict[str, tuple[str, ...]]] = {
    1: {"data_wait": ("data_wait",), "vision_forward": ("vision_forward",),
        "qformer_forward_backward": ("qformer_forward", "qformer_backward"),
        "optimizer_step": ("optimizer_step",)},
    2: {"data_wait": ("data_wait",), "vision_forward": ("vision_forward",),
        "qformer_forward_backward": ("qformer_forward", "qformer_backward"),
        "llm_forward_backward": ("llm_forward", "llm_backward"),
        "optimizer_step": ("optimizer_step",)},
}


@dataclass(frozen=True)
class Preset:
    """A model to benchmark.

    Attributes:
        name: ``tiny`` or ``paper``.
        model: The ``model:`` section, dtypes left out (the run's precision sets them).
        cpu_precision: ``fp32`` or ``bf16`` on a CPU (a GPU always runs bf16).
        cpu_batch_size: Samples per step on a CPU when none is given (a GPU searches).
    """

    name: str
    model: dict
    cpu_precision: str
    cpu_batch_size: int

    def model_spec(self, precision: str) -> ModelSpec:
        """The model spec with both frozen towers held in the run's precision."""
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[precision]
        section = {**self.model, "vision": {**self.model["vision"], "dtype": dtype},
                   "llm": {**self.model["llm"], "dtype": dtype}}
        return ModelSpec.model_validate(section)


def _tiny_section() -> dict:
    section = tiny_model_section()
    for tower in ("vision", "llm"):
        del section[tower]["dtype"]
    return section


PRESETS = {
    "tiny": Preset("tiny", _tiny_section(), cpu_precision="fp32", cpu_batch_size=8),
    # The spec's Q-Former defaults are the paper's: 32 queries, cross-attention every 2nd layer,
    # 256-wide ITC features, captions of 32 tokens. MiniLM's tokenizer has BERT-base's vocabulary.
    # bf16 on a CPU too: it halves the towers' memory (OPT-2.7B: 5.4 GB instead of 10.8).
    "paper": Preset("paper", {
        "vision": {"name": EVA_VIT_G, "drop_last_layer": False},
        "qformer": {"bert": BERT_BASE, "tokenizer": MINILM, "init": "random"},
        "llm": {"name": OPT_2_7B},
    }, cpu_precision="bf16", cpu_batch_size=2),
}


@dataclass(frozen=True)
class StepBenchRequest:
    """What ``qformer bench step`` measures.

    Attributes:
        preset: A key of :data:`PRESETS`.
        objectives: 1, 2 or both, in order.
        batch_size: Samples per step; None searches on a GPU (the largest power of two up to
            :data:`SEARCH_LIMIT` that fits) and takes the preset's on a CPU.
        steps: Timed steps (after :data:`WARMUP_STEPS`); their medians are reported.
        device: ``auto``, ``cpu`` or ``cuda``.
        decode_threads: The training loader's decode threads during the steps.
        out: The JSON report's path; None writes ``step.json`` in a new temporary folder.
    """

    preset: str = "tiny"
    objectives: tuple[Objective, ...] = (1, 2)
    batch_size: int | None = None
    steps: int = 10
    device: str = "auto"
    decode_threads: int = DataSpec.model_fields["decode_threads"].default
    out: str | None = None


def run_step_benchmark(request: StepBenchRequest) -> dict:
    """Measure, print, and write the JSON report; returns the report.

    Raises:
        BenchError: an unknown preset or device, no GPU for ``cuda``, or a batch size an
            objective cannot train (objective 1 needs 2: ITM's negatives are other samples).
    """
    preset = _check(request)
    device = pick_device(request.device)
    precision = _precision(device, preset)
    out = Path(request.out) if request.out else Path(tempfile.mkdtemp(prefix="qformer-bench-step-")) / "step.json"
    peak = device_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    report = {
        "preset": preset.name,
        "device": {"type": device.type, "name": device_name(device), "peak_tflops": peak.flops_per_s / 1e12,
                   "peak_source": peak.source},
        "precision": _describe(precision),
        "versions": library_versions(),
    }
    _print_header(report)
    with tempfile.TemporaryDirectory(prefix="qformer-bench-step-data-") as data:
        corpus = _Corpus(Path(data), synthetic_images(DISTINCT_IMAGES))
        pre = image_preprocessing(preset.model_spec(precision).vision)
        decode = _loader_config(corpus.shard(DISTINCT_IMAGES, _text_shapes(preset, precision)), pre,
                                request.objectives[0], batch_size=1, decode_threads=1)
        rates = decode_rates(pq.read_table(decode.shards[0].url), decode.input_builder())
        report["decode"] = _decode_report(rates)
        _print_decode(report["decode"])
        report["objectives"] = {}
        for objective in request.objectives:
            result = _bench_objective(preset, objective, request, device, precision, peak, corpus, rates)
            report["objectives"][str(objective)] = result
            _print_objective(objective, result, report["device"]["peak_tflops"])
    report["json"] = str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"json: {out}")
    return report


def _check(request: StepBenchRequest) -> Preset:
    if request.preset not in PRESETS:
        raise BenchError(f"--preset: must be one of {', '.join(PRESETS)}, got {request.preset!r}")
    if request.batch_size is not None and request.batch_size < 2 and 1 in request.objectives:
        raise BenchError(f"--batch-size {request.batch_size}: objective 1 needs at least 2 samples per "
                         "step (ITM draws each sample's negatives from the other samples)")
    if request.steps < 1 or request.decode_threads < 1:
        raise BenchError("--steps and --decode-threads must be >= 1")
    return PRESETS[request.preset]


def _precision(device: torch.device, preset: Preset) -> str:
    if device.type == "cpu":
        return preset.cpu_precision
    if not torch.cuda.is_bf16_supported():
        raise BenchError(f"{device_name(device)} has no bf16 support; the step benchmark runs bf16 on GPUs")
    return "bf16"


def _describe(precision: str) -> str:
    if precision == "fp32":
        return "fp32 (frozen towers, trainable weights, AdamW)"
    return "bf16: frozen towers held in bf16; trainable weights fp32 under bf16 autocast; AdamW fp32"


class _Runner:
    """Runs and times training steps of one model and optimizer."""

    def __init__(self, model: Blip2Pretrainer, optimizer: torch.optim.Optimizer, objective: Objective,
                 device: torch.device, precision: str, normalizer: PixelNormalizer):
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.device, self.precision, self.normalizer = device, precision, normalizer
        self.clip = DeepSpeedSpec().gradient_clipping
        self.steps = 0

    def step(self, fetch: Callable[[], dict[str, torch.Tensor]]) -> dict[str, float]:
        """One training step on the batch ``fetch`` returns; seconds of each marked phase."""
        clock = StepClock(self.device)
        clock.mark("start")
        batch = to_device(fetch(), self.device, self.normalizer)
        clock.mark("data_wait")
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with self._marked(clock), autocast:
            out = self.model(**batch, itm_seed=self.steps)
        clock.mark(_FORWARD_END[self.objective])
        out.loss.backward()
        clock.mark("qformer_backward")
        optimizer_step(self.model, self.optimizer, self.clip)
        clock.mark("optimizer_step")
        self.steps += 1
        phases = clock.phases()
        if tuple(phases) != _MARKS[self.objective]:
            raise RuntimeError(f"the step's phases came out as {list(phases)}, not {list(_MARKS[self.objective])}: "
                               "does the model's forward still go through frozen_image_tokens (and visual_prompt)?")
        return phases

    @contextlib.contextmanager
    def _marked(self, clock: StepClock) -> Iterator[None]:
        """Mark the ends of the model's own ``frozen_image_tokens`` and ``visual_prompt`` inside its
        forward, and the end of the LLM's backward (the visual prompt's gradient is ready)."""
        model = self.model
        frozen_image_tokens, visual_prompt = model.frozen_image_tokens, model.visual_prompt

        def marked_frozen_image_tokens(pixel_values):
            tokens = frozen_image_tokens(pixel_values)
            clock.mark("vision_forward")
            return tokens

        def marked_visual_prompt(pixel_values):
            query_output, prompt = visual_prompt(pixel_values)
            clock.mark("qformer_forward")
            prompt.register_hook(lambda grad: clock.mark("llm_backward"))
            return query_output, prompt

        model.frozen_image_tokens = marked_frozen_image_tokens
        if self.objective == 2:
            model.visual_prompt = marked_visual_prompt
        try:
            yield
        finally:
            del model.frozen_image_tokens
            if self.objective == 2:
                del model.visual_prompt


@dataclass(frozen=True)
class _Shapes:
    """What one sample of the objective's batches looks like."""

    image_size: int
    texts: dict[TextKind, TextShape]

    def random_batch(self, objective: Objective, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch of the loader's shapes, made on the device (for the batch-size search)."""
        kind = text_kind(objective)
        text = self.texts[kind]
        ids, mask = MODEL_INPUTS[kind]
        size = self.image_size
        return {
            "pixel_values": torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device),
            ids: torch.randint(0, text.vocab_size, (batch_size, text.length), device=device),  # (B, L)
            mask: torch.ones(batch_size, text.length, dtype=torch.int64, device=device),  # (B, L)
        }


class _Corpus:
    """Synthetic prepared shards in ``folder``, cycling through the same JPEGs."""

    def __init__(self, folder: Path, images: list[bytes]):
        self.folder, self.images = folder, images

    def shard(self, rows: int, texts: dict[TextKind, TextShape]) -> Location:
        """A shard of ``rows`` samples (written once per size)."""
        path = self.folder / f"rows-{rows}.parquet"
        if not path.exists():
            write_shard(path, self.images, rows, texts)
        return Location.of(str(path))


def _text_shapes(preset: Preset, precision: str) -> dict[TextKind, TextShape]:
    """Token lengths and vocabularies: the Q-Former's captions as the spec pads them, the LLM's
    as ``qformer prep`` does by default."""
    spec = preset.model_spec(precision)
    return {
        "qformer": TextShape(spec.qformer.max_text_length, model_config(spec.qformer.bert).vocab_size),
        "llm": TextShape(TokenizerSpec.model_fields["max_length"].default, model_config(spec.llm.name).vocab_size),
    }


def _loader_config(shard: Location, pre: ImagePreprocessing, objective: Objective, *, batch_size: int,
                   decode_threads: int) -> LoaderConfig:
    """The training loader over ``shard``, as a training stage of ``objective`` configures it."""
    return LoaderConfig(shards=(shard,), batch_size=batch_size, image_size=pre.image_size,
                        text=text_kind(objective), decode_threads=decode_threads)


def _bench_objective(preset: Preset, objective: Objective, request: StepBenchRequest, device: torch.device,
                     precision: str, peak: Peak, corpus: _Corpus, rates: DecodeRates) -> dict:
    spec = preset.model_spec(precision)
    torch.manual_seed(0)
    started = time.perf_counter()
    with _build_place(spec, device):
        model = Blip2Pretrainer(spec, objective=objective)
    model.to(device)
    model.train()
    optimizer = build_optimizer(model, OptimizerSpec())
    build_s = time.perf_counter() - started
    pre = image_preprocessing(spec.vision)
    runner = _Runner(model, optimizer, objective, device, precision, PixelNormalizer(pre.mean, pre.std))
    texts = _text_shapes(preset, precision)
    batch_size, source = _batch_size(request, preset, runner, _Shapes(pre.image_size, texts), device)

    shard = corpus.shard(max(batch_size, len(corpus.images)), texts)
    loader = _loader_config(shard, pre, objective, batch_size=batch_size, decode_threads=request.decode_threads)
    with BatchStream(loader, rank=0, world_size=1) as stream:
        with flop_counter() as counter:
            runner.step(lambda: next(stream))
        for _ in range(WARMUP_STEPS - 1):
            runner.step(lambda: next(stream))
        reset_peak_memory(device)
        timed = [runner.step(lambda: next(stream)) for _ in range(request.steps)]
        memory, memory_kind = peak_memory(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del runner, model, optimizer
    _release(device)
    return _summary(objective, timed, batch_size, source, counter.get_total_flops(), peak, memory,
                    memory_kind, rates, request, build_s, trainable)


def _build_place(spec: ModelSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """Where to build the model: on the device itself when every part is built from a config
    (multi-GB random towers never pass through host memory); otherwise on the CPU, moved after,
    since transformers' ``from_pretrained`` under a device context needs ``accelerate``."""
    from_configs = all(is_config_only(name) for name in (spec.vision.name, spec.qformer.bert, spec.llm.name))
    if from_configs and spec.qformer.init == "random":
        return torch.device(device)
    return contextlib.nullcontext()


def _batch_size(request: StepBenchRequest, preset: Preset, runner: _Runner, shapes: _Shapes,
                device: torch.device) -> tuple[int, str]:
    if request.batch_size is not None:
        return request.batch_size, "given"
    if device.type == "cpu":
        return preset.cpu_batch_size, f"the {preset.name} preset's on a CPU"
    size, fits = (2 if runner.objective == 1 else 1), None
    while size <= SEARCH_LIMIT and _fits(runner, shapes, size):
        fits, size = size, size * 2
    if fits is None:
        raise BenchError(f"objective {runner.objective}: not even {size} samples per step fit in the "
                         f"memory of {device_name(device)}")
    limit = f" (the search stops at {SEARCH_LIMIT})" if fits == SEARCH_LIMIT else ""
    return fits, f"searched: the largest power of two that fits{limit}"


def _fits(runner: _Runner, shapes: _Shapes, batch_size: int) -> bool:
    """Whether a step of ``batch_size`` samples runs without running out of GPU memory."""
    fits = True
    try:
        runner.step(lambda: shapes.random_batch(runner.objective, batch_size, runner.device))
    except torch.cuda.OutOfMemoryError:
        fits = False
    # Outside the except clause, so that the failed step's tensors are unreferenced by now.
    runner.optimizer.zero_grad(set_to_none=True)
    _release(runner.device)
    return fits


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _summary(objective: Objective, timed: list[dict[str, float]], batch_size: int, source: str, flops: int,
             peak: Peak, memory: int, memory_kind: str, rates: DecodeRates, request: StepBenchRequest,
             build_s: float, trainable: int) -> dict:
    phases = {name: statistics.median(sum(step[mark] for mark in marks) for step in timed)
              for name, marks in _PHASES[objective].items()}
    phases["communication"] = 0.0
    step_s = statistics.median(sum(step.values()) for step in timed)
    compute_s = statistics.median(sum(step.values()) - step["data_wait"] for step in timed)
    achieved = flops / step_s
    return {
        "objective": objective,
        "losses": [loss.name for loss in losses_of(objective)],
        "batch_size": batch_size,
        "batch_size_source": source,
        "warmup_steps": WARMUP_STEPS,
        "steps_timed": len(timed),
        "phases_s": phases,
        "communication_note": COMMUNICATION_NOTE,
        "marked_phases_s": {mark: statistics.median(step[mark] for step in timed) for mark in timed[0]},
        "step_s": step_s,
        "compute_s": compute_s,
        "samples_per_s": batch_size / step_s,
        "flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak.flops_per_s,
        "mfu_against": peak.source,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "decode_threads": request.decode_threads,
        "decode_threads_needed": rates.threads_needed(batch_size, compute_s),
        "model_build_s": build_s,
        "trainable_parameters": trainable,
    }


def _decode_report(rates: DecodeRates) -> dict:
    return {
        "jpeg_side": rates.jpeg_side,
        "output_side": rates.output_side,
        "images": rates.images,
        "plain_pil_images_per_s": rates.plain_pil,
        "loader_images_per_s_per_thread": rates.loader,
        "loader_fraction_of_plain": rates.loader_fraction,
        "what": {"plain_pil": "Image.open + convert('RGB'), one thread",
                 "loader": "the training loader's per-sample work: decode, random resized crop, flip, "
                           "normalised float tensor; one thread"},
    }


def _print_header(report: dict) -> None:
    device = report["device"]
    print(f"qformer bench step: preset {report['preset']} on {device['type']} ({device['name']}); "
          f"{report['precision']}")


def _print_decode(decode: dict) -> None:
    print(f"decode, one thread, {decode['jpeg_side']} px JPEGs -> {decode['output_side']} px: plain PIL "
          f"{decode['plain_pil_images_per_s']:.0f} images/s; training loader (decode + random resized crop + "
          f"flip + normalise) {decode['loader_images_per_s_per_thread']:.0f} images/s = "
          f"{decode['loader_fraction_of_plain']:.2f} of plain")


def _print_objective(objective: Objective, result: dict, peak_tflops: float) -> None:
    print(f"objective {objective} ({OBJECTIVE_TITLES[objective]}): batch {result['batch_size']} "
          f"({result['batch_size_source']}), median of {result['steps_timed']} steps after "
          f"{result['warmup_steps']} warm-up")
    labels = {"data_wait": "data wait", "vision_forward": "frozen vision forward",
              "qformer_forward_backward": "Q-Former forward + backward",
              "llm_forward_backward": "LLM forward + backward", "optimizer_step": "optimizer step",
              "communication": "communication"}
    for name, seconds in result["phases_s"].items():
        note = f"  ({COMMUNICATION_NOTE})" if name == "communication" else ""
        print(f"  {labels[name]:<28}{seconds * 1000:10.1f} ms{note}")
    print(f"  {'step':<28}{result['step_s'] * 1000:10.1f} ms = {result['samples_per_s']:.3g} samples/s")
    print(f"  {result['flops_per_step'] / 1e12:.4g} TFLOP per step: {result['achieved_tflops']:.4g} TFLOP/s "
          f"achieved, MFU {100 * result['mfu']:.1f}% of {peak_tflops:.4g} TFLOP/s, the {result['mfu_against']}")
    print(f"  peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']})")
    needed = result["decode_threads_needed"]
    print(f"  a step of {result['batch_size']} samples needs {needed} decode thread{'s' if needed > 1 else ''} "
          f"to keep up ({result['compute_s']:.3g} s of compute per step; this run used {result['decode_threads']})")
