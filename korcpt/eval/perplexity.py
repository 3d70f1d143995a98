"""Validation loss and perplexity, token-weighted over the whole set and across ranks.

    loss = sum over every target token of -log p(target) / number of target tokens     (all ranks)
    ppl  = exp(loss)

Each batch is what the packed reader yields: ``input_ids`` and ``labels`` of the same shape with the
labels already aligned (``labels[t]`` is the target of position ``t``; -100 is ignored), so nothing
is shifted here. A mean of per-batch means would weight a batch of 10 targets like one of 4,000; the
sums are carried instead and divided once, after the cross-rank reduction.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from korcpt.log import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100
# Per-source sums live in a fixed number of slots so that every rank reduces a tensor of the same
# shape even when a rank never saw some source.
MAX_SOURCES = 32
# Rows of logits turned into float32 at a time: bounds the float32 copy for a 262k vocabulary.
_CE_CHUNK_ROWS = 4096


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# Batch keys that are model inputs; anything else a batch carries (labels, sample_id, token_source) is not.
# The cu_seq_lens/max_length keys are FlashAttention varlen document boundaries (korcpt.model.packing).
MODEL_INPUT_KEYS = ("position_ids", "attention_mask", "token_type_ids",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_config(model):
    """The transformers config of a model, seen through DDP/DeepSpeed (``.module``) wrappers; PEFT
    models forward ``.config`` themselves."""
    while getattr(model, "config", None) is None and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


def forward_kwargs(model, batch: Mapping[str, torch.Tensor]) -> dict:
    """Keyword arguments of ``model(...)`` for a token batch.

    Passes ``input_ids`` and whichever of :data:`MODEL_INPUT_KEYS` the batch holds (so the trainer's
    per-document masks reach the model); ``use_cache`` is off. A multimodal Gemma 3
    (``Gemma3ForConditionalGeneration``, ``model_type == "gemma3"``, e.g. MedGemma 4B) also needs
    ``token_type_ids``: all zeros unless the batch has them, since every token is text.
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in MODEL_INPUT_KEYS:
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    if getattr(model_config(model), "model_type", "") == "gemma3" and "token_type_ids" not in kwargs:
        kwargs["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return kwargs


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _token_nll_per_token(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll of every position in float32, mask of target positions), both shaped like ``labels``."""
    logits = _logits(model(**forward_kwargs(model, batch)))
    labels = batch["labels"].to(logits.device)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    nll = torch.zeros(flat_labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, flat_labels.numel(), _CE_CHUNK_ROWS):
        stop = start + _CE_CHUNK_ROWS
        nll[start:stop] = F.cross_entropy(
            flat_logits[start:stop].float(), flat_labels[start:stop], ignore_index=IGNORE_INDEX, reduction="none"
        )
    mask = flat_labels != IGNORE_INDEX
    return nll.view_as(labels), mask.view_as(labels)


def token_nll(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token negative log-likelihoods (float32) and the number of target tokens of one batch.

    Args:
        model: a causal LM (plain, PEFT-wrapped or prepared by Accelerate) returning ``.logits``.
        batch: ``input_ids`` and aligned ``labels`` (-100 ignored, not shifted again), optional
            ``position_ids`` and ``attention_mask``; tensors on the model's device.

    Returns:
        ``(nll_sum, n_tokens)``: 0-dim float32 and int64 tensors on the logits' device. Gradients
        flow when called outside ``torch.no_grad``.
    """
    nll, mask = _token_nll_per_token(model, batch)
    return (nll * mask).sum(), mask.sum()


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
        batches: this rank's batches (see :func:`token_nll`). A batch may carry ``token_source``,
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
                nll, mask = _token_nll_per_token(model, batch)
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
