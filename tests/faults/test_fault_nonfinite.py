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

import korcpt.train.loop as loop
import korcpt.train.step as step
from korcpt.config import load_config
from korcpt.train import checkpoint as ckpt
from tinyrun import run_config

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
    tok, shards = tiny_data
    out = tmp_path / name
    train = {"max_steps": 10, "save_steps": 2, "keep_last": 10, "grad_accum": GRAD_ACCUM, **train_overrides}
    cfg = load_config(run_config(tmp_path / f"{name}.yaml", tok, shards, out, train=train, eval={"steps": 0}))
    return loop.train(cfg), out


def _logged(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples" / "rank000.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["nan_loss", "inf_loss", "nan_grad"])
def test_isolated_non_finite_steps_are_skipped_and_counted(tmp_path, tiny_data, monkeypatch, fault_rng, tally, mode):
    bad = set(fault_rng.sample(range(1, 10), 2))  # two separate attempts, fewer in a row than max_bad_steps
    while max(bad) - min(bad) == 1:
        bad = set(fault_rng.sample(range(1, 10), 2))
    print(f"[injected] {mode} in optimizer-step attempts {sorted(bad)} (0-based)")
    seen = _inject(monkeypatch, bad, mode)
    info, out = _run(tmp_path, tiny_data, f"iso-{mode}", max_bad_steps=2)
    saved = json.loads((out / "training_info.json").read_text())
    assert seen["corrupted"] == 2 * GRAD_ACCUM
    assert info["bad_steps"] == saved["bad_steps"] == 2
    assert info["steps"] == 10 and info["stop_reason"] == "max_steps"
    assert all(math.isfinite(x["loss"]) for x in info["losses"]) and len(info["losses"]) == 10
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    logged = _logged(out)
    assert [x["step"] for x in logged] == list(range(1, 11))  # skipped attempts take no step number
    ids = [i for x in logged for i in x["ids"]]
    assert len(ids) == len(set(ids))
    print(f"[result] bad_steps={info['bad_steps']}, steps={info['steps']}, stop_reason={info['stop_reason']!r}")
    tally.add("non-finite loss/gradient", faults_injected=2, runs_recovered=1, data_lost=0)


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
    info, out = _run(tmp_path, tiny_data, f"stop-{mode}", max_bad_steps=max_bad)
    monkeypatch.undo()

    saved = json.loads((out / "training_info.json").read_text())
    print(f"[result] stop_reason={saved['stop_reason']!r}, bad_steps={saved['bad_steps']}, steps={saved['steps']}")
    assert saved["stop_reason"].startswith("non_finite") and str(max_bad) in saved["stop_reason"]
    assert saved["bad_steps"] == max_bad and saved["steps"] == first_bad
    assert seen["corrupted"] == max_bad * GRAD_ACCUM  # it stopped at once: no further attempt was made
    assert [x["step"] for x in _logged(out)] == list(range(1, first_bad + 1))

    # the newest checkpoint is the last good step, with exactly the weights a clean run had there
    newest = ckpt.complete_checkpoints(out / "checkpoints")[-1]
    state = json.loads((newest / ckpt.STATE_FILE).read_text())["state"]
    assert newest.name == ckpt.checkpoint_name(first_bad) and state["step"] == first_bad
    kept = load_file(str(newest / "model.safetensors"))
    good = load_file(str(clean / "checkpoints" / ckpt.checkpoint_name(first_bad) / "model.safetensors"))
    assert kept.keys() == good.keys() and all(torch.equal(kept[k], good[k]) for k in kept)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    tally.add("non-finite loss/gradient", faults_injected=max_bad, runs_recovered=1, data_lost=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_a_nan_gradient_never_reaches_the_weights_under_two_process_deepspeed_bf16(tmp_path, pretrained_tiny,
                                                                                 tiny_data, fault_rng, tally, mode):
    """2 processes, DeepSpeed with bf16.enabled (float32 masters): the step is skipped and counted, the
    run goes on, and the saved adapter (the masters) is finite."""
    from test_distributed import launch, run_info

    attempt = fault_rng.choice([1, 2])
    print(f"[injected] NaN gradient on both ranks in optimizer-step attempt {attempt} (0-based), {mode}")
    out = launch(tmp_path, tiny_data, pretrained_tiny, f"nan-{mode}", mode, "full", "bfloat16",
                 script=str(Path(__file__).parent / "_nan_launch.py"), env={"KORCPT_FAULT_NAN_ATTEMPTS": str(attempt)},
                 max_bad_steps=2)
    saved = run_info(out)
    print(f"[result] bad_steps={saved['bad_steps']}, steps={saved['steps']}, stop_reason={saved['stop_reason']!r}")
    assert saved["world_size"] == 2 and saved["bad_steps"] == 1
    assert saved["steps"] == 3 and saved["stop_reason"] == "max_steps"
    assert all(math.isfinite(x["loss"]) for x in saved["losses"])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    tally.add("non-finite loss/gradient", faults_injected=1, runs_recovered=1, data_lost=0)
