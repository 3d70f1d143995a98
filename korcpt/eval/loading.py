"""Load a base model, optionally with a trained adapter, for standalone evaluation (tools/eval_*.py).

The base goes through the trainer's own loader (:func:`korcpt.model.load.load_model_and_tokenizer`:
presets, local directories, GGUF files, multimodal MedGemma), so an evaluated model is built exactly
as it was for training. A run's output directory keeps the run's tokenizer in ``tokenizer/``; when it
is there (or ``tokenizer`` is given) and is larger than the base vocabulary, the embeddings are grown
and initialised the way the trainer did before the adapter (LoRA and trained token rows) is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from korcpt.errors import ModelError
from korcpt.log import get_logger

log = get_logger(__name__)


def load_from_arguments(args: argparse.Namespace):
    """:func:`load_for_eval` with the options of :func:`korcpt.cli.add_model_arguments`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_for_eval(args.model, adapter=args.adapter, tokenizer=args.tokenizer, new_rows=args.new_rows,
                         dtype=args.dtype, device=device)


def adapter_tokenizer_dir(adapter: str | Path | None) -> Path | None:
    """``ADAPTER/tokenizer`` when the adapter directory holds one (the trainer saves it there)."""
    if adapter is None:
        return None
    path = Path(adapter) / "tokenizer"
    return path if path.is_dir() else None


def load_for_eval(model: str, *, adapter: str | Path | None = None, tokenizer: str | Path | None = None,
                  new_rows: str | Path | None = None, dtype: str = "auto", device: str = "cpu",
                  attn_implementation: str = "sdpa"):
    """A model in eval mode and its tokenizer.

    Args:
        model: preset (``gemma3-270m``, ``medgemma-4b``, ...), local directory, ``.gguf`` file or hub id.
        adapter: a PEFT adapter directory written by the trainer (``adapter_config.json``).
        tokenizer: tokenizer directory or preset; default ``ADAPTER/tokenizer`` if present, else the model's.
        new_rows: distilled rows of the tokenizer's new tokens (``tools/distill_rows.py``) for an untrained
            extended model; an adapter carries its own trained rows, so the two do not go together.
        dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the model.
        attn_implementation: attention kernel passed to transformers.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelError: the model, tokenizer or adapter cannot be found or combined.
    """
    from korcpt.config import ModelConfig
    from korcpt.model.load import load_model_and_tokenizer

    if new_rows is not None and adapter is not None:
        raise ModelError("new_rows start an untrained model; an adapter holds its own trained rows: give one of them")
    tok = tokenizer if tokenizer is not None else adapter_tokenizer_dir(adapter)
    mcfg = ModelConfig(name=str(model), tokenizer=str(tok) if tok is not None else "", dtype=dtype,
                       attn_implementation=attn_implementation, new_rows=str(new_rows or ""))
    dev = torch.device(device)
    base, tok_obj, new_ids = load_model_and_tokenizer(mcfg, dev)
    if new_ids:
        log.info("embeddings grown by %d rows for tokenizer %s", len(new_ids), tok)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"adapter directory {adapter} has no adapter_config.json (expected a PEFT adapter)")
        from peft import PeftModel

        try:
            base = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load adapter {adapter} onto {model}: {str(exc).splitlines()[0]}") from None
    return base.to(dev).eval(), tok_obj


def merge_adapter(model):
    """``model`` (a PeftModel from :func:`load_for_eval`) with LoRA folded into the linears and trained rows
    written into the embedding: a plain transformers model. Output rows of their own (``model.new_rows``,
    PEFT trainable tokens of the head) need a head of its own: the base's tied head is untied first
    (``tie_word_embeddings: false``), or merging them would overwrite the input rows in the shared weight."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    base = model.get_base_model()
    head = base.get_output_embeddings()
    adapter = getattr(head, "token_adapter", None)
    if isinstance(adapter, TrainableTokensLayer) and adapter.tied_adapter is None:
        linear = adapter.base_layer  # the base's weight, shared with the embedding: a copy of its own
        linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return model.merge_and_unload()
