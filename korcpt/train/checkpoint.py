"""Checkpoints written atomically, found again by ``--resume auto``, and the final adapter output.

A checkpoint is ``checkpoints/step-00000120/``: Accelerate's full training state (model, optimizer,
scheduler, RNG; DeepSpeed's ZeRO partitions under DeepSpeed) plus ``trainer_state.json``: the trainer's
counters, the reader's stream state (``SequenceStream.state_dict()``), the identity of the data order
and the resolved config. It is written under a ``.tmp-`` name and renamed when every rank has
finished, so a crash while saving leaves the previous checkpoint as the newest complete one.

A resume compares the saved data order with the configured one (:func:`data_order`) and refuses a
mismatch in one line with found/expected: another seed, other shards of the same size, another
sample limit or another global batch would silently train a different order. Another world size
with the same global batch continues exactly (the order does not depend on the number of ranks),
except under DeepSpeed, whose ZeRO partitions are per rank.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from korcpt.config import RunConfig
from korcpt.errors import TrainingError
from korcpt.files import atomic_write_json, replace_dir
from korcpt.log import get_logger

log = get_logger(__name__)

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors keep it in the Rust module only
    from safetensors._safetensors_rust import SafetensorError

# What a failed checkpoint write raises (see save_checkpoint).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
BEST_DIR, BEST_FILE = "best", "best.json"  # checkpoints/best: the best adapter and its evaluation


@dataclass
class TrainerState:
    """Counters a resumed run continues from (saved in trainer_state.json). Its size does not grow
    with the run: per-step losses and evaluations go to the append-only ``metrics.jsonl``
    (:class:`korcpt.train.metrics.RunRecord`), where the stream's position is the stream's own state."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # target tokens trained on, all ranks
    train_seconds: float = 0.0
    bad_steps_total: int = 0
    bad_in_a_row: int = 0  # non-finite steps skipped since the last good one (0 at every save)
    best_val_loss: float | None = None
    best_step: int | None = None  # the step of best_val_loss, whose adapter checkpoints/best holds
    evals_without_improvement: int = 0
    baseline: dict = field(default_factory=dict)
    stop_reason: str | None = None  # early stop or non-finite streak: a resume from there trains no further

    def count(self, result, max_bad_steps: int) -> None:
        """Count one optimizer step's ``result`` (a good step, or a skipped non-finite one); stop after
        ``max_bad_steps`` skipped in a row."""
        self.train_seconds += result.seconds
        if not result.finite:
            self.bad_in_a_row += 1
            self.bad_steps_total += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", self.step + 1,
                        self.bad_in_a_row)
            if self.bad_in_a_row >= max_bad_steps:
                self.stop_reason = (f"non_finite: {self.bad_in_a_row} consecutive optimizer steps with a "
                                    "non-finite loss or gradient")
            return
        self.bad_in_a_row = 0
        self.step += 1
        self.tokens_seen += result.tokens


def data_order(cfg: RunConfig, shards, global_batch: int) -> dict:
    """What fixes the order of the training sequences: a resume must find the same values.

    ``shards_sha256`` hashes the train shards' checksums in the manifest, so rebuilt shards with the
    same count but other content differ; the world size is not part of it (see the module docstring).
    """
    listing = json.dumps([[e["path"], e["sequences"], e["sha256"]] for e in shards.entries])
    return {"seed": cfg.train.seed, "num_sequences": shards.num_sequences, "seq_len": shards.seq_len,
            "shards_sha256": hashlib.sha256(listing.encode()).hexdigest(), "max_samples": cfg.train.max_samples,
            "global_batch": global_batch}


def check_resumable(path: Path, payload: dict, expected_order: dict, world_size: int, deepspeed: bool) -> None:
    """Refuse, in one line, a checkpoint whose data order or engine differs from the run's."""
    if "data_order" not in payload or "stream" not in payload:
        raise TrainingError(f"checkpoint {path} holds no data order or stream state (written by an older korcpt); "
                            "start the run afresh")
    saved = payload["data_order"]
    diffs = [f"{key} {saved.get(key)!r} in the checkpoint, expected {value!r}"
             for key, value in expected_order.items() if saved.get(key) != value]
    if diffs:
        raise TrainingError(f"cannot resume from {path}: the data order changed ({'; '.join(diffs)}); "
                            "resume with the checkpoint's settings or start afresh in another output.dir")
    if payload.get("deepspeed") != deepspeed:
        raise TrainingError(f"cannot resume from {path}: written {'with' if payload.get('deepspeed') else 'without'} "
                            f"DeepSpeed, expected {'with' if deepspeed else 'without'} (the run's launcher)")
    if deepspeed and payload.get("world_size") != world_size:
        raise TrainingError(f"cannot resume from {path}: its DeepSpeed ZeRO partitions are for world size "
                            f"{payload.get('world_size')}, expected {world_size}; resume with {payload.get('world_size')} "
                            "processes")


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
        replace_dir(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def restore_state(accelerator, path: Path, payload: dict, same_world: bool) -> TrainerState:
    """Restore the training state saved by :func:`save_checkpoint`, whose ``trainer_state.json`` is ``payload``.

    Args:
        same_world: the checkpoint was written at this world size, so this rank's RNG file must be
            there; at another world size the RNG streams cannot carry over (the caller reseeds them).

    Raises:
        TrainingError: a file of the checkpoint is missing, damaged or refused (a pickle with a payload),
            naming the checkpoint, instead of torch's traceback.
    """
    if same_world:
        _check_rng_state(path / f"random_states_{accelerator.process_index}.pkl")
    try:
        accelerator.load_state(str(path))
    # torch's weights-only unpickler refusing a payload raises UnpicklingError, a truncated file
    # RuntimeError or EOFError, a missing one OSError: all mean this checkpoint cannot be restored
    except Exception as exc:  # noqa: BLE001 - the message keeps the type and first line of the cause
        raise TrainingError(f"checkpoint {path} cannot be restored ({_first_line(exc)}); "
                            f"resume from an older one with --resume PATH") from exc
    return TrainerState(**payload["state"])


class Checkpointer:
    """Saves the run every ``train.save_steps`` optimizer steps and at its end, and resumes it."""

    def __init__(self, accelerator, cfg: RunConfig, stream, order: dict):
        self.accelerator, self.cfg, self.stream, self.order = accelerator, cfg, stream, order
        self.root = Path(cfg.output.dir) / "checkpoints"
        self.deepspeed = accelerator.state.deepspeed_plugin is not None

    def restore(self, resume: str) -> TrainerState | None:
        """The state to continue from (``resume``: ``auto``, a checkpoint path or ""), or None to start
        afresh; the stream is put back where the checkpoint left it."""
        path = find_resume(self.root, resume)
        if path is None:
            return None
        payload = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        world = self.accelerator.num_processes
        check_resumable(path, payload, self.order, world, self.deepspeed)
        same_world = payload["world_size"] == world
        state = restore_state(self.accelerator, path, payload, same_world)
        if not same_world:  # per-rank RNG streams (dropout) start again from the seed and the step
            from accelerate.utils import set_seed

            set_seed(self.cfg.train.seed + state.step, device_specific=True)
        self.stream.load_state_dict(payload["stream"])
        log.info("resumed from %s at step %d (written by %d process(es); stream %s)", path, state.step,
                 payload["world_size"], payload["stream"])
        return state

    @property
    def best_dir(self) -> Path:
        return self.root / BEST_DIR

    def maybe_keep_best(self, model, state: TrainerState, step: int, result: dict) -> None:
        """Write the adapter to ``checkpoints/best`` (outside rotation) when the evaluation ``result`` at
        ``step`` is the best so far (all ranks call: ZeRO-3 gathers the adapter)."""
        if self.cfg.output.adapter != "best" or state.best_step != step or result.get("val_loss") is None:
            return
        from korcpt.train.outputs import save_adapter

        tmp = self.root / f".tmp-{BEST_DIR}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.accelerator, model, self.cfg, tmp)
        if self.accelerator.is_main_process:
            atomic_write_json(tmp / BEST_FILE, {"step": step, "result": result})
            replace_dir(tmp, self.best_dir)
        self.accelerator.wait_for_everyone()

    def best_record(self, state: TrainerState) -> dict | None:
        """``{"step", "result"}`` of the kept best adapter when it is the one to save (not the last step's)."""
        if self.cfg.output.adapter != "best" or state.best_step in (None, state.step):
            return None
        record = json.loads((self.best_dir / BEST_FILE).read_text(encoding="utf-8"))
        if record["step"] != state.best_step:
            raise TrainingError(f"{self.best_dir} holds the adapter of step {record['step']}, expected step "
                                f"{state.best_step} (the run's best); set output.adapter=last or rerun")
        return record

    def maybe_save(self, state: TrainerState, last: bool) -> None:
        """Save every ``train.save_steps`` steps; the last step is saved by :meth:`save` at the run's end."""
        every = self.cfg.train.save_steps
        if every and state.step % every == 0 and not last:
            self.save(state)

    def save(self, state: TrainerState) -> Path:
        extra = {"stream": self.stream.state_dict(), "data_order": self.order, "deepspeed": self.deepspeed,
                 "world_size": self.accelerator.num_processes, "config": self.cfg.to_dict()}
        return save_checkpoint(self.accelerator, self.root, state, extra, self.cfg.train.keep_last)


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
