"""One optimizer step: ``grad_accum`` micro-batches, token-weighted over all ranks, one host sync.

Two clocks: a *micro-step* is one forward/backward of ``micro_batch_size`` sequences on each rank; an
*optimizer step* is ``grad_accum`` micro-steps. The loss of an optimizer step is the mean over every
target token of its micro-batches on every rank (token-weighted, not a mean of per-batch means): each
micro-batch contributes ``sum(token NLL) / N`` where ``N`` counts the step's target tokens on all ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from korcpt.config import RunConfig
from korcpt.model.loss import IGNORE_INDEX, FinalHidden, model_batch, nll_sum


@dataclass
class Engine:
    """What an optimizer step needs: the prepared model, optimizer and schedule, the accelerator, the
    trainable parameters (clipped) and, with the chunked loss, the catcher of the final hidden states."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    trainable: list
    hidden: FinalHidden | None


@dataclass
class StepResult:
    """One optimizer step: the token-weighted loss over all ranks, its target tokens, the gradient norm
    (None where the engine reports none), whether it was finite (else it was skipped), this rank's
    sequence ids, and its wall seconds."""

    loss: float
    tokens: int
    grad_norm: float | None
    finite: bool
    sample_ids: list[int]
    seconds: float


def train_step(engine: Engine, batches: Iterator[dict], cfg: RunConfig) -> StepResult:
    """Accumulate ``grad_accum`` micro-batches and take one optimizer step (or skip it if non-finite).

    The host waits for the device once per optimizer step, to learn whether the step is finite: the
    token count, the loss and the finite flag stay on the device until then (tests/test_train.py
    counts the synchronising ops).
    """
    t0 = time.perf_counter()
    accelerator, model = engine.accelerator, engine.model
    micro = [next(batches) for _ in range(cfg.train.grad_accum)]
    device = accelerator.device
    local_tokens = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro]).sum()  # on the host: no sync
    tokens = accelerator.reduce(local_tokens.to(device), "sum")
    # backward() divides by grad_accum and DDP/DeepSpeed average over ranks: undo both so the gradient
    # is that of sum(NLL over the step's tokens on all ranks) / tokens.
    scale = cfg.train.grad_accum * accelerator.num_processes / tokens.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.float32, device=device)
    for batch in micro:
        with accelerator.accumulate(model):
            nll, _ = nll_sum(model, model_batch(model, batch, cfg.data.document_mask, device), engine.hidden)
            finite = finite * torch.isfinite(nll)
            accelerator.backward(nll * scale)
            loss_sum += nll.detach().double()
    loss_sum = accelerator.reduce(loss_sum, "sum")
    finite = accelerator.reduce(finite, "min")
    # the norm is computed even without clipping (max_norm inf): a non-finite gradient skips the step
    grad_norm = accelerator.clip_grad_norm_(engine.trainable, cfg.train.grad_clip or float("inf"))
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips inside its engine
        grad_norm = model.get_global_grad_norm()
    norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64, device=device)
    loss_total, token_count, all_finite, norm = torch.stack(  # the step's one host sync
        [loss_sum, tokens.double(), finite.double(), norm.double()]).tolist()
    grad_norm = None if grad_norm is None else norm
    ok = bool(all_finite) and math.isfinite(loss_total) and (grad_norm is None or math.isfinite(grad_norm))
    if ok:
        engine.optimizer.step()
        engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    count = int(token_count)
    return StepResult(loss=loss_total / max(count, 1), tokens=count, grad_norm=grad_norm, finite=ok,
                      sample_ids=[i for b in micro for i in b["sample_id"].tolist()],
                      seconds=time.perf_counter() - t0)
