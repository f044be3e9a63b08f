"""One optimizer step of a stage: every accumulation micro-step of every data stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data.batches import PixelNormalizer, to_device
from pipeline.train.loader import BatchStream
from pipeline.train.seeds import itm_seed, stream_seed
from pipeline.train.state import clamp_masters
from pipeline.train.streams import StreamPlan


@dataclass(frozen=True)
class StepPlan:
    """What every optimizer step of a stage does; fixed for the stage.

    Attributes:
        streams: This worker's data streams.
        accumulation: Gradient accumulation steps of the spec (per stream).
        batch_size: Samples per micro-batch.
        run_seed: ``run.seed``.
        stage_index: The stage's place in the curriculum.
        loss_fields: The model output fields summed for the logs (the total first).
        token_mask: The batch's attention-mask input, counted for tokens/s.
        device: Where the model runs.
        normalizer: Normalises the batches' 8-bit pixels for the vision tower, on the device.
    """

    streams: StreamPlan
    accumulation: int
    batch_size: int
    run_seed: int
    stage_index: int
    loss_fields: tuple[str, ...]
    token_mask: str
    device: torch.device
    normalizer: PixelNormalizer

    @property
    def micro_steps(self) -> int:
        """Micro-steps of one optimizer step on every rank (DeepSpeed's accumulation)."""
        return self.accumulation * self.streams.per_rank

    @property
    def micro_batches(self) -> int:
        """Real micro-batches of one optimizer step, all ranks together."""
        return self.accumulation * self.streams.total

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step, all ranks together (the global batch)."""
        return self.batch_size * self.micro_batches


def train_step(engine, plan: StepPlan, batches: list[BatchStream], placeholder: dict[str, torch.Tensor],
               step: int) -> torch.Tensor:
    """Run optimizer step ``step`` (0-based); returns the sums over this rank's real micro-steps
    of each loss field and of the tokens, (F + 1,) float64 on the device.

    Every rank runs ``plan.micro_steps`` micro-steps, its own streams first and placeholders
    (loss weight 0, ``placeholder`` already on the device) after, so that every rank joins the
    same collectives; DeepSpeed steps the optimizer after the last one. The losses stay on the
    device: nothing here waits for the host.
    """
    streams = plan.streams
    sums = torch.zeros(len(plan.loss_fields) + 1, dtype=torch.float64, device=plan.device)
    for micro in range(plan.accumulation):
        micro_step = step * plan.accumulation + micro
        for slot in range(streams.per_rank):
            if slot < len(streams.mine):
                torch.manual_seed(stream_seed(plan.run_seed, plan.stage_index, micro_step, streams.mine[slot]))
                batch = to_device(next(batches[slot]), plan.device, plan.normalizer)
                weight = streams.loss_weight
            else:
                batch, weight = placeholder, 0.0
            out = engine(**batch, itm_seed=itm_seed(plan.run_seed, plan.stage_index,
                                                    micro_step * streams.per_rank + slot))
            engine.backward(out.loss * weight)
            engine.step()
            if weight:
                values = [out[field].detach().double() for field in plan.loss_fields]
                sums += torch.stack([*values, batch[plan.token_mask].sum().double()])
    clamp_masters(engine, engine.module.parameter_bounds())
    return sums
