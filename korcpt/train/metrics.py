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
