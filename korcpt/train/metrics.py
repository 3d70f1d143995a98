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


# Dense bf16 peak of one device, in TFLOP/s (vendor datasheets, SXM parts, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(configured: float) -> float | None:
    """The configured peak, or the datasheet peak of this CUDA device; None on CPU (no MFU there)."""
    import torch

    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def model_flops_per_token(model, trainable_params: int, seq_len: int) -> float:
    """Model FLOPs per trained token of a LoRA run (recomputation by checkpointing not counted).

    Convention: N = parameters the text forward multiplies with (the decoder, whose tied embedding
    is the output head; the vision tower is excluded). Forward 2N, backward input-gradients 2N, weight
    gradients only for what trains, 2 * trainable (a frozen base gets none), plus attention scores and
    values 12 * layers * hidden * seq_len (PaLM's term: 4 forward, 8 backward, no causal halving).
    """
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    decoder = base.get_decoder()
    n = sum(getattr(p, "ds_numel", p.numel()) for p in decoder.parameters())
    text = base.config.get_text_config()
    attention = 12 * text.num_hidden_layers * text.num_attention_heads * text.head_dim * seq_len
    return 4.0 * n + 2.0 * trainable_params + attention
