"""FLOP counting: torch's counter, with CPU attention added, on shapes whose FLOPs are known."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.bench.flops import flop_counter


def test_a_linear_layer_counts_2_b_in_out_forward_and_twice_that_backward():
    batch, width_in, width_out = 4, 16, 8
    layer = torch.nn.Linear(width_in, width_out)
    x = torch.randn(batch, width_in, requires_grad=True)
    with flop_counter() as forward:
        y = layer(x)
    with flop_counter() as backward:
        y.sum().backward()
    assert forward.get_total_flops() == 2 * batch * width_in * width_out
    # Gradients of the input and of the weight: two matmuls of the forward's size.
    assert backward.get_total_flops() == 4 * batch * width_in * width_out


def test_attention_on_the_cpu_is_counted():
    batch, heads, length, head_dim = 2, 4, 16, 8
    q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    with flop_counter() as forward:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with flop_counter() as backward:
        out.sum().backward()
    scores = 2 * batch * heads * length * length * head_dim  # q @ k^T, and again probs @ v
    assert forward.get_total_flops() == 2 * scores
    # The fused backward recomputes q @ k^T, then takes the gradients of v, of the attention
    # probabilities, of q and of k: five products of that size.
    assert backward.get_total_flops() == 5 * scores
