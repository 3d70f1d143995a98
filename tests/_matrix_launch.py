"""Several training runs in one launch, for the distributed tests: each argument ``CONFIG[::RESUME]``
is trained in turn by launch/train.py's own ``main``, in the same processes (``python`` or under
``accelerate launch``). A launch costs the import of torch, transformers and DeepSpeed and the
process group setup; one launch per launcher pays them once for every configuration it trains.

Between runs Accelerate's state (``AcceleratorState`` and ``PartialState``) is reset, so that each run
builds its ranks, DeepSpeed plugin and precision from its own config as in a fresh process (and
records the same workarounds). The torch process group alone is kept for all runs: Accelerate
initialises one only where none exists, ``Accelerator.end_training`` would destroy it, and a group
initialised a second time in the same processes hung under DeepSpeed on CPU (measured: the second
ZeRO-3 run waited forever in its first collective), so ending it is left to ``run_tool`` after the
last run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from korcpt.cli import run_tool  # noqa: E402


def _train_main():
    spec = importlib.util.spec_from_file_location("korcpt_launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def main(argv: list[str] | None = None) -> int:
    from accelerate.state import AcceleratorState, PartialState

    PartialState.destroy_process_group = lambda self, group=None: None
    train_main = _train_main()
    for arg in sys.argv[1:] if argv is None else argv:
        cfg, _, resume = arg.partition("::")
        AcceleratorState._reset_state(reset_partial_state=True)
        code = train_main(["--config", cfg] + (["--resume", resume] if resume else []))
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
