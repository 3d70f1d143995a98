"""SIGKILL a training run anywhere, `--resume auto` until done: the result is the uninterrupted run's.

One reference run of ``launch/train.py`` goes to the end. A second run with the same config is killed
with SIGKILL at seeded moments (printed), each time relaunched with ``--resume auto``, and finally
left to finish. Kill points are drawn from: a random time after the process starts (imports, model
load, resume), after k new optimizer steps, inside a checkpoint write (``.tmp-step-N`` present;
writes are slowed by ``_slow_launch.py`` so the kill lands in it deterministically), just after a
checkpoint completed, inside the final checkpoint write, and after the final checkpoint while the
outputs (adapter, tokenizer, training_info.json) are written.

Then: ``adapter_model.safetensors`` is byte-for-byte the reference's; the per-step sample-id log,
deduplicated by step keeping the last occurrence, equals the reference's (so no sequence trained
twice or skipped), and every replayed step trained exactly the ids of its first attempt; the
per-step losses are bit-equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from _faults import bytes_differing, sequences_lost
from tinyrun import ROOT, run_config, samples

SLOW_LAUNCH = Path(__file__).resolve().parent / "_slow_launch.py"
TOTAL_STEPS = 12
SAVE_STEPS = 2
SAVE_DELAY = 0.4  # seconds before and after each Accelerator.save_state in the killed runs
RUN_TIMEOUT = 600
SECTIONS = {"train": {"max_steps": TOTAL_STEPS, "save_steps": SAVE_STEPS, "keep_last": 2}, "eval": {"steps": 5}}


def _env(delay: float) -> dict:
    return {**os.environ, "KORCPT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
            "KORCPT_FAULT_SAVE_DELAY": str(delay), "OMP_NUM_THREADS": "1"}


def _launch(script: Path, cfg: Path, log: Path, delay: float, resume: bool) -> subprocess.Popen:
    args = [sys.executable, str(script), "--config", str(cfg)] + (["--resume", "auto"] if resume else [])
    fh = open(log, "ab")
    try:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=_env(delay), cwd=ROOT)
    finally:
        fh.close()


class Watch:
    """What a run has left on disk so far."""

    def __init__(self, out: Path):
        self.out = out
        self.ckpts = out / "checkpoints"

    def sample_lines(self) -> int:
        path = self.out / "samples" / "rank000.jsonl"
        return path.read_bytes().count(b"\n") if path.exists() else 0

    def complete(self) -> list[int]:
        if not self.ckpts.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.ckpts.iterdir()
                      if p.name.startswith("step-") and (p / "trainer_state.json").is_file())

    def tmp(self) -> list[Path]:
        return sorted(self.ckpts.glob(".tmp-step-*")) if self.ckpts.is_dir() else []

    def tmp_ids(self) -> dict[int, int]:
        """step -> inode of every ``.tmp-step-N`` folder (a folder re-made by a new save has a new inode)."""
        out = {}
        for p in self.tmp():
            try:
                out[int(p.name[len(".tmp-step-"):])] = p.stat().st_ino
            except FileNotFoundError:  # renamed or removed meanwhile
                pass
        return out

    def newest(self) -> int:
        done = self.complete()
        return done[-1] if done else 0


def _plan(rng) -> list[tuple[str, float]]:
    """Kinds of kill in a seeded order (the final-save kill last: it needs the run near its end)."""
    kinds = ["startup", "mid_steps", "in_checkpoint", "after_checkpoint", "in_checkpoint", "mid_steps"]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds + ["in_final_save", "in_outputs"]:
        if kind == "startup":
            plan.append((kind, round(rng.uniform(0.3, 6.0), 3)))  # seconds after spawn
        elif kind == "mid_steps":
            plan.append((kind, rng.randint(1, 3)))  # new optimizer steps logged before the kill
        elif kind == "in_outputs":
            plan.append((kind, round(rng.uniform(0.0, 0.75 * SAVE_DELAY), 3)))  # inside the delayed outputs
        else:
            plan.append((kind, round(rng.uniform(0.0, 2 * SAVE_DELAY + 0.1), 3)))  # delay after the trigger
    return plan


def _kill_when(proc: subprocess.Popen, watch: Watch, kind: str, param: float, log: Path) -> dict:
    """Wait for the trigger of ``kind``, SIGKILL, and describe where the run was."""
    start_lines, start_ckpt, t0 = watch.sample_lines(), watch.newest(), time.monotonic()
    stale = watch.tmp_ids()  # left by earlier kills: only a folder this run makes counts

    def new_tmp() -> list[int]:
        return [step for step, ino in watch.tmp_ids().items() if stale.get(step) != ino]
    deadline = t0 + RUN_TIMEOUT
    fired = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return {"kind": kind, "param": param, "killed": False, "rc": proc.returncode}
        now = time.monotonic()
        if kind == "startup" and now - t0 >= param:
            fired = now
        elif kind == "mid_steps" and watch.sample_lines() - start_lines >= param:
            fired = now
        elif kind == "in_checkpoint" and any(step < TOTAL_STEPS for step in new_tmp()):
            fired = now
        elif kind == "after_checkpoint" and watch.newest() > start_ckpt and watch.newest() < TOTAL_STEPS:
            fired = now
        elif kind == "in_final_save" and TOTAL_STEPS in new_tmp():
            fired = now
        elif kind == "in_outputs" and TOTAL_STEPS in watch.complete():
            fired = now
        if fired is not None:
            if kind != "startup" and kind != "mid_steps":
                time.sleep(param)
            break
        time.sleep(0.003)
    else:
        raise AssertionError(f"trigger {kind} {param} never fired")
    if proc.poll() is not None:
        return {"kind": kind, "param": param, "killed": False, "rc": proc.returncode}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    phase = ("after resume" if "resumed from" in text.rsplit("=== launch", 1)[-1] else
             "after model load" if "trainable parameters" in text.rsplit("=== launch", 1)[-1] else "startup/imports")
    return {"kind": kind, "param": param, "killed": proc.returncode == -signal.SIGKILL,
            "resumed_from_step": start_ckpt, "steps_logged": watch.sample_lines() - start_lines,
            "tmp_dirs": {p.name: sorted(f.name for f in p.iterdir()) for p in watch.tmp()},
            "complete_after": watch.complete(), "phase": phase}


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def test_sigkill_anywhere_then_resume_auto_equals_the_uninterrupted_run(tmp_path, tiny_data, fault_rng, tally):
    tok, shards = tiny_data
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_cfg = run_config(tmp_path / "ref.yaml", tok, shards, ref_out, **SECTIONS)
    cut_cfg = run_config(tmp_path / "cut.yaml", tok, shards, cut_out, **SECTIONS)

    ref_log = tmp_path / "ref.log"
    proc = _launch(ROOT / "launch" / "train.py", ref_cfg, ref_log, 0.0, resume=False)
    assert proc.wait(timeout=RUN_TIMEOUT) == 0, ref_log.read_text()[-4000:]

    plan = _plan(fault_rng)
    print(f"[kill plan] {plan}")
    watch, log = Watch(cut_out), tmp_path / "cut.log"
    events = []
    for kind, param in plan:
        with open(log, "a") as fh:
            fh.write(f"\n=== launch for {kind} {param}\n")
        proc = _launch(SLOW_LAUNCH, cut_cfg, log, SAVE_DELAY, resume=True)
        event = _kill_when(proc, watch, kind, param, log)
        events.append(event)
        print(f"[injected] SIGKILL {event}")
    with open(log, "a") as fh:
        fh.write("\n=== launch to finish\n")
    proc = _launch(SLOW_LAUNCH, cut_cfg, log, 0.0, resume=True)
    rc = proc.wait(timeout=RUN_TIMEOUT)

    kills = [e for e in events if e["killed"]]
    kinds = {e["kind"] for e in kills}
    # the sample log: replays must train the same ids; deduplicated it must be the reference's, step by step
    ref_steps, cut_steps = samples(ref_out), samples(cut_out)
    first_seen: dict[int, list[int]] = {}
    replayed, replayed_other = 0, []
    for entry in cut_steps:
        if entry["step"] in first_seen:
            replayed += 1
            if entry["ids"] != first_seen[entry["step"]]:
                replayed_other.append(entry["step"])
        first_seen.setdefault(entry["step"], entry["ids"])
    last = {entry["step"]: entry["ids"] for entry in cut_steps}
    reference = {s["step"]: s["ids"] for s in ref_steps}
    trained = [i for step in sorted(last) for i in last[step]]
    missing = {i for s in ref_steps for i in s["ids"]} - set(trained)
    twice = len(trained) - len(set(trained))
    # the adapter: the same bytes (and so the same tensors) as the run that was never killed
    cut_adapter = cut_out / "adapter_model.safetensors"
    differing = bytes_differing(_adapter_bytes(ref_out), cut_adapter.read_bytes() if cut_adapter.exists() else b"")
    lost = sequences_lost(reference, last) + differing
    # a launch that exited non-zero without being killed crashed
    crashes = sum(1 for e in events if not e["killed"] and e["rc"] != 0) + int(rc != 0)
    print(f"[result] {len(kills)} SIGKILLs, {replayed} replayed steps, {differing} adapter bytes differing, "
          f"{len(missing)} sequences skipped, {twice} trained twice")
    tally.add("SIGKILL during training", faults_injected=len(kills), runs_recovered=len(kills) if rc == 0 else 0,
              data_lost=lost, crashes=crashes)

    assert crashes == 0, (events, rc, log.read_text()[-4000:])
    # at least five kills, at least one of them with a .tmp-step-N folder on disk (inside a checkpoint write)
    assert len(kills) >= 5, events
    assert "in_checkpoint" in kinds and any(e["tmp_dirs"] for e in kills), events
    assert lost == 0 and differing == 0 and not missing and twice == 0
    a, b = load_file(str(ref_out / "adapter_model.safetensors")), load_file(str(cut_adapter))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert [s["step"] for s in ref_steps] == list(range(1, TOTAL_STEPS + 1))
    assert not replayed_other, f"steps {replayed_other} replayed other sequences"
    assert last == reference
    assert len(trained) == len(set(trained)) == TOTAL_STEPS * 4  # micro 2 x accum 2, one epoch: no repeats

    ref_info = json.loads((ref_out / "training_info.json").read_text())
    cut_info = json.loads((cut_out / "training_info.json").read_text())
    assert cut_info["losses"] == ref_info["losses"] and cut_info["steps"] == TOTAL_STEPS
    assert cut_info["tokens_seen"] == ref_info["tokens_seen"] and cut_info["stop_reason"] == "max_steps"
    assert cut_info["val_loss_final"] == ref_info["val_loss_final"]
    # a resume from the final checkpoint (kill while writing the outputs) must not record the final
    # evaluation twice
    assert [h["step"] for h in cut_info["history"]] == [h["step"] for h in ref_info["history"]]
    assert cut_info["history"] == ref_info["history"]
    assert not watch.tmp(), f"temporary checkpoint folders left behind: {watch.tmp()}"
