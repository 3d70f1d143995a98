"""Checkpoints written atomically, found again by ``--resume auto``, and the final adapter output.

A checkpoint is ``checkpoints/step-00000120/``: Accelerate's full training state (model, optimizer,
scheduler, RNG; DeepSpeed's ZeRO partitions under DeepSpeed) plus ``trainer_state.json`` (step and
token counters, the reader's resume state) and the resolved config. It is written under a
``.tmp-`` name and renamed when every rank has finished, so a crash while saving leaves the previous
checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from korcpt.errors import TrainingError
from korcpt.shards.format import atomic_write_json

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors keep it in the Rust module only
    from safetensors._safetensors_rust import SafetensorError

# What a failed checkpoint write raises (see save_checkpoint).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Counters a resumed run continues from (saved as trainer_state.json)."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (per rank)
    epoch: int = 0  # epoch of the data stream
    consumed: int = 0  # global sequences consumed in this epoch (all ranks)
    tokens_seen: int = 0  # target tokens trained on, all ranks
    train_seconds: float = 0.0
    bad_steps_total: int = 0
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    baseline: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary ``.tmp-`` folders never count)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_resume(root: Path, resume: str) -> Path | None:
    """``auto``: the newest complete checkpoint or None; a path: that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"--resume {resume}: not a complete korcpt checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator, root: Path, state: TrainerState, extra: dict, keep_last: int) -> Path:
    """Save the full training state atomically and prune old checkpoints (all ranks must call this)."""
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            payload = {"state": asdict(state), **extra}
            atomic_write_json(tmp / STATE_FILE, payload)
    except _WRITE_ERRORS as exc:
        # A full disk reaches us as OSError only from plain Python writes: torch.save raises RuntimeError
        # ("PytorchStreamWriter failed writing file ...") and safetensors SafetensorError ("I/O error: No
        # space left on device (os error 28)"). The half-written folder is removed to give the space back.
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).strip().splitlines() or [""])[0]
        raise TrainingError(
            f"could not write checkpoint {final} ({detail or type(exc).__name__}); the previous checkpoint is intact"
        ) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> tuple[TrainerState, dict]:
    """Restore the training state saved by :func:`save_checkpoint`.

    Raises:
        TrainingError: a file of the checkpoint is missing, damaged or refused (a pickle with a payload),
            naming the checkpoint, instead of torch's traceback.
    """
    payload = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    _check_rng_state(path / f"random_states_{accelerator.process_index}.pkl")
    try:
        accelerator.load_state(str(path))
    # torch's weights-only unpickler refusing a payload raises UnpicklingError, a truncated file
    # RuntimeError or EOFError, a missing one OSError: all mean this checkpoint cannot be restored
    except Exception as exc:  # noqa: BLE001 - the message keeps the type and first line of the cause
        raise TrainingError(f"checkpoint {path} cannot be restored ({_first_line(exc)}); "
                            f"resume from an older one with --resume PATH") from exc
    state = TrainerState(**payload.pop("state"))
    return state, payload


def _check_rng_state(path: Path) -> None:
    """Read this rank's RNG state as Accelerate will: Accelerate skips a file it cannot read with an info
    log, and the resumed run would silently stop being the uninterrupted one."""
    from accelerate.utils import load

    try:
        load(path)
    except Exception as exc:  # noqa: BLE001 - exactly what Accelerate would swallow
        raise TrainingError(f"checkpoint {path.parent} cannot be restored: {path.name} is unreadable "
                            f"({_first_line(exc)}); resume from an older one with --resume PATH") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__
