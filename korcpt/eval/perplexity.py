"""Validation loss and perplexity, token-weighted over the whole set and across ranks.

    loss = sum over every target token of -log p(target) / number of target tokens     (all ranks)
    ppl  = exp(loss)

Each batch is what the packed reader yields: ``input_ids`` and ``labels`` of the same shape with the
labels already aligned (see :mod:`korcpt.model.loss`, whose token NLL training uses too), so nothing
is shifted here. A mean of per-batch means would weight a batch of 10 targets like one of 4,000; the
sums are carried instead and divided once, after the cross-rank reduction.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch

from korcpt.log import get_logger
from korcpt.model.loss import token_nll_per_position

log = get_logger(__name__)

# Per-source sums live in a fixed number of slots so that every rank reduces a tensor of the same
# shape even when a rank never saw some source.
MAX_SOURCES = 32


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _summary(nll_sum: float, tokens: float, sequences: float) -> dict:
    if tokens <= 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0, "sequences": int(sequences)}
    loss = nll_sum / tokens
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return {"loss": loss, "ppl": ppl, "tokens": int(tokens), "sequences": int(sequences)}


def evaluate_perplexity(
    model,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    source_names: Sequence[str] | None = None,
) -> dict:
    """Token-weighted validation loss and perplexity over every batch of every rank.

    Args:
        model: the causal LM; put in eval mode for the pass and restored to its previous mode.
        batches: this rank's batches (see :func:`korcpt.model.loss.token_nll`). A batch may carry ``token_source``,
            an integer tensor shaped like ``labels`` giving each target token's source id
            (0 <= id < 32); then a per-source breakdown is added.
        reduce: sums a float64 tensor over ranks (e.g. ``lambda t: accelerator.reduce(t, "sum")``);
            None in a single process. Every rank must call this function (it reduces once).
        source_names: names of the source ids for the breakdown (``str(id)`` when absent).

    Returns:
        ``{"loss", "ppl", "tokens", "sequences"}`` where ``loss`` is the sum of token NLL divided by
        the number of target tokens over all ranks, ``ppl = exp(loss)`` and ``sequences`` counts rows
        with at least one target; plus ``"by_source": {name: {same keys}}`` when any batch carried
        ``token_source``. ``loss`` and ``ppl`` are NaN when there was no target token.
    """
    device = model_device(model)
    # slots: [nll, tokens, sequences, any_source_flag, per-source nll x MAX_SOURCES, per-source tokens x MAX_SOURCES]
    stats = torch.zeros(4 + 2 * MAX_SOURCES, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = _to_device(batch, device)
                nll, mask = token_nll_per_position(model, batch)
                nll = (nll * mask).to(device)
                mask = mask.to(device)
                stats[0] += nll.sum(dtype=torch.float64)
                stats[1] += mask.sum()
                stats[2] += mask.any(dim=-1).sum() if mask.dim() > 1 else mask.any()
                source = batch.get("token_source")
                if source is not None:
                    source = source.to(device).long().view(-1)
                    if source.numel() and (source.min() < 0 or source.max() >= MAX_SOURCES):
                        raise ValueError(f"token_source ids must lie in 0..{MAX_SOURCES - 1}, "
                                         f"found {int(source.min())}..{int(source.max())}")
                    stats[3] = 1
                    flat_mask = mask.view(-1)
                    stats[4:4 + MAX_SOURCES] += torch.bincount(
                        source[flat_mask], weights=nll.view(-1)[flat_mask].double(), minlength=MAX_SOURCES)
                    stats[4 + MAX_SOURCES:] += torch.bincount(source[flat_mask], minlength=MAX_SOURCES).double()
    finally:
        model.train(was_training)
    if reduce is not None:
        stats = reduce(stats)
    stats = stats.cpu().tolist()
    result = _summary(stats[0], stats[1], stats[2])
    if stats[3] > 0:
        by_source = {}
        for sid in range(MAX_SOURCES):
            tokens = stats[4 + MAX_SOURCES + sid]
            if tokens > 0:
                name = source_names[sid] if source_names is not None and sid < len(source_names) else str(sid)
                summary = _summary(stats[4 + sid], tokens, 0)
                del summary["sequences"]  # a packed row mixes sources: only tokens are meaningful
                by_source[name] = summary
        result["by_source"] = by_source
    if result["tokens"] == 0:
        log.warning("validation set has no target token: loss and perplexity are NaN")
    return result
