"""Entry point of a training run, for `accelerate launch` or plain `python`.

    accelerate launch launch/train.py --config configs/27b_zero3.yaml
    python launch/train.py --config configs/tiny_cpu.yaml --set train.max_steps=5
    python launch/train.py --config configs/4b.yaml --model medgemma-4b --tokenizer-path DIR \
        --max-samples 5000 --epochs 1 --device cuda:0
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from korcpt.cli import add_options, run_tool  # noqa: E402
from korcpt.config import SHORTHANDS, RunConfig, field_docs  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value, e.g. --set train.lr=1e-4 (repeatable; applied last)")
    for name, key in SHORTHANDS.items():  # --model, --tokenizer-path, ...: typed and documented by their field
        section, field = key.split(".")
        cls = typing.get_type_hints(RunConfig)[section]
        add_options(ap, cls, field, **{field: {"flag": f"--{name.replace('_', '-')}", "dest": name, "default": None,
                                               "help": f"shorthand for --set {key}=...: " + field_docs(cls)[field]
                                               .replace("%", "%%")}})
    ap.add_argument("--resume", default="", metavar="auto|PATH",
                    help="continue from the newest complete checkpoint in output.dir (auto) or from PATH")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.config import apply_shorthands, load_config

    overrides = apply_shorthands(args.set, **{name: getattr(args, name) for name in SHORTHANDS})
    cfg = load_config(args.config, overrides)
    from korcpt.train.loop import train

    info = train(cfg, resume=args.resume)
    if info["stop_reason"].startswith("non_finite"):
        from korcpt.errors import TrainingError

        # the weights saved are those of the last good step (bad steps are never applied)
        raise TrainingError(f"training stopped at step {info['steps']}: {info['stop_reason']}")
    from korcpt.log import is_main_process

    if is_main_process():
        print(f"done: {info['steps']} steps, {info['tokens_seen']:,} tokens, stop: {info['stop_reason']}; "
              f"outputs in {cfg.output.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
