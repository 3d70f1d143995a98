"""The forward/loss layer shared by training and evaluation: model inputs of a token batch, token
negative log-likelihoods, and the output-head loss in chunks.

Labels are already aligned: ``labels[b, t]`` is the target of position ``t`` (the shard reader
shifts them), :data:`IGNORE_INDEX` (defined in :mod:`korcpt.labels`, below the stages, so that the
reader can write it) marks positions without a target, and nothing here shifts again.

Gemma 3's vocabulary is 262,144 (282,738 after the Korean extension): the plain loss of one 4,096-token
micro-batch holds float32 logits of 4 GiB, their softmax and its gradient, several times what the
LoRA weights and activations need. :func:`causal_lm_loss` with ``chunk_tokens > 0`` computes the same
sum of token NLLs chunk by chunk (forward keeps only one float per token) and recomputes each chunk's
softmax in backward, so the largest temporary is ``[chunk_tokens, vocab]``. :class:`HeadLoss` runs it
inside a model (ZeRO-3 gathers its weights), fed by :class:`FinalHidden`.
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
import torch.nn.functional as F

from korcpt.labels import IGNORE_INDEX
from korcpt.model.load import is_multimodal
from korcpt.model.lora import NewTokenHead, unwrap_base
from korcpt.model.zero3 import register_external

# Batch keys that are model inputs; anything else a batch carries (labels, sample_id, token_source) is not.
# The cu_seq_lens/max_length keys are FlashAttention varlen document boundaries (korcpt.model.packing).
MODEL_INPUT_KEYS = ("position_ids", "attention_mask", "token_type_ids",
                    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Rows of logits turned into float32 at a time: bounds the float32 copy for a 262k vocabulary.
LOGIT_CHUNK_ROWS = 4096


def forward_kwargs(model, batch: Mapping[str, torch.Tensor]) -> dict:
    """Keyword arguments of ``model(...)`` for a token batch.

    Passes ``input_ids`` and whichever of :data:`MODEL_INPUT_KEYS` the batch holds (the trainer's
    per-document masks among them); ``use_cache`` is off. A multimodal Gemma 3
    (``Gemma3ForConditionalGeneration``, e.g. MedGemma 4B) also gets ``token_type_ids``: zeros unless
    the batch has them, since every token is text. ``model`` may be wrapped (DDP, DeepSpeed, PEFT).
    """
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in MODEL_INPUT_KEYS:
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    if is_multimodal(unwrap_base(model)) and "token_type_ids" not in kwargs:
        kwargs["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return kwargs


def model_batch(model, batch: Mapping[str, torch.Tensor], document_mask: bool, device) -> dict:
    """A reader batch as the forward takes it, on ``device``: ``input_ids``, ``labels`` and, when packing
    is document-masked, the per-document masks built from the batch's restarting ``position_ids``
    (:func:`korcpt.model.packing.document_mask_kwargs`). Without document masking the position ids
    are left out: transformers would infer the same per-document mask from them by itself."""
    out = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device)}
    if document_mask:
        from korcpt.model.packing import document_mask_kwargs

        out.update(document_mask_kwargs(unwrap_base(model), batch["position_ids"].to(device)))
    return out


def logits_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 NLL of every position (0 where the label is :data:`IGNORE_INDEX`), shaped like ``labels``;
    logits are upcast :data:`LOGIT_CHUNK_ROWS` rows at a time. Differentiable."""
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device)
    parts = [F.cross_entropy(flat[start:start + LOGIT_CHUNK_ROWS].float(), flat_labels[start:start + LOGIT_CHUNK_ROWS],
                             ignore_index=IGNORE_INDEX, reduction="none")
             for start in range(0, flat_labels.numel(), LOGIT_CHUNK_ROWS)]
    nll = torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.float32)
    return nll.view(labels.shape)


def token_nll_per_position(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 NLL of every position, mask of target positions), both shaped like ``labels``."""
    output = model(**forward_kwargs(model, batch))
    logits = output.logits if hasattr(output, "logits") else output[0]
    labels = batch["labels"].to(logits.device)
    return logits_nll(logits, labels), labels != IGNORE_INDEX


def token_nll(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token negative log-likelihoods (float32) and the number of target tokens of one batch.

    Args:
        model: a causal LM (plain, PEFT-wrapped or prepared by Accelerate) returning ``.logits``.
        batch: ``input_ids`` and aligned ``labels`` (:data:`IGNORE_INDEX` ignored, not shifted again),
            optional :data:`MODEL_INPUT_KEYS`; tensors on the model's device.

    Returns:
        ``(nll_sum, n_tokens)``: 0-dim float32 and int64 tensors on the logits' device. Gradients
        flow when called outside ``torch.no_grad``.
    """
    nll, mask = token_nll_per_position(model, batch)
    return nll.sum(), mask.sum()


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int = 0,
    final_logit_softcapping: float | None = None,
    backend: Literal["auto", "torch", "liger"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token negative log-likelihoods of ``labels`` under ``hidden @ weight.T``.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the last norm), any float dtype.
        weight: ``[V, H]`` output head (for Gemma, the tied input embedding). May be frozen
            (``requires_grad=False``: no gradient is computed for it) or trainable.
        labels: ``[B, T]`` target token ids aligned with ``hidden``; :data:`IGNORE_INDEX` is ignored.
        chunk_tokens: 0 computes full logits (the reference); N > 0 processes N target tokens at a
            time with recomputation in backward.
        final_logit_softcapping: ``cap`` of ``logits = cap * tanh(logits / cap)`` (Gemma 2 style;
            None for Gemma 3).
        backend: ``auto`` uses liger-kernel's fused linear cross-entropy on CUDA when it is installed
            and ``chunk_tokens > 0``, else the PyTorch implementation here; ``torch``/``liger`` force one.

    Returns:
        ``(loss_sum, n_tokens)``: float32 scalar sum of NLLs over target tokens, and the int64 count
        of target tokens (divide by it, or by the count summed over accumulation steps and ranks).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, H] and labels [B, T]; found {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], found {tuple(weight.shape)}")
    # Every position meets the head, ignored ones masked out: selecting the targets first
    # (``nonzero``) would wait for the device once per micro-batch to learn how many there are.
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    count = (y != IGNORE_INDEX).sum()
    if chunk_tokens <= 0:
        logits, _ = _chunk_logits(h, weight, final_logit_softcapping)
        return logits_nll(logits, y).sum(), count
    if backend == "liger" or (backend == "auto" and hidden.is_cuda and _liger_available()):
        return _liger_loss(h, weight, y, final_logit_softcapping), count
    return _ChunkedLinearCrossEntropy.apply(h, weight, y, int(chunk_tokens), final_logit_softcapping), count


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except Exception:  # ImportError, or a Triton/CUDA mismatch raised at import
        return False
    return True


def _liger_loss(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (Triton, CUDA only); not exercised by the CPU tests."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if softcap:
        kwargs["softcap"] = softcap
    out = LigerFusedLinearCrossEntropyLoss(**kwargs)(weight, h, y)
    if isinstance(out, tuple):  # versions that can return (loss, z_loss)
        out = out[0]
    out = getattr(out, "loss", out)
    return out.float()


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """float32 logits of one chunk, and tanh(z / cap) when soft-capping (needed for the chain rule)."""
    logits = (h @ weight.t()).float()
    if not softcap:
        return logits, None
    t = torch.tanh(logits.div_(softcap))
    return t * softcap, t


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i [logsumexp(z_i) - z_i[y_i]] with z = cap(h @ W.T), over ``chunk`` rows of h at a time.

    Forward saves h, W and y (references, no copies) and nothing of size vocab. Backward recomputes
    each chunk's logits: dL/dz = g * (softmax(z) - onehot(y)), times (1 - tanh^2) under soft-capping;
    then dL/dh = dL/dz @ W and dL/dW += dL/dz.T @ h (accumulated in float32 across chunks).
    """

    @staticmethod
    def forward(ctx, h, weight, y, chunk, softcap):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            logits, _ = _chunk_logits(h[start : start + chunk], weight, softcap)
            yc = y[start : start + chunk]
            target = logits.gather(1, yc.clamp(min=0)[:, None]).squeeze(1)
            total += ((torch.logsumexp(logits, dim=-1) - target) * (yc != IGNORE_INDEX)).sum()
            del logits, target
        ctx.save_for_backward(h, weight, y)
        ctx.chunk, ctx.softcap = chunk, softcap
        return total

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, y = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        g = grad_out.float()
        rows = torch.arange(min(ctx.chunk, h.shape[0]), device=h.device)
        for start in range(0, h.shape[0], ctx.chunk):
            hc, yc = h[start : start + ctx.chunk], y[start : start + ctx.chunk]
            logits, t = _chunk_logits(hc, weight, ctx.softcap)
            dz = torch.softmax(logits, dim=-1)  # new buffer; logits freed below
            del logits
            dz[rows[: hc.shape[0]], yc.clamp(min=0)] -= 1.0
            dz.mul_((yc != IGNORE_INDEX)[:, None])  # ignored positions: no gradient
            if t is not None:
                dz.mul_(t.square_().neg_().add_(1.0))  # d(cap*tanh(z/cap))/dz = 1 - tanh^2
                del t
            dz.mul_(g)
            dz = dz.to(h.dtype)
            if need_h:
                grad_h[start : start + ctx.chunk] = dz @ weight
            if need_w:
                if dz.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), hc)
                else:  # a [V, H] product in the low-precision dtype, summed in float32
                    grad_w.add_(dz.t() @ hc)
            del dz
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


class HeadLoss(torch.nn.Module):
    """The chunked head loss (``train.loss_chunk_tokens``) as a module of the model.

    It reads the output head outside the head's own forward. DeepSpeed ZeRO-3 gathers a partitioned
    parameter only around the forward and backward of a module that owns or declares it, so the head
    weight (and the new-token rows) are declared to this module as external parameters, and the module
    is attached to the model before ``accelerator.prepare`` (:func:`attach_head_loss`) so that the
    engine hooks it like any layer.
    """

    def __init__(self, base, chunk_tokens: int):
        super().__init__()
        self._base = [base]  # a list keeps the model out of this module's children
        self.chunk_tokens = chunk_tokens
        self.softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        head = base.get_output_embeddings()
        register_external(self, [head.weight, head.new_rows] if isinstance(head, NewTokenHead) else [head.weight])

    def head_weight(self) -> torch.Tensor:
        """The output head as one [vocab, hidden] matrix (new-token rows spliced in when they train apart)."""
        head = self._base[0].get_output_embeddings()
        if isinstance(head, NewTokenHead):
            weight = head.weight
            return torch.cat([weight[:head.first], head.new_rows.to(weight.dtype), weight[head.first + head.count:]])
        return head.weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a float32 master (the full embedding) is used in the model dtype, as the head does
        return causal_lm_loss(hidden, self.head_weight().to(hidden.dtype), labels, chunk_tokens=self.chunk_tokens,
                              final_logit_softcapping=self.softcap)


class FinalHidden:
    """Catches the final hidden states (the output of the decoder's last norm) during a forward, so the
    loss can run over the output head in chunks (:class:`HeadLoss`) while the model itself computes
    logits for one position only (``logits_to_keep=1``).

    Build it after ``accelerator.prepare``: under ZeRO-3 the norm's output must be caught after the
    engine's own forward hook has wrapped it, or the norm's backward runs without its gathered weight.
    """

    def __init__(self, model, loss: HeadLoss):
        self.loss = loss
        self.value = None
        self.handle = unwrap_base(model).get_decoder().norm.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output

    def nll_sum(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, self.value = self.value, None
        return self.loss(value, labels)


def attach_head_loss(model, chunk_tokens: int) -> HeadLoss | None:
    """The chunked head loss when ``chunk_tokens`` (``train.loss_chunk_tokens``) asks for it, attached
    to the model as a module (it holds no parameters, so state dicts are unchanged). Call before
    ``accelerator.prepare``: the DeepSpeed engine hooks the modules it finds there."""
    if not chunk_tokens:
        return None
    base = unwrap_base(model)
    loss = HeadLoss(base, chunk_tokens)
    base.add_module("korcpt_head_loss", loss)
    return loss


def nll_sum(model, batch: Mapping[str, torch.Tensor], hidden: FinalHidden | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token NLL (float32) and number of target tokens of one training micro-batch: through the
    chunked head loss when ``hidden`` catches the final hidden states, else over the model's logits."""
    if hidden is None:
        return token_nll(model, batch)
    model(**forward_kwargs(model, batch), logits_to_keep=1)
    return hidden.nll_sum(batch["labels"])
