"""The training state a checkpoint holds, in one portable format that loads at any world size
and ZeRO stage: the fp32 master weights and the AdamW state, consolidated on rank 0.

    trainable.safetensors   fp32 master weights, by parameter name
    optimizer.safetensors   "{name}.exp_avg" / "{name}.exp_avg_sq" of every trainable parameter;
                            its metadata holds the AdamW step count and the LR scheduler state

Nothing is pickled (a checkpoint cannot run code on the workers that load it), and nothing is
held twice. Where DeepSpeed keeps the state:

- ZeRO-1/2 and DeepSpeed's bf16 optimizer: each rank holds a fragment of every parameter's
  master and moments (``param._hp_mapping``); every rank sends its fragments to rank 0 in one
  gather per tensor kind, and rank 0 assembles them.
- ZeRO-3: DeepSpeed's full-parameter API, one collective per parameter.
- No ZeRO: every rank holds the whole state; the masters are DeepSpeed's fp32 copies beside
  16-bit parameters, or the parameters themselves in fp32; the torch optimizer holds the moments.

Restoring: the model gets the masters before ``deepspeed.initialize`` (so the working copies
start from them), one optimizer step at learning rate 0 on a zero-weight batch makes DeepSpeed
create its (partitioned) AdamW state, and then every rank overwrites its part of the masters and
moments from the consolidated tensors, in fp32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.checkpoint.format import OPTIMIZER, TRAINABLE

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    """The consolidated training state of a stage.

    Attributes:
        weights: fp32 master weight of every trainable parameter, by name.
        moments: ``"{name}.exp_avg"`` and ``"{name}.exp_avg_sq"`` of every trainable parameter.
        adam_step: AdamW's step count.
        scheduler: The LR scheduler's state dict.
    """

    weights: dict[str, torch.Tensor]
    moments: dict[str, torch.Tensor]
    adam_step: int
    scheduler: dict

    def save(self, folder: Path) -> None:
        """Write ``trainable.safetensors`` and ``optimizer.safetensors`` into ``folder``."""
        save_file({k: v.contiguous() for k, v in self.weights.items()}, str(folder / TRAINABLE))
        metadata = {"adam_step": str(self.adam_step), "scheduler": json.dumps(self.scheduler)}
        save_file({k: v.contiguous() for k, v in self.moments.items()}, str(folder / OPTIMIZER), metadata=metadata)

    @classmethod
    def load(cls, folder: Path) -> "TrainingState":
        """Read the state :meth:`save` wrote."""
        from safetensors import safe_open

        with safe_open(str(folder / OPTIMIZER), "pt") as handle:
            metadata = handle.metadata()
        return cls(load_file(str(folder / TRAINABLE)), load_file(str(folder / OPTIMIZER)),
                   int(metadata["adam_step"]), json.loads(metadata["scheduler"]))


def trainable_parameters(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The engine's trainable parameters by name, in module order (the same on every rank)."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def gather_state(engine) -> TrainingState | None:
    """The consolidated state on rank 0 (None on other ranks). A collective: every rank calls it."""
    full = _gather(engine, (None, *MOMENTS))  # None: the master weights
    if full is None:
        return None
    return TrainingState(
        weights=full[None],
        moments={f"{name}.{kind}": tensor for kind in MOMENTS for name, tensor in full[kind].items()},
        adam_step=_adam_step(engine),
        scheduler=engine.lr_scheduler.state_dict(),
    )


def gather_masters(engine) -> dict[str, torch.Tensor] | None:
    """The fp32 masters by name on rank 0 (None on other ranks). A collective."""
    full = _gather(engine, (None,))
    return None if full is None else full[None]


def _gather(engine, kinds: tuple[str | None, ...]) -> dict[str | None, dict[str, torch.Tensor]] | None:
    """Rank 0: each kind's full fp32 tensors by parameter name; None on other ranks."""
    params = trainable_parameters(engine)
    _link_optimizer_fragments(engine)
    if any(hasattr(p, "ds_id") for _, p in params):
        full = {kind: [_full_zero3(p, kind) for _, p in params] for kind in kinds}
    elif any(hasattr(p, "_hp_mapping") for _, p in params):
        full = _gather_fragments([p for _, p in params], kinds)
    else:
        full = {kind: [_plain(engine, p, kind) for _, p in params] for kind in kinds}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    names = [name for name, _ in params]
    return {kind: dict(zip(names, tensors)) for kind, tensors in full.items()}


def zero3_masters(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full fp32 master on every rank, under ZeRO-3 (whose parameters
    are partitioned). A collective: every rank calls it."""
    return {name: _full_zero3(p, None) for name, p in trainable_parameters(engine)}


def set_masters(engine, weights: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every rank's part of the fp32 masters with ``weights`` (full fp32 tensors by
    name); the working copies follow at the next optimizer step. No collective."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in trainable_parameters(engine):
        value = weights[name].to(device=p.device, dtype=torch.float32)
        if hasattr(p, "ds_id"):
            _set_zero3_partition(p, value, None)
        elif _partitioned(p):
            safe_set_full_fp32_param(p, value)  # sets only this rank's part, if it holds one
        else:
            with torch.no_grad():
                _master_of(engine, p).copy_(value)


def restore_state(engine, state: TrainingState, *, step: int, samples: int,
                  warmup_step: Callable[[float], None]) -> None:
    """Overwrite a freshly initialised engine's masters, AdamW state, step counters and LR
    schedule with a consolidated checkpoint, whatever world size and ZeRO stage wrote it.

    Args:
        engine: The DeepSpeed engine, built from a model that already holds ``state.weights``.
        state: The checkpoint's state.
        step: The global step the checkpoint was written at.
        samples: Samples trained until then.
        warmup_step: Runs one full optimizer step (all accumulation micro-steps) whose loss is
            multiplied by the given weight; called with 0 so DeepSpeed creates its optimizer state.
    """
    from deepspeed.utils import safe_set_full_optimizer_state

    groups = engine.optimizer.param_groups
    saved_lrs = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    warmup_step(0.0)
    for group, lr in zip(groups, saved_lrs):
        group["lr"] = lr
    _link_optimizer_fragments(engine)

    set_masters(engine, state.weights)
    for name, p in trainable_parameters(engine):
        for key in MOMENTS:
            value = state.moments[f"{name}.{key}"].to(p.device)
            if hasattr(p, "ds_id"):
                _set_zero3_partition(p, value, key)
            elif _partitioned(p):
                safe_set_full_optimizer_state(p, value, key)
            else:
                _torch_optimizer(engine).state[_master_of(engine, p)][key].copy_(value)
    for optimizer_state in _torch_optimizer(engine).state.values():
        if "step" in optimizer_state:
            optimizer_state["step"] = _like_step(optimizer_state["step"], state.adam_step + _setup_steps(engine))

    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = samples
    engine.micro_steps = 0


def clamp_masters(engine, bounds: Mapping[str, tuple[float, float]]) -> None:
    """Keep the fp32 masters of bounded parameters (the ITC temperature) inside their bounds:
    each rank clamps its own part, no collective. The working copies follow at the next step."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    if not bounds:
        return
    for name, p in trainable_parameters(engine):
        if name not in bounds:
            continue
        low, high = bounds[name]
        with torch.no_grad():
            if hasattr(p, "ds_id"):
                safe_set_local_fp32_param(p, safe_get_local_fp32_param(p).clamp(low, high))
            elif _partitioned(p):
                if p._hp_mapping is not None:  # this rank holds a part of it
                    p._hp_mapping.get_hp_fragment().clamp_(low, high)
            else:
                _master_of(engine, p).clamp_(low, high)


def _gather_fragments(params: list[torch.nn.Parameter], kinds) -> dict:
    """Rank 0: the full fp32 tensors of ``params`` for each kind (None: masters; else an AdamW
    moment), assembled from every rank's fragments: one gather of metadata, one per kind."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = [(index, p._hp_mapping.lp_fragment_address.start, p._hp_mapping.lp_fragment_address.numel)
            for index, p in enumerate(params) if p._hp_mapping is not None]
    layout: list = [None] * world
    dist.all_gather_object(layout, mine)
    longest = max(sum(numel for _, _, numel in entries) for entries in layout)
    device = params[0].device
    full = {}
    for kind in kinds:
        values = [params[index]._hp_mapping.get_hp_fragment(kind).detach().reshape(-1).float()
                  for index, _, _ in mine]
        local = torch.zeros(longest, dtype=torch.float32, device=device)  # (L,), padded alike on every rank
        if values:
            flat = torch.cat(values)
            local[: flat.numel()] = flat
        received = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, received, dst=0)
        if rank != 0:
            full[kind] = None
            continue
        tensors = [torch.zeros(p.numel(), dtype=torch.float32) for p in params]
        for entries, buffer in zip(layout, received):
            offset = 0
            for index, start, numel in entries:
                tensors[index][start : start + numel] = buffer[offset : offset + numel].cpu()
                offset += numel
        full[kind] = [tensor.reshape(p.shape) for tensor, p in zip(tensors, params)]
    return full


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed keeps ``p``'s master apart from it (ZeRO or its bf16 optimizer)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _set_zero3_partition(p: torch.nn.Parameter, value: torch.Tensor, kind: str | None) -> None:
    """Write this rank's ZeRO-3 partition of ``p``'s master (``kind`` None) or moment from the
    full ``value``. DeepSpeed's own full-value setter forgets that the last partitions are
    padded, and fails on parameters whose size the world size does not divide."""
    from deepspeed.utils import (
        safe_get_local_fp32_param,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    size = safe_get_local_fp32_param(p).numel()
    padded = torch.zeros(size * dist.get_world_size(), dtype=torch.float32, device=value.device)
    padded[: value.numel()] = value.flatten()
    part = padded.narrow(0, dist.get_rank() * size, size)
    if kind is None:
        safe_set_local_fp32_param(p, part)
    else:
        safe_set_local_optimizer_state(p, part, kind)


def _full_zero3(p: torch.nn.Parameter, kind: str | None) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = safe_get_full_fp32_param(p) if kind is None else safe_get_full_optimizer_state(p, kind)
    return full.detach().float().cpu().clone()


def _plain(engine, p: torch.nn.Parameter, kind: str | None) -> torch.Tensor:
    master = _master_of(engine, p)
    value = master if kind is None else _torch_optimizer(engine).state[master][kind]
    return value.detach().float().cpu().clone()


def _master_of(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master of a parameter no rank partitions (no ZeRO): the fp32 copy DeepSpeed's
    mixed-precision optimizer holds beside it, or under fp32 the parameter itself."""
    wrapper = engine.optimizer
    for working, masters in zip(getattr(wrapper, "fp16_groups", ()), getattr(wrapper, "fp32_groups", ())):
        for candidate, master in zip(working, masters):
            if candidate is p:
                return master
    return p


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's optimizer wrapper (or the engine's own, without one)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _link_optimizer_fragments(engine) -> None:
    """Point every parameter's fragment at its AdamW state. DeepSpeed does this after its first
    optimizer step but can do it before a later group's state exists (it steps group by group and
    marks the linking done once), so the fragment API fails on the other groups."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    wrapper = engine.optimizer
    if hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        pairs = zip(wrapper.bit16_groups, wrapper.single_partition_of_fp32_groups)
    elif hasattr(wrapper, "fp32_groups_flat_partition"):  # DeepSpeed's bf16 optimizer
        pairs = zip(wrapper.bf16_groups, wrapper.fp32_groups_flat_partition)
    else:
        return  # ZeRO-3 reads its state through the optimizer; no ZeRO keeps it in torch's
    state = _torch_optimizer(engine).state
    for params, flat in pairs:
        if flat in state:
            lazy_init_hp_params_optimizer_state(params, flat, state)


def _adam_step(engine) -> int:
    """Updates taken, whatever ZeRO stage and precision took them (the portable count)."""
    steps = [s["step"] for s in _torch_optimizer(engine).state.values() if "step" in s]
    return max(int(s) for s in steps) - _setup_steps(engine) if steps else 0


def _setup_steps(engine) -> int:
    """Steps torch's AdamW counted that were no update: without ZeRO, DeepSpeed's 16-bit
    optimizer wrapper allocates AdamW's state by one step on zero gradients when it is built."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return 1 if isinstance(engine.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)) else 0


def _like_step(current, value: int):
    return torch.full_like(current, value) if isinstance(current, torch.Tensor) else value
