"""TensorBoard scalars (namespaced, with units in their names where they have one) and the run record."""

from __future__ import annotations

import subprocess
from pathlib import Path

from korcpt.log import get_logger

log = get_logger(__name__)


class Metrics:
    """Writes TensorBoard event files on rank 0; a no-op on other ranks."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, and the git revision of korcpt."""
    import importlib.metadata as md

    out = {}
    for name in ("korcpt", "torch", "transformers", "peft", "deepspeed", "accelerate", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        root = Path(__file__).resolve().parents[2]
        out["git_revision"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = None
    return out


# Dense bf16 peak of one device in TFLOP/s (vendor datasheets, no sparsity), as (substring of
# torch.cuda.get_device_name(), TFLOP/s); the first match wins, so variants come before their family.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


def datasheet_peak_tflops(device_name: str | None) -> float | None:
    """The datasheet peak of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    return next((value for key, value in PEAK_TFLOPS if device_name and key in device_name), None)


def peak_tflops(configured: float) -> float | None:
    """The configured peak, or the datasheet peak of this CUDA device; None on CPU (no MFU there)."""
    import torch

    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    return datasheet_peak_tflops(torch.cuda.get_device_name())


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak (None without a peak)."""
    return tokens_per_sec_per_device * flops_per_token / (peak * 1e12) if peak else None


def model_flops_per_token(model, trainable_params: int, seq_len: int) -> float:
    """Model FLOPs per trained token of a LoRA run (recomputation by checkpointing not counted).

    Convention: N = parameters the text forward multiplies with (the decoder, whose tied embedding
    is the output head; the vision tower is excluded). Forward 2N, backward input-gradients 2N, weight
    gradients only for what trains, 2 * trainable (a frozen base gets none), plus attention scores and
    values 12 * layers * hidden * seq_len (PaLM's term: 4 forward, 8 backward, no causal halving).
    """
    from korcpt.model.lora import unwrap_base

    base = unwrap_base(model)
    decoder = base.get_decoder()
    n = sum(getattr(p, "ds_numel", p.numel()) for p in decoder.parameters())
    text = base.config.get_text_config()
    attention = 12 * text.num_hidden_layers * text.num_attention_heads * text.head_dim * seq_len
    return 4.0 * n + 2.0 * trainable_params + attention
