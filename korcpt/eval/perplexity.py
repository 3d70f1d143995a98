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
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from korcpt.corpus.text import hangul_syllables
from korcpt.log import get_logger
from korcpt.model.loss import IGNORE_INDEX, model_batch, token_nll_per_position

log = get_logger(__name__)

# Per-source sums live in a fixed number of slots so that every rank reduces a tensor of the same
# shape even when a rank never saw some source.
MAX_SOURCES = 32
LN2 = math.log(2)


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
            (0 <= id < 32); then a per-source breakdown is added. A batch may also carry
            ``target_chars``, the characters each row's targets cover (:func:`target_chars`); then
            ``bpc``, bits per character, is added.
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
    # slots: [nll, tokens, sequences, any_source_flag, per-source nll x MAX_SOURCES, per-source tokens x
    # MAX_SOURCES, target characters]
    stats = torch.zeros(5 + 2 * MAX_SOURCES, dtype=torch.float64, device=device)
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
                if batch.get("target_chars") is not None:
                    stats[-1] += batch["target_chars"].to(device).sum(dtype=torch.float64)
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
                    stats[4 + MAX_SOURCES:-1] += torch.bincount(source[flat_mask], minlength=MAX_SOURCES).double()
    finally:
        model.train(was_training)
    if reduce is not None:
        stats = reduce(stats)
    stats = stats.cpu().tolist()
    result = _summary(stats[0], stats[1], stats[2])
    if stats[-1] > 0:
        result["bpc"] = stats[0] / LN2 / stats[-1]
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


# ---------------------------------------------------------------- bits per character on text


def val_batches(model, val_set, *, max_sequences: int, batch_size: int, document_mask: bool, rank: int = 0,
                world_size: int = 1, device: torch.device | None = None,
                extra: Callable[[dict], dict] | None = None) -> Iterator[dict]:
    """This rank's share of the first ``max_sequences`` validation sequences (0: all) in stored order,
    batched as the training forward takes them (:func:`korcpt.model.loss.model_batch`), each batch with
    ``token_source``: the source id of every target, for per-source losses.

    Args:
        val_set: the validation split (a shard source with ``source_ids``).
        device: where the batches go (default: the model's).
        extra: more keys for a batch, computed from the reader's batch (``sample_id``, ``labels`` ...).
    """
    from korcpt.shards.reader import SequenceStream

    device = model_device(model) if device is None else device
    stream = SequenceStream(val_set, seed=0, rank=rank, world_size=world_size, shuffle=False, limit=max_sequences)
    for batch in torch.utils.data.DataLoader(stream, batch_size=batch_size):
        # source_ids covers the seq_len + 1 window; labels are window[1:], so their sources are [1:] too.
        sources = torch.stack([torch.from_numpy(val_set.source_ids(int(i))[1:].astype("int64"))
                               for i in batch["sample_id"]])
        yield {**model_batch(model, batch, document_mask, device), "token_source": sources.to(device),
               **(extra(batch) if extra else {})}


def read_heldout_texts(path: Path) -> tuple[list[str], list[str]]:
    """Held-out texts to score in bits per character: a ``.txt`` holds one per non-empty line, a
    ``.jsonl`` one ``{"text": ...}`` per line. Returns ``(texts, skipped)``; a JSONL line that is not
    such an object is skipped with a message naming its file and line."""
    from korcpt.errors import DataError
    from korcpt.files import Record, Rejected, iter_jsonl

    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"{path}: expected a .txt (a document a line) or .jsonl ({{\"text\"}} a line) file")
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], []
    texts, skipped = [], []
    for rec in iter_jsonl(path, allow_empty=True):
        text = rec.value.get("text") if isinstance(rec, Record) and isinstance(rec.value, dict) else None
        if isinstance(rec, Rejected):
            skipped.append(str(rec))
        elif not isinstance(text, str) or not text.strip():
            skipped.append(f"{rec.where}: expected an object with a non-empty \"text\"")
        else:
            texts.append(text)
    return texts, skipped


def target_chars(tokenizer, labels: torch.Tensor) -> torch.Tensor:
    """The characters each row of ``labels`` covers: its target tokens decoded without special tokens
    (``<bos>``/``<eos>`` cover no text), as :func:`score_text` counts ``len(text)`` for a document."""
    rows = [[int(t) for t in row if t != IGNORE_INDEX] for row in labels.tolist()]
    return torch.tensor([len(tokenizer.decode(r, skip_special_tokens=True)) for r in rows], dtype=torch.long)


def _document_ids(tokenizer, text: str) -> list[int]:
    """``<bos>`` and the tokens of ``text``, without ``<eos>``: each document is scored from ``<bos>``."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos:
        ids = ids[:-1]
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def score_text(model, tokenizer, texts: Sequence[str], *, batch_size: int = 4) -> dict:
    """Bits per character (and per Hangul syllable) of a model/tokenizer pair on plain documents.

    Each document is scored alone from ``<bos>``; its targets are every token after it (no ``<eos>``),
    and its characters are ``len(text)``. Because characters, unlike tokens, do not depend on the
    tokenizer, ``bpc`` compares a base tokenizer with an extended one on the same text:
    ``bpc = sum of token NLL / ln 2 / characters``.

    Returns:
        ``bpc``, ``bits_per_syllable``, ``ppl`` (per token), ``nll_sum`` (nats), ``tokens`` (targets),
        ``chars``, ``syllables``, ``documents`` and ``tokens_per_100_chars``.
    """
    result = evaluate_perplexity(model, _text_batches(tokenizer, texts, batch_size))  # the validation pass
    nll_sum, tokens = result["loss"] * result["tokens"], result["tokens"]
    chars = sum(len(t) for t in texts)
    syllables = sum(hangul_syllables(t) for t in texts)
    return {"bpc": result.get("bpc", float("nan")),
            "bits_per_syllable": nll_sum / LN2 / syllables if syllables else None,
            "ppl": result["ppl"], "nll_sum": nll_sum, "tokens": tokens, "chars": chars, "syllables": syllables,
            "documents": len(texts), "tokens_per_100_chars": 100.0 * tokens / chars if chars else float("nan")}


def _text_batches(tokenizer, texts: Sequence[str], batch_size: int) -> Iterable[dict]:
    """Right-padded batches of whole documents (positions count from 0, the model's default), with
    ``target_chars`` = ``len(text)`` so that :func:`evaluate_perplexity` adds bits per character."""

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        docs = texts[start:start + batch_size]
        rows = [_document_ids(tokenizer, t) for t in docs]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, :len(row) - 1] = torch.tensor(row[1:])
            mask[i, :len(row)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "target_chars": torch.tensor([len(t) for t in docs])}
