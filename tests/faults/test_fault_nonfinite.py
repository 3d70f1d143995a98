"""Non-finite loss or gradient: the optimizer step is skipped and counted; after ``train.max_bad_steps``
consecutive ones training stops with a clear ``stop_reason`` and the last good weights are kept.

The fault is injected by wrapping ``korcpt.train.step.nll_sum`` (one call per micro-batch): either the
loss itself becomes NaN/inf, or the loss stays finite and only its gradient is NaN (an identity whose
backward returns NaN), which only the gradient-norm check can see.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import korcpt.train.step as step
from korcpt.train import checkpoint as ckpt
from _faults import entries_differing, raised
from tinyrun import launched_run, run_info, samples, train_run

GRAD_ACCUM = 2


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _inject(monkeypatch, bad_attempts: set[int], mode: str) -> dict:
    """Corrupt every micro-batch of the given optimizer-step attempts (0-based, skipped ones included)."""
    real = step.nll_sum
    seen = {"micro": 0, "corrupted": 0}

    def nll_sum(*args, **kwargs):
        nll, n = real(*args, **kwargs)
        attempt = seen["micro"] // GRAD_ACCUM
        seen["micro"] += 1
        if attempt in bad_attempts:
            seen["corrupted"] += 1
            if mode == "nan_loss":
                nll = nll * float("nan")
            elif mode == "inf_loss":
                nll = nll + float("inf")
            else:  # finite loss, NaN gradient
                nll = _NaNGrad.apply(nll)
        return nll, n

    monkeypatch.setattr(step, "nll_sum", nll_sum)
    return seen


def _run(tmp_path: Path, tiny_data, name: str, **train_overrides) -> tuple[dict, Path]:
    train = {"max_steps": 10, "save_steps": 2, "keep_last": 10, "grad_accum": GRAD_ACCUM, **train_overrides}
    return train_run(tmp_path, tiny_data, name, train=train, eval={"steps": 0})


def _counted_run(tally, seen: dict, *args, **train_overrides) -> tuple[dict, Path]:
    """``_run``; an exception from it (none is expected: a bad step is skipped or stops the run) is a
    crash, added to the tally before it fails the test."""
    result = []
    err = raised(lambda: result.append(_run(*args, **train_overrides)))
    if err is not None:
        tally.add("non-finite loss/gradient", faults_injected=seen["corrupted"] // GRAD_ACCUM, crashes=1)
        raise err
    return result[0]


def _non_finite_entries(tensors: dict) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors.values())


@pytest.mark.parametrize("mode", ["nan_loss", "inf_loss", "nan_grad"])
def test_isolated_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_data, monkeypatch, fault_rng, tally, mode):
    bad = set(fault_rng.sample(range(1, 10), 2))  # two separate attempts, fewer in a row than max_bad_steps
    while max(bad) - min(bad) == 1:
        bad = set(fault_rng.sample(range(1, 10), 2))
    print(f"[injected] {mode} in optimizer-step attempts {sorted(bad)} (0-based)")
    seen = _inject(monkeypatch, bad, mode)
    info, out = _counted_run(tally, seen, tmp_path, tiny_data, f"iso-{mode}", max_bad_steps=2)
    saved = json.loads((out / "training_info.json").read_text())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    logged = samples(out)
    ids = [i for x in logged for i in x["ids"]]
    lost = len(ids) - len(set(ids)) + _non_finite_entries(adapter)  # sequences trained twice, weights broken
    recovered = int(info["steps"] == 10 and info["stop_reason"] == "max_steps")
    print(f"[result] bad_steps={info['bad_steps']}, steps={info['steps']}, stop_reason={info['stop_reason']!r}")
    tally.add("non-finite loss/gradient", faults_injected=seen["corrupted"] // GRAD_ACCUM, runs_recovered=recovered,
              data_lost=lost)
    assert seen["corrupted"] == 2 * GRAD_ACCUM
    assert info["bad_steps"] == saved["bad_steps"] == 2
    assert recovered == 1 and lost == 0
    assert all(math.isfinite(x["loss"]) for x in info["losses"]) and len(info["losses"]) == 10
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert [x["step"] for x in logged] == list(range(1, 11))  # skipped attempts take no step number
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_data) -> Path:
    """The same run without faults, every checkpoint kept: the weights each good step must have."""
    return _run(tmp_path_factory.mktemp("clean"), tiny_data, "clean")[1]


@pytest.mark.parametrize("mode", ["nan_loss", "nan_grad"])
def test_consecutive_non_finite_steps_stop_the_run_keeping_the_last_good_weights(tmp_path, tiny_data, monkeypatch,
                                                                                clean_run, fault_rng, tally, mode):
    max_bad = 3
    first_bad = fault_rng.choice([4, 6])  # attempts from here on are bad: good steps 1..first_bad
    print(f"[injected] {mode} in every optimizer-step attempt from {first_bad} (0-based); max_bad_steps={max_bad}")
    clean = clean_run
    seen = _inject(monkeypatch, set(range(first_bad, 1000)), mode)
    info, out = _counted_run(tally, seen, tmp_path, tiny_data, f"stop-{mode}", max_bad_steps=max_bad)
    monkeypatch.undo()

    saved = json.loads((out / "training_info.json").read_text())
    print(f"[result] stop_reason={saved['stop_reason']!r}, bad_steps={saved['bad_steps']}, steps={saved['steps']}")
    # the newest checkpoint must be the last good step, with exactly the weights a clean run had there
    newest = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    state = json.loads((newest / ckpt.STATE_FILE).read_text())["state"]
    kept = load_file(str(newest / "model.safetensors"))
    good = load_file(str(clean / "checkpoints" / ckpt.checkpoint_name(first_bad) / "model.safetensors"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lost = entries_differing(good, kept) + _non_finite_entries(adapter)
    # recovered: stopped at once, keeping the last good step to resume from
    recovered = int(saved["stop_reason"].startswith("non_finite") and newest.name == ckpt.checkpoint_name(first_bad))
    tally.add("non-finite loss/gradient", faults_injected=seen["corrupted"] // GRAD_ACCUM, runs_recovered=recovered,
              data_lost=lost)
    assert saved["stop_reason"].startswith("non_finite") and str(max_bad) in saved["stop_reason"]
    assert saved["bad_steps"] == max_bad and saved["steps"] == first_bad
    assert seen["corrupted"] == max_bad * GRAD_ACCUM  # it stopped at once: no further attempt was made
    assert [x["step"] for x in samples(out)] == list(range(1, first_bad + 1))
    assert newest.name == ckpt.checkpoint_name(first_bad) and state["step"] == first_bad
    assert kept.keys() == good.keys() and all(torch.equal(kept[k], good[k]) for k in kept)
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert recovered == 1 and lost == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_a_nan_gradient_never_reaches_the_weights_under_two_process_deepspeed_bf16(tmp_path, pretrained_tiny,
                                                                                 tiny_data, fault_rng, tally, mode):
    """2 processes, DeepSpeed with bf16.enabled (float32 masters): the step is skipped and counted, the
    run goes on, and the saved adapter (the masters) is finite."""
    from test_distributed import write_config

    attempt = fault_rng.choice([1, 2])
    print(f"[injected] NaN gradient on both ranks in optimizer-step attempt {attempt} (0-based), {mode}")
    cfg = write_config(tmp_path, tiny_data, pretrained_tiny, f"nan-{mode}", mode, "full", "bfloat16", max_bad_steps=2)
    proc = launched_run(mode, ["--config", str(cfg)], script=Path(__file__).parent / "_nan_launch.py",
                        env={"KORCPT_FAULT_NAN_ATTEMPTS": str(attempt)}, check=False)
    out = tmp_path / f"nan-{mode}"
    if proc.returncode != 0:  # a crash: counted, then the test fails on it
        tally.add("non-finite loss/gradient", faults_injected=1, crashes=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = run_info(out)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    recovered = int(saved["steps"] == 3 and saved["stop_reason"] == "max_steps")
    lost = _non_finite_entries(adapter)
    print(f"[result] bad_steps={saved['bad_steps']}, steps={saved['steps']}, stop_reason={saved['stop_reason']!r}")
    tally.add("non-finite loss/gradient", faults_injected=1, runs_recovered=recovered, data_lost=lost)
    assert saved["world_size"] == 2 and saved["bad_steps"] == 1
    assert saved["steps"] == 3 and saved["stop_reason"] == "max_steps"
    assert recovered == 1 and lost == 0
    assert all(math.isfinite(x["loss"]) for x in saved["losses"])
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
