"""Embedding rows for the new tokens of an extended tokenizer (built by :mod:`korcpt.vocab.extend`).

When the tokenizer is larger than the model's vocabulary, :func:`resize_and_init_embeddings` grows the
input embedding (and the output head, when it is not tied to it) to ``len(tokenizer)`` rounded up to
a multiple of 64, and initialises:

* each new token's row to the mean of the rows of the pieces the *base* tokenizer makes of the
  token's text (sub-token interpolation, as in Unsloth, NVIDIA's tokenizer extension and the
  vocabulary-extension literature): the model starts by reading ``▁간염`` as it read ``▁간`` + ``염``;
  the output head's row is the mean of the pieces' output rows, in the same way;
* padding rows (ids at or past ``len(tokenizer)``, never produced by the tokenizer) to the mean of
  all base rows: their logits start near the average instead of at an arbitrary value, and a stray
  id reads as an "average token" rather than as zeros;
* every other row stays bit-identical, and tied weights stay tied.

Distilled rows (:mod:`korcpt.model.distill`, ``model.new_rows``) replace the new tokens' mean rows
after this: :func:`apply_new_rows` writes the input rows into the embedding and gives the output rows a
head of their own (:class:`korcpt.model.lora.NewTokenHead`); :func:`write_rows`/:func:`read_rows` own
their file.

Under DeepSpeed ZeRO-3 the weights are gathered (``GatheredParameters``, rank 0 writes) and
re-partitioned on exit. Resize before ``deepspeed.initialize`` / ``accelerator.prepare``: the engine
then partitions the new, larger parameter like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from korcpt.errors import ModelError
from korcpt.files import replace_dir, staging_dir
from korcpt.log import get_logger
from korcpt.model.zero3 import full_shape, gathered

log = get_logger(__name__)

ROWS_FILE = "rows.safetensors"
VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of this (GPU-friendly matrix shapes)


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``: the embedding rows a vocabulary of ``n`` gets."""
    multiple = max(multiple, 1)
    return -(-n // multiple) * multiple


def new_token_ids(base_vocab_size: int, tokenizer) -> list[int]:
    """Ids of ``tokenizer`` that the base tokenizer (with ``base_vocab_size`` ids) does not have."""
    return sorted(i for i in tokenizer.get_vocab().values() if i >= base_vocab_size)


def pieces_of(base_tokenizer, new_tokenizer, token_ids: Iterable[int]) -> dict[int, list[int]]:
    """token id -> ids of the pieces the base tokenizer makes of the text of ``new_tokenizer``'s token.

    A token of the BPE model (``▁간염``) is split by the base BPE model directly, so the leading
    ``▁`` stays part of the first piece exactly as in running text; any other token (an added token)
    is decoded to text and encoded without special tokens. The added tokens are read once: reading them
    costs about 11 ms on Gemma's tokenizer, 220 s if done for each of 20,000 new tokens.
    """
    added = {t.content for t in new_tokenizer.added_tokens_decoder.values()}
    model = base_tokenizer.backend_tokenizer.model
    out = {}
    for token_id in token_ids:
        token = new_tokenizer.convert_ids_to_tokens(token_id)
        if token not in added and hasattr(model, "get_vocab"):
            out[token_id] = [t.id for t in model.tokenize(token)]
        else:
            out[token_id] = base_tokenizer.encode(new_tokenizer.decode([token_id]), add_special_tokens=False)
    return out


def _rows(param: torch.nn.Parameter) -> int:
    return int(full_shape(param)[0])


@torch.no_grad()
def _init_rows(weight: torch.Tensor, pieces: dict[int, list[int]], pad_ids: range, base_size: int) -> None:
    mean_all = weight[:base_size].float().mean(0)
    for token_id, ids in pieces.items():
        src = weight[ids].float().mean(0) if ids else mean_all
        weight[token_id] = src.to(weight.dtype)
    if len(pad_ids):
        weight[pad_ids.start : pad_ids.stop] = mean_all.to(weight.dtype)


def resize_and_init_embeddings(model, base_tokenizer, new_tokenizer, pad_to_multiple_of: int = VOCAB_MULTIPLE) -> list[int]:
    """Grow ``model``'s vocabulary to fit ``new_tokenizer`` and initialise the new rows (see module doc).

    Args:
        model: a transformers ``PreTrainedModel`` whose vocabulary matches ``base_tokenizer``.
        base_tokenizer: the tokenizer the model was trained with.
        new_tokenizer: its extension (base ids unchanged, new ids after them).
        pad_to_multiple_of: the new vocabulary size is ``len(new_tokenizer)`` rounded up to this.

    Returns:
        The new token ids (``>= len(base_tokenizer)``, ``< len(new_tokenizer)``), sorted.

    Raises:
        ModelError: the tokenizers disagree on a base token, the model is smaller than the base
            tokenizer, or after resizing the config's vocab_size or the weight tying is wrong.
    """
    base_size = len(base_tokenizer)
    base_vocab = base_tokenizer.get_vocab()
    new_vocab = new_tokenizer.get_vocab()
    moved = [t for t, i in base_vocab.items() if new_vocab.get(t) != i]
    if moved:
        raise ModelError(
            f"{len(moved)} base tokens have another id in the new tokenizer (e.g. {moved[0]!r}: "
            f"{base_vocab[moved[0]]} -> {new_vocab.get(moved[0])}); expected an extension that keeps base ids"
        )
    new_ids = new_token_ids(base_size, new_tokenizer)
    emb = model.get_input_embeddings()
    old_rows = _rows(emb.weight)
    if old_rows < base_size:
        raise ModelError(f"model has {old_rows} embedding rows, fewer than the base tokenizer's {base_size} tokens")
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    target = max(old_rows, padded_vocab(len(new_tokenizer), pad_to_multiple_of))
    if target > old_rows:
        model.resize_token_embeddings(target, mean_resizing=False)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config.vocab_size != target or _rows(model.get_input_embeddings().weight) != target:
        raise ModelError(
            f"after resizing, config.vocab_size is {text_config.vocab_size} and the embedding has "
            f"{_rows(model.get_input_embeddings().weight)} rows; expected {target} (a ZeRO-3 resize bug?)"
        )

    pieces = pieces_of(base_tokenizer, new_tokenizer, new_ids)
    pad_ids = range(max(old_rows, len(new_tokenizer)), target)  # rows that existed before keep their values
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    with gathered(weights) as writer:
        if writer:
            for weight in weights:
                _init_rows(weight.data, pieces, pad_ids, base_size)
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ModelError("the output head was tied to the input embedding before resizing and is not after")
    log.info("vocabulary %d -> %d rows: %d new tokens initialised from their base pieces, %d padding rows",
             old_rows, target, len(new_ids), len(pad_ids))
    return new_ids


# ---------------------------------------------------------------- distilled rows (korcpt.model.distill)


def write_rows(out_dir: Path, input_rows: torch.Tensor, output_rows: torch.Tensor, first: int, report: dict) -> None:
    """``rows.safetensors`` (``input``/``output`` float32 ``[new tokens, hidden]``, ``first_id``) and
    ``report.json`` into a sibling of ``out_dir``, renamed into place: a killed run leaves no partial output."""
    from safetensors.torch import save_file

    with staging_dir(out_dir) as tmp:
        save_file({"input": input_rows.contiguous().float(), "output": output_rows.contiguous().float()},
                  str(tmp / ROWS_FILE), metadata={"first_id": str(first)})
        (tmp / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir)


def read_rows(directory: str | Path) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(first id, input rows, output rows) of a directory written by :func:`write_rows`.

    Raises:
        ModelError: no rows file, or one without both tensors and the first id.
    """
    from safetensors import safe_open

    path = Path(directory) / ROWS_FILE
    if not path.is_file():
        raise ModelError(f"model.new_rows: {directory} has no {ROWS_FILE} "
                         "(expected the output of tools/distill_rows.py)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "first_id" not in meta or set(fh.keys()) != {"input", "output"}:
            raise ModelError(f"{path}: expected tensors input and output and a first_id, found {sorted(fh.keys())}")
        return int(meta["first_id"]), fh.get_tensor("input"), fh.get_tensor("output")


def apply_new_rows(model, directory: str | Path, new_ids: list[int]) -> None:
    """Set the new tokens' rows from a :func:`write_rows` directory: the input rows into the embedding, and
    the output rows into a :class:`~korcpt.model.lora.NewTokenHead` of their own (the base head stays tied
    to the embedding for every other id).

    Raises:
        ModelError: the file's rows are for other ids or another hidden size than the model's.
    """
    from korcpt.model.lora import NewTokenHead, module_name, replace_module

    first, inputs, outputs = read_rows(directory)
    emb = model.get_input_embeddings()
    hidden = int(full_shape(emb.weight)[1])
    expected = (new_ids[0], len(new_ids), hidden) if new_ids else (None, 0, hidden)
    if (first, len(inputs), inputs.shape[1]) != expected or outputs.shape != inputs.shape:
        raise ModelError(f"model.new_rows: {directory} holds {len(inputs)} rows of {inputs.shape[1]} from id {first}; "
                         f"expected {expected[1]} rows of {hidden} from id {expected[0]} "
                         "(rows of another tokenizer or model?)")
    with gathered([emb.weight]) as writer:
        if writer:
            with torch.no_grad():
                emb.weight[first:first + len(inputs)] = inputs.to(emb.weight.dtype)
    head = model.get_output_embeddings()
    replace_module(model, module_name(model, head), NewTokenHead(head, first, len(inputs), rows=outputs))
    log.info("new rows from %s: %d input rows, %d output rows of their own", directory, len(inputs), len(outputs))
