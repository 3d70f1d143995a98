"""The shared tool convention: one-line errors, exit codes, and no process group left open at exit."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import torch.distributed as dist

from korcpt.cli import EXIT_USER_ERROR, run_tool
from korcpt.errors import KorcptError


def _init_gloo(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.is_initialized()


def test_a_user_error_is_one_line_exit_2_and_closes_the_process_group(tmp_path, capsys):
    def main(argv):
        _init_gloo(tmp_path)
        raise KorcptError("shard 3 is damaged")

    assert run_tool(main, []) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: shard 3 is damaged\n"
    # left open, a gloo group can abort the process at interpreter shutdown (SIGABRT instead of exit 2)
    assert not dist.is_initialized()


def test_success_returns_the_main_code_and_closes_the_process_group(tmp_path):
    def main(argv):
        _init_gloo(tmp_path)
        return 0

    assert run_tool(main, []) == 0 and not dist.is_initialized()
    assert run_tool(lambda argv: None, []) == 0 and run_tool(lambda argv: 3, []) == 3


def test_device_cuda_n_narrows_visibility_for_one_process_and_is_refused_under_a_launcher():
    import pytest

    from korcpt.errors import TrainingError
    from korcpt.train.distributed import visible_devices_for

    assert visible_devices_for("cuda:1", {}) == "1"
    assert visible_devices_for("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}) == "3"  # SLURM set it
    assert visible_devices_for("cuda", {"WORLD_SIZE": "2"}) is None and visible_devices_for("cpu", {}) is None
    with pytest.raises(TrainingError, match=r"CUDA_VISIBLE_DEVICES=2,3 shows 2 GPU\(s\)"):
        visible_devices_for("cuda:2", {"CUDA_VISIBLE_DEVICES": "2,3"})
    with pytest.raises(TrainingError, match="rank 1 of 2: the launcher assigns each rank its GPU"):
        visible_devices_for("cuda:0", {"WORLD_SIZE": "2", "RANK": "1"})


def test_train_with_a_cuda_device_and_no_gpu_is_one_line(tmp_path, tiny_data):
    import subprocess
    import sys

    import torch

    from tinyrun import ROOT, run_config

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is present: the refusal is for machines without one")
    cfg = run_config(tmp_path / "c.yaml", *tiny_data, tmp_path / "out")
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg), "--device", "cuda:0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: model.device cuda:0: no CUDA device is available here"


@dataclasses.dataclass
class _Options:
    """Options of a tool under test."""

    out_dir: Path
    """Where the result goes."""
    mode: Literal["fast", "exact"] = "fast"
    """How to run: 100% fast or exact."""
    corpus: Path | None = None
    """An optional input."""
    terms: tuple[Path, ...] = ()
    """Term files."""
    verify: bool = True
    """Check every file."""
    strict: bool = False
    """Stop at the first problem."""
    steps: int = 3
    """Steps to run."""


def test_options_are_built_from_the_dataclass_and_back():
    import argparse

    from korcpt.cli import add_options, from_args

    ap = argparse.ArgumentParser()
    add_options(ap, _Options, "out_dir", "mode", "corpus", "terms", "verify", "strict", "steps",
                out_dir={"flag": "--out"})
    args = ap.parse_args(["--out", "o", "--mode", "exact", "--corpus", "c", "--terms", "a", "b", "--no-verify",
                          "--strict", "--steps", "5"])
    assert from_args(_Options, args) == _Options(Path("o"), "exact", Path("c"), (Path("a"), Path("b")), False, True, 5)
    assert from_args(_Options, ap.parse_args(["--out", "o"])) == _Options(Path("o"))
    helps = {a.dest: a.help for a in ap._actions}
    assert helps["mode"] == "How to run: 100%% fast or exact. (default: %(default)s)"  # % escaped for argparse
    assert helps["verify"] == "turn off: Check every file." and helps["strict"] == "Stop at the first problem."
    for argv in (["--mode", "exact"], ["--out", "o", "--mode", "slow"], ["--out", "o", "--steps", "x"]):
        with pytest.raises(SystemExit):  # --out is required, mode a choice, steps an integer
            ap.parse_args(argv)
