"""FLOPs of the work done under a context, as torch's ``FlopCounterMode`` counts them: matrix
multiplications, convolutions and attention, forward and backward."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one, which would count 0;
# torch's own attention formulas fit its (query, key, value, ...) arguments unchanged.
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention.

    Example:
        >>> with flop_counter() as counter:
        ...     model(**batch).loss.backward()
        >>> counter.get_total_flops()
    """
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
