"""Causal-LM cross-entropy over the output head, without holding ``[tokens, vocab]`` logits at once.

Gemma 3's vocabulary is 262,144 (282,738 after the Korean extension): the plain loss of one 4,096-token
micro-batch holds float32 logits of 4 GiB, their softmax and its gradient, several times what the
LoRA weights and activations need. :func:`causal_lm_loss` with ``chunk_tokens > 0`` computes the same
sum of token NLLs chunk by chunk (forward keeps only one float per token) and recomputes each chunk's
softmax in backward, so the largest temporary is ``[chunk_tokens, vocab]``.

Labels are already aligned: ``labels[b, t]`` is the target of position ``t`` (the shard reader
shifts them), ``-100`` marks positions without a target, and nothing here shifts again.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
        labels: ``[B, T]`` target token ids aligned with ``hidden``; ``-100`` is ignored.
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
        logits = (h @ weight.t()).float()
        if final_logit_softcapping:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum"), count
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
