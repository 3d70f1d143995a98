"""Document-masked packing: no token attends across a document boundary inside a packed sequence.

The shard reader yields ``position_ids`` ``[B, T]`` that restart at 0 at every document start (a
sequence may also begin in the middle of a document, with a non-zero first position). A new
document starts wherever the position does not continue the previous one by exactly +1, and at
column 0 of every row. Worked example, one row of T = 8::

    position_ids  0 1 2 | 0 1 | 0 1 2
    doc_ids       0 0 0 | 1 1 | 2 2 2
    token 4 (pos 1 of doc 1) attends to tokens 3, 4 only.

How each attention kernel gets that mask (transformers 5.24, Gemma 3):

* ``eager`` / ``sdpa``: an explicit 4D mask ``[B, 1, T, T]``: additive for eager (0 where allowed,
  dtype min where masked, in the model's dtype), boolean for SDPA (no dtype to match). Gemma 3
  alternates sliding-window and full layers, so the model takes a dict
  ``{"full_attention": m, "sliding_attention": m_sliding}`` as ``attention_mask``; both
  ``Gemma3ForCausalLM`` and ``Gemma3ForConditionalGeneration`` pass a dict through untouched.
  (transformers also infers the same document mask by itself from restarting ``position_ids``
  when ``attention_mask`` is None and there is no cache; passing it explicitly does not depend on
  that heuristic. The flip side: a caller that does NOT want document masking must not pass
  restarting position ids.)
* ``flash_attention_2`` / ``flash_attention_3``: no mask; the varlen kernel gets cumulative
  document lengths ``cu_seq_lens_q/k`` over the flattened ``B*T`` tokens and ``max_length_q/k``
  (transformers' ``_flash_attention_forward`` takes them as kwargs and flattens the batch itself),
  so rows and documents are both boundaries and nothing is padded.
* ``flex_attention``: transformers builds a BlockMask from restarting ``position_ids``
  (``attention_mask=None``); only the position ids are passed.

In every case ``use_cache=False``: a cache disables packed-sequence handling in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from korcpt.errors import ModelError


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` index of the document each token belongs to (0, 1, ... within each row)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T], found shape {tuple(position_ids.shape)}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1) - 1


def document_attention_mask(
    position_ids: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """Mask ``[B, 1, T, T]``: additive (0 where query t may attend key s, ``finfo(dtype).min`` elsewhere)
    for a float ``dtype``; for ``torch.bool``, True where attending is allowed (what SDPA takes).

    Allowed means causal (s <= t), same document, and, with ``sliding_window = w``, t - s < w (the
    Gemma 3 local layers: transformers' ``kv_idx > q_idx - sliding_window``).
    """
    doc = document_ids(position_ids)
    t = position_ids.shape[1]
    idx = torch.arange(t, device=position_ids.device)
    allowed = (idx[None, :] <= idx[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    if sliding_window is not None:
        allowed &= (idx[:, None] - idx[None, :] < sliding_window)[None]
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """FlashAttention varlen kwargs: document boundaries over the flattened ``B*T`` tokens."""
    doc = document_ids(position_ids)
    b, t = doc.shape
    # A document starts at column 0 of every row and wherever doc_ids step.
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([offsets, torch.tensor([b * t], device=doc.device)]).to(torch.int32)
    max_len = int(cu.diff().max().item())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def document_mask_kwargs(model: torch.nn.Module, position_ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for ``model(input_ids=..., **kwargs)`` that mask attention per document.

    Works for Gemma 3 (text and multimodal, PEFT-wrapped or not) and for models with one layer
    type. The returned dict always holds ``position_ids`` (so RoPE restarts per document) and
    ``use_cache=False``; see the module docstring for what each attention implementation gets.

    Raises:
        ModelError: for an attention implementation this cannot mask.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(config, "_attn_implementation", None) or getattr(text, "_attn_implementation", None) or "eager"
    kwargs: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if "flash" in impl:
        kwargs.update(varlen_kwargs(position_ids))
        return kwargs
    if impl == "flex_attention":
        kwargs["attention_mask"] = None
        return kwargs
    if impl not in ("eager", "sdpa"):
        raise ModelError(
            f"document masking supports attention eager, sdpa, flex_attention and flash_attention_2/3, found {impl!r}"
        )
    dtype = torch.bool if impl == "sdpa" else _compute_dtype(model)
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    masks = {}
    for kind in layer_types:
        window = getattr(text, "sliding_window", None) if kind == "sliding_attention" else None
        masks[kind] = document_attention_mask(position_ids, dtype, window)
    kwargs["attention_mask"] = masks if getattr(text, "layer_types", None) else masks["full_attention"]
    return kwargs


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """dtype of the attention scores (eager adds the mask to them): that of the frozen weights, since
    trainable ones are float32 masters whatever the model dtype (korcpt.model.lora)."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in floating if not p.requires_grad]
    return (frozen or floating)[0].dtype if floating else torch.float32
