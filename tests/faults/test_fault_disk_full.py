"""No space left while a checkpoint is written: a one-line TrainingError, the previous checkpoint intact,
and ``--resume auto`` from it finishes with the adapter of a run that never hit the full disk.

Two ways of filling the disk, both at the checkpoint of a seeded step:
- ``torch.save`` (Accelerate writes the optimizer with it) writes part of its bytes, then raises
  ``OSError(ENOSPC)``;
- a real failed write: the file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) is lowered below the size of
  the checkpoint's files while safetensors (the model) or torch.save (the optimizer) write, so they fail
  inside their own writers and raise what they raise on a full disk (``SafetensorError``,
  ``RuntimeError``), not ``OSError``. Before the fix in korcpt/train/checkpoint.py these escaped as
  raw tracebacks instead of a TrainingError.
"""

from __future__ import annotations

import errno
import io
import json
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from korcpt.errors import TrainingError
from korcpt.train import checkpoint as ckpt
from _faults import entries_differing, sequences_lost
from tinyrun import step_ids, train_run

SECTIONS = {"train": {"max_steps": 8, "save_steps": 2, "keep_last": 2}, "eval": {"steps": 0}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    info, out = train_run(tmp_path_factory.mktemp("ref"), tiny_data, "ref", **SECTIONS)
    return load_file(str(out / "adapter_model.safetensors")), step_ids(out)


def _torch_save_enospc(target: str):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and target in str(f):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(f, "wb") as fh:  # the disk fills half way through the file
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    return save


def _fsize_limited(real, target: str, limit: int):
    """``real(path, ...)`` run with files limited to ``limit`` bytes when ``path`` contains ``target``:
    the writers inside fail with a real EFBIG, the same error path as a full disk (ENOSPC)."""

    def wrapper(*args, **kwargs):
        if not any(target in str(a) for a in args[:3]):
            return real(*args, **kwargs)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return real(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)

    return wrapper


@pytest.mark.parametrize("how", ["torch.save raises ENOSPC", "safetensors write fails (RLIMIT_FSIZE)",
                                 "torch.save write fails (RLIMIT_FSIZE)"])
def test_full_disk_while_checkpointing_stops_cleanly_and_resumes(tmp_path, tiny_data, reference, monkeypatch,
                                                                  fault_rng, tally, how):
    import accelerate

    step = fault_rng.choice([4, 6])  # a checkpoint with an older one before it
    target = f".tmp-{ckpt.checkpoint_name(step)}"
    if how == "torch.save raises ENOSPC":
        monkeypatch.setattr(torch, "save", _torch_save_enospc(target))
    elif how.startswith("safetensors"):  # model.safetensors (~460 KB) is the first and largest file
        monkeypatch.setattr(accelerate.Accelerator, "save_state",
                            _fsize_limited(accelerate.Accelerator.save_state, target, 16 << 10))
    else:  # optimizer.bin (~90 KB) through torch's own zip writer
        monkeypatch.setattr(torch, "save", _fsize_limited(torch.save, target, 4 << 10))
    print(f"[injected] {how} while writing the checkpoint of step {step}")

    err: BaseException | None = None
    try:
        train_run(tmp_path, tiny_data, "full", **SECTIONS)
    except Exception as exc:  # the expected TrainingError, or a crash: counted first, asserted below
        err = exc
    monkeypatch.undo()
    message = str(err)
    print(f"[message] {type(err).__name__}: {message}")
    out = tmp_path / "full"
    done = ckpt.complete_checkpoints(out / "checkpoints")
    previous_step = json.loads((done[-1] / ckpt.STATE_FILE).read_text())["state"]["step"] if done else None
    readable = bool(done) and bool(load_file(str(done[-1] / "model.safetensors")))  # the intact checkpoint
    chosen = ckpt.find_resume(out / "checkpoints", "auto") if done else None

    info, _ = train_run(tmp_path, tiny_data, "full", resume="auto", **SECTIONS)
    ref_adapter, ref_steps = reference
    got = load_file(str(out / "adapter_model.safetensors"))
    recovered = int(info["steps"] == SECTIONS["train"]["max_steps"])
    lost = sequences_lost(ref_steps, step_ids(out)) + entries_differing(ref_adapter, got)
    crashes = int(err is not None and not isinstance(err, TrainingError))
    leftovers = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
    print(f"[result] stopped with {type(err).__name__}, resumed from {done[-1].name if done else None}, "
          f"{lost} sequences or adapter entries lost; temporary folders left: {leftovers}")
    tally.add("disk full at checkpoint", faults_injected=1, runs_recovered=recovered, data_lost=lost, crashes=crashes)

    assert crashes == 0 and isinstance(err, TrainingError), repr(err)
    assert "\n" not in message
    assert "could not write checkpoint" in message and ckpt.checkpoint_name(step) in message
    assert "previous checkpoint is intact" in message
    assert done and done[-1].name == ckpt.checkpoint_name(step - 2), done
    assert previous_step == step - 2
    assert readable
    assert chosen == done[-1]
    assert recovered == 1, info["steps"]
    assert got.keys() == ref_adapter.keys() and all(torch.equal(got[k], ref_adapter[k]) for k in got)
    assert step_ids(out) == ref_steps
    assert lost == 0
