"""``launch/train.py`` with a NaN gradient in chosen optimizer-step attempts, for multi-process runs.

    KORCPT_FAULT_NAN_ATTEMPTS=2 accelerate launch ... tests/faults/_nan_launch.py --config CFG

Every micro-batch of those attempts (0-based, counted per rank, ``train.grad_accum`` must be 2) keeps a
finite loss whose backward returns NaN, exactly as ``test_fault_nonfinite.py`` injects it in one
process. The library is not changed; this is test scaffolding.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

from test_fault_nonfinite import _inject  # noqa: E402

_inject(pytest.MonkeyPatch(), {int(a) for a in os.environ["KORCPT_FAULT_NAN_ATTEMPTS"].split(",")}, "nan_grad")
sys.argv[0] = str(HERE.parents[1] / "launch" / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
