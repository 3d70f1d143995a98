"""``launch/train.py`` with checkpoint writes slowed down, so that a SIGKILL can land inside one.

    python tests/faults/_slow_launch.py --config CFG [--resume auto]

With ``KORCPT_FAULT_SAVE_DELAY=SECONDS`` every ``Accelerator.save_state`` sleeps that long before and
after writing its files into ``checkpoints/.tmp-step-N`` (and ``trainer_state.json`` comes after it):
a kill timed from the appearance of the ``.tmp-`` folder then hits an empty folder, a folder with
Accelerate's files and no trainer state, or anything in between. The final outputs (adapter,
tokenizer, training_info.json) are delayed the same way after the last checkpoint is complete. The numbers are untouched, so a
slowed run is bit-for-bit the run it wraps. The library is not changed; this is test scaffolding.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "launch" / "train.py"
sys.path.insert(0, str(ROOT))  # as launch/train.py does, so that korcpt imports from this checkout

delay = float(os.environ.get("KORCPT_FAULT_SAVE_DELAY", "0") or 0)
if delay > 0:
    import accelerate

    _original = accelerate.Accelerator.save_state

    def _slow_save_state(self, *args, **kwargs):
        time.sleep(delay)
        out = _original(self, *args, **kwargs)
        time.sleep(delay)
        return out

    accelerate.Accelerator.save_state = _slow_save_state

    import korcpt.train.loop as _loop

    _save_outputs = _loop.save_outputs

    def _slow_save_outputs(*args, **kwargs):  # the final checkpoint is complete, the outputs not yet
        time.sleep(delay)
        return _save_outputs(*args, **kwargs)

    _loop.save_outputs = _slow_save_outputs

sys.argv = [str(TRAIN), *sys.argv[1:]]
runpy.run_path(str(TRAIN), run_name="__main__")
