"""Two gloo processes compute the same ITC/ITM losses and gradients as one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model import Blip2Pretrainer, DistContext, build_qformer_tokenizer
from pipeline.spec.model import ModelSpec
from pipeline.model.distributed import all_gather, all_gather_with_grad

from .tiny import COLORS, IMAGE_SIZE, SHAPES, caption_batch, tiny_spec

WORLD = 2
LOCAL_BATCH = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model: Blip2Pretrainer, batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """Losses, negatives and the gradients of ITC and ITM (separately) of one stage-1 step."""
    out = model(**batch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    result = {"loss_itc": out.loss_itc.detach(), "loss_itm": out.loss_itm.detach()}
    for name in ("loss_itc", "loss_itm"):
        grads = torch.autograd.grad(
            getattr(out, name), list(params.values()), retain_graph=True, allow_unused=True
        )
        result[f"grad_{name}"] = {
            n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)
        }
    result["negative_texts"], result["negative_images"] = out.negative_texts, out.negative_images
    return result


def _worker(rank: int, port: int, spec_json: str, state: dict, batch: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model = Blip2Pretrainer(ModelSpec.model_validate_json(spec_json), objective=1).eval()
        model.load_state_dict(state)
        local = {k: v[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH] for k, v in batch.items()}
        result = _step(model, local)
        ctx = DistContext.current()
        # What DDP does with gradients and what a trainer logs: the mean over ranks.
        for key in ("loss_itc", "loss_itm"):
            dist.all_reduce(result[key])
            result[key] /= WORLD
            for grad in result[f"grad_{key}"].values():
                dist.all_reduce(grad)
                grad /= WORLD
        for key in ("negative_texts", "negative_images"):
            result[key] = all_gather(result[key], ctx)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("vit"), bert_dir)
    torch.manual_seed(0)
    model = Blip2Pretrainer(spec, objective=1).eval()
    captions = [f"a {c} {s}" for c, s in zip(COLORS, SHAPES * 2)][: WORLD * LOCAL_BATCH]
    batch = caption_batch(build_qformer_tokenizer(spec.qformer), captions)
    batch["pixel_values"] = torch.randn(WORLD * LOCAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    return spec, model, batch


def test_two_processes_match_one(setup, tmp_path):
    spec, model, batch = setup
    out_path = tmp_path / "rank0.pt"
    mp.spawn(
        _worker,
        args=(_free_port(), spec.model_dump_json(), model.state_dict(), batch, str(out_path)),
        nprocs=WORLD,
        join=True,
    )
    distributed = torch.load(out_path)
    single = _step(model, batch)  # a fresh sampler, seeded like the workers'

    assert torch.equal(distributed["negative_texts"], single["negative_texts"])
    assert torch.equal(distributed["negative_images"], single["negative_images"])
    for key in ("loss_itc", "loss_itm"):
        torch.testing.assert_close(distributed[key], single[key], rtol=1e-5, atol=1e-6)
        grads, ref = distributed[f"grad_{key}"], single[f"grad_{key}"]
        assert any(g.abs().sum() > 0 for g in ref.values())
        for name in ref:
            torch.testing.assert_close(
                grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=f"{key} grad of {name}"
            )


def test_single_process_gathers_are_identity():
    x = torch.randn(3, 2, requires_grad=True)
    ctx = DistContext()
    assert all_gather_with_grad(x, ctx) is x
    assert not all_gather(x, ctx).requires_grad
    assert DistContext.current() == DistContext(rank=0, world_size=1)
