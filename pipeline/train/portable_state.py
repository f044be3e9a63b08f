"""Training state that loads at any number of workers: fp32 weights and AdamW moments, consolidated.

DeepSpeed's ZeRO checkpoints (``ds/``) hold one partition of the optimizer per rank and load only
at the data-parallel size that wrote them. Beside them every checkpoint of a ZeRO 1-3 run keeps
the same state consolidated (it is small: the Q-Former and its projections)::

    trainable.safetensors   fp32 master weights, by parameter name
    optimizer.safetensors   "{name}.exp_avg" / "{name}.exp_avg_sq" of every trainable parameter;
                            its metadata holds the AdamW step count and the LR scheduler state

Loading it at another world size: the model gets the weights before ``deepspeed.initialize``
(so the new partitions start from them), one optimizer step at learning rate 0 on a zero-weight
batch makes DeepSpeed create its partitioned AdamW state, and then every partition is
overwritten from the consolidated tensors through DeepSpeed's tensor-fragment API.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

MOMENTS = ("exp_avg", "exp_avg_sq")


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def full_weights(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full fp32 value (the optimizer's master copy under ZeRO).

    A collective under ZeRO: every rank must call it, in step.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    if zero_stage == 0:
        return {name: p.detach().float().cpu().clone() for name, p in _trainable(engine)}
    return {name: safe_get_full_fp32_param(p).detach().float().cpu().clone() for name, p in _trainable(engine)}


def full_optimizer_state(engine, zero_stage: int) -> bytes | None:
    """The consolidated AdamW state as ``optimizer.safetensors`` bytes (None without ZeRO, whose
    DeepSpeed checkpoint is not partitioned). A collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if zero_stage == 0:
        return None
    _link_optimizer_fragments(engine)
    tensors = {
        f"{name}.{key}": safe_get_full_optimizer_state(p, key).detach().float().cpu().contiguous()
        for name, p in _trainable(engine)
        for key in MOMENTS
    }
    metadata = {
        "adam_step": str(_adam_step(engine)),
        "scheduler": json.dumps(engine.lr_scheduler.state_dict()),  # its lambdas save as None
    }
    return save_safetensors(tensors, metadata=metadata)


def load_portable_state(engine, weights: Mapping[str, torch.Tensor], optimizer_bytes: bytes, *,
                        step: int, samples: int, warmup_step: Callable[[float], None]) -> None:
    """Overwrite a freshly initialised engine's weights, AdamW state, step counters and LR
    schedule with a consolidated checkpoint, whatever world size wrote it.

    Args:
        engine: The DeepSpeed engine, built from a model that already holds ``weights``.
        weights: Full fp32 weights by parameter name (``trainable.safetensors``).
        optimizer_bytes: The ``optimizer.safetensors`` of the checkpoint.
        step: The global step the checkpoint was written at.
        samples: Samples trained until then.
        warmup_step: Runs one full optimizer step (all accumulation micro-steps) whose loss is
            multiplied by the given weight; called with 0 so DeepSpeed creates its optimizer state.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tensors = load_safetensors(optimizer_bytes)
    metadata = _safetensors_metadata(optimizer_bytes)
    groups = engine.optimizer.param_groups
    saved_lrs = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    warmup_step(0.0)
    for group, lr in zip(groups, saved_lrs):
        group["lr"] = lr
    _link_optimizer_fragments(engine)

    for name, p in _trainable(engine):
        safe_set_full_fp32_param(p, weights[name].to(p.dtype if p.dtype.is_floating_point else torch.float32))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{name}.{key}"], key)
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = _like_step(state["step"], int(metadata["adam_step"]))

    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    for group, lr in zip(groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = step
    engine.global_samples = samples
    engine.micro_steps = 0


def _link_optimizer_fragments(engine) -> None:
    """Point every parameter's ZeRO-1/2 fragment at its AdamW state. DeepSpeed does this after
    its first optimizer step but only for the first parameter group (it steps group by group and
    marks the linking done after the first), so the fragment API fails on the others."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        return  # ZeRO-3 reads its state through the optimizer, not through fragments
    for group, flat in enumerate(zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[group], flat, zero.optimizer.state)


def _adam_step(engine) -> int:
    steps = [state["step"] for state in engine.optimizer.optimizer.state.values() if "step" in state]
    return max(int(s) for s in steps) if steps else 0


def _like_step(current, value: int):
    return torch.full_like(current, value) if isinstance(current, torch.Tensor) else value


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
