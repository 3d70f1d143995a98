"""SIGKILL a 2-process DeepSpeed ZeRO-3 run (CPU, gloo), `--resume auto`: each rank trains what it would have.

A reference run of ``accelerate launch --config_file configs/accelerate/cpu_zero3.yaml`` goes to the end.
A second run of the same config is killed twice with SIGKILL sent to the launcher and both ranks
at once (as a preempted node loses them): once a seeded number of optimizer steps
after its first complete checkpoint, and once inside the next checkpoint write (``.tmp-step-N`` on disk;
writes slowed by ``_slow_launch.py``). Each time it is relaunched with ``--resume auto``, and then
left to finish.

What must hold: on every rank, the per-step sample-id log deduplicated by step equals the reference's
(no sequence trained twice or skipped), and every replayed step trained the ids of its first attempt.
Tolerance (stated, as issue 10 asks for two processes): losses rel 1e-6, adapter tensors atol 1e-6;
measured on this machine: losses and adapter bit-equal (the test prints the largest difference).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from _faults import sequences_lost
from tinyrun import ROOT, launch_command, run_config, samples

SLOW_LAUNCH = Path(__file__).resolve().parent / "_slow_launch.py"
TOTAL_STEPS = 6
SAVE_DELAY = 0.5
RUN_TIMEOUT = 600


def _launch(cfg: Path, log: Path, resume: bool, delay: float) -> subprocess.Popen:
    # a fresh port from the OS per launch: a killed rank leaves its socket behind
    cmd = launch_command("zero3", ["--config", str(cfg)] + (["--resume", "auto"] if resume else []), SLOW_LAUNCH)
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "KORCPT_FAULT_SAVE_DELAY": str(delay)}
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)


def _steps_logged(out: Path) -> int:
    path = out / "samples" / "rank000.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _complete(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "trainer_state.json").is_file())


def _kill_group_when(proc: subprocess.Popen, ready, pause: float) -> bool:
    """SIGKILL the run's process group ``pause`` seconds after ``ready()``; False if it ended first."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "kill trigger never fired"
        time.sleep(0.005)
    time.sleep(pause)
    if proc.poll() is not None:
        return False
    # torchrun starts each rank in a session of its own, so a killpg of the launcher misses them
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _per_rank_steps(out: Path) -> dict[int, list[dict]]:
    return {r: samples(out, r) for r in (0, 1)}


@pytest.mark.slow
def test_two_process_zero3_sigkill_then_resume_auto_trains_every_rank_as_the_uninterrupted_run(
        tmp_path, tiny_data, pretrained_tiny, fault_rng, tally):
    pytest.importorskip("deepspeed")
    tok, shards = tiny_data
    sections = dict(model={"name": str(pretrained_tiny), "tokenizer": "", "random_init": False},
                    lora={"embeddings": "full"},
                    train={"max_steps": TOTAL_STEPS, "save_steps": 2, "keep_last": 2, "micro_batch_size": 1,
                           "grad_accum": 2, "warmup_steps": 0},
                    eval={"steps": 0, "max_val_sequences": 8, "batch_size": 2})
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref_cfg = run_config(tmp_path / "ref.yaml", tok, shards, ref_out, **sections)
    cut_cfg = run_config(tmp_path / "cut.yaml", tok, shards, cut_out, **sections)
    proc = _launch(ref_cfg, tmp_path / "ref.log", resume=False, delay=0.0)
    assert proc.wait(timeout=RUN_TIMEOUT) == 0, (tmp_path / "ref.log").read_text()[-4000:]

    extra_steps = fault_rng.randint(1, 2)
    pause_in_save = round(fault_rng.uniform(0.0, 2 * SAVE_DELAY), 3)
    print(f"[kill plan] 2 processes, ZeRO-3: after checkpoint 2 + {extra_steps} steps; "
          f"inside the next checkpoint write after {pause_in_save}s")
    log = tmp_path / "cut.log"
    proc = _launch(cut_cfg, log, resume=True, delay=0.0)
    first = _kill_group_when(proc, lambda: 2 in _complete(cut_out) and _steps_logged(cut_out) >= 2 + extra_steps, 0.0)
    target = min(_complete(cut_out)[-1] + 2, TOTAL_STEPS)  # the next checkpoint this resumed run writes
    proc = _launch(cut_cfg, log, resume=True, delay=SAVE_DELAY)
    tmp_dir = cut_out / "checkpoints" / f".tmp-step-{target:08d}"
    second = _kill_group_when(proc, tmp_dir.is_dir, pause_in_save)
    print(f"[injected] SIGKILL x{first + second} (the second inside {tmp_dir.name}); "
          f"complete checkpoints: {_complete(cut_out)}")
    proc = _launch(cut_cfg, log, resume=True, delay=0.0)
    rc = proc.wait(timeout=RUN_TIMEOUT)

    ref_steps, cut_steps = _per_rank_steps(ref_out), _per_rank_steps(cut_out)
    replayed, replayed_other, trained, lost = 0, [], [], 0
    last: dict[int, dict[int, list[int]]] = {}
    for rank in (0, 1):
        first_ids: dict[int, list[int]] = {}
        for entry in cut_steps[rank]:
            if entry["step"] in first_ids:
                replayed += 1
                if entry["ids"] != first_ids[entry["step"]]:
                    replayed_other.append((rank, entry["step"]))
            first_ids.setdefault(entry["step"], entry["ids"])
        last[rank] = {entry["step"]: entry["ids"] for entry in cut_steps[rank]}
        lost += sequences_lost({s["step"]: s["ids"] for s in ref_steps[rank]}, last[rank])
        trained += [i for step in sorted(last[rank]) for i in last[rank][step]]
    cut_adapter = cut_out / "adapter_model.safetensors"
    a = load_file(str(ref_out / "adapter_model.safetensors"))
    b = load_file(str(cut_adapter)) if cut_adapter.exists() else {}
    # the stated tolerance: entries further apart than atol 1e-6 count as lost
    lost += sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) if k in b and b[k].shape == a[k].shape else a[k].numel()
                for k in a)
    tally.add("SIGKILL, 2-process ZeRO-3", faults_injected=int(first) + int(second),
              runs_recovered=(int(first) + int(second)) if rc == 0 else 0, data_lost=lost, crashes=int(rc != 0))

    assert first and second, log.read_text()[-4000:]
    assert rc == 0, log.read_text()[-4000:]
    assert lost == 0, lost
    for rank in (0, 1):
        assert [s["step"] for s in ref_steps[rank]] == list(range(1, TOTAL_STEPS + 1))
        assert last[rank] == {s["step"]: s["ids"] for s in ref_steps[rank]}, f"rank {rank}"
    assert not replayed_other, f"(rank, step) {replayed_other} replayed other ids"
    assert replayed >= 2 * extra_steps  # the steps after checkpoint 2 ran again, on both ranks
    assert len(trained) == len(set(trained)) == TOTAL_STEPS * 2 * 2  # 2 ranks x micro 1 x accum 2

    ref_info = json.loads((ref_out / "training_info.json").read_text())
    cut_info = json.loads((cut_out / "training_info.json").read_text())
    assert cut_info["world_size"] == 2 and cut_info["steps"] == TOTAL_STEPS
    assert cut_info["tokens_seen"] == ref_info["tokens_seen"]
    ref_losses, cut_losses = [x["loss"] for x in ref_info["losses"]], [x["loss"] for x in cut_info["losses"]]
    assert cut_losses == pytest.approx(ref_losses, rel=1e-6)
    assert a.keys() == b.keys() and any("trainable_tokens_delta" in k for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    for key in a:
        assert b[key].shape == a[key].shape and b[key].numel() > 0, key
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert not list((cut_out / "checkpoints").glob(".tmp-step-*"))
    print(f"[result] 2 SIGKILLs of 2 ranks, {replayed} replayed rank-steps, 0 sequences skipped or trained twice, "
          f"largest adapter difference {worst:.3g}, losses equal: {cut_losses == ref_losses}")
