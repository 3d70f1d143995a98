"""Model FLOPs per processed token of a LoRA run: the count the trainer's MFU (``training_info.json``,
TensorBoard ``train/mfu``) and ``bench/gpu.py`` both divide by.

The convention (bench/README.md, "MFU convention"), per token of a sequence of S tokens, no document
masking::

    N_frozen = sum of d_in x d_out over the language model's linears that LoRA adapts
               + V x H of the output head (V = the embedding's rows, padded); the embedding lookup and a
               vision tower (never run in text-only training) count nothing
    N_lora   = sum of r x (d_in + d_out) over the adapted linears
    A        = sum over layers of 4 x heads x head_dim x c, c = mean keys per query:
               (S + 1) / 2 for causal layers, mean of min(i + 1, W) for sliding-window layers of window W
    total    = 4 N_frozen + 6 N_lora + 2 n_new H + 3 A

forward 2 (N_frozen + N_lora) + A, activation gradients the same plus A, weight gradients only for
what trains: 2 N_lora, and 2 n_new H for the head rows that train (``n_new``). Recomputation under
gradient checkpointing, norms, activations, softmax, the loss and the optimizer are not counted.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from korcpt.config import LoraConfig
from korcpt.model.lora import lora_targets
from korcpt.model.zero3 import full_shape


def lora_flops_per_token(model: nn.Module, lcfg: LoraConfig, seq_len: int, new_rows: int) -> dict[str, float]:
    """FLOPs per processed token (the module docstring's ``total``) and its parts.

    Args:
        model: the base model before LoRA is applied, on any device (the meta device too; ZeRO-3
            partitioned parameters are counted by their full shape).
        lcfg: the run's LoRA settings (``r`` and ``target_modules``).
        seq_len: tokens per training sequence.
        new_rows: output-head rows whose weight gradient is computed (``n_new``).

    Returns:
        ``{"total", "n_frozen", "n_lora", "attention_fwd", "new_rows", "hidden"}``.
    """
    text = model.config.get_text_config()
    hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    n_lin = n_lora = 0
    for module in lora_targets(model, lcfg):
        n_lin += module.in_features * module.out_features
        n_lora += lcfg.r * (module.in_features + module.out_features)
    vocab_rows = _embedding_rows(model)
    layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
    full_ctx = (seq_len + 1) / 2
    w = min(getattr(text, "sliding_window", None) or seq_len, seq_len)  # mean over i < S of min(i + 1, W)
    sliding_ctx = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
    attention = sum(4 * heads * head_dim * (sliding_ctx if t == "sliding_attention" else full_ctx)
                    for t in layer_types[:layers])
    n_frozen = n_lin + vocab_rows * hidden
    total = 4 * n_frozen + 6 * n_lora + 2 * new_rows * hidden + 3 * attention
    return {"total": total, "n_frozen": n_frozen, "n_lora": n_lora, "attention_fwd": attention,
            "new_rows": new_rows, "hidden": hidden}


def arch_flops_per_token(arch: dict[str, Any], vocab_rows: int, seq_len: int, r: int, new_rows: int) -> dict[str, float]:
    """:func:`lora_flops_per_token` of an architecture config with ``vocab_rows`` embedding rows and
    LoRA of rank ``r`` on every language-model linear (built on the meta device: no memory)."""
    from korcpt.model.load import build_meta_model

    return lora_flops_per_token(build_meta_model(arch, vocab_rows), LoraConfig(r=r, target_modules="all-linear"),
                                seq_len, new_rows)


def trained_head_rows(model: nn.Module, lcfg: LoraConfig, new_ids: list[int]) -> int:
    """``n_new`` of the base ``model``: the output-head rows that get a weight gradient under
    ``lora.embeddings`` (the head trains with its tied embedding: the new rows, all of them, or none)."""
    return {"frozen": 0, "new_tokens": len(new_ids), "full": _embedding_rows(model)}[lcfg.embeddings]


def _embedding_rows(model: nn.Module) -> int:
    weight = model.get_input_embeddings().weight
    return int(full_shape(weight)[0])
