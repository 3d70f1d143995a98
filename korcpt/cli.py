"""Conventions shared by every command-line tool: one-line errors and exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from korcpt.errors import KorcptError

EXIT_USER_ERROR = 2


def run_tool(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a tool's ``main``; turn a :class:`KorcptError` into ``error: ...`` on stderr and exit 2."""
    try:
        return int(main(argv) or 0)
    except KorcptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the model an evaluation tool scores: --model, --adapter, --tokenizer, --new-rows, --dtype, --device."""
    ap.add_argument("--model", required=True, help="preset (gemma3-270m, medgemma-4b, ...), model directory, .gguf or hub id")
    ap.add_argument("--adapter", type=Path, help="trained adapter directory (its tokenizer/ is used when present)")
    ap.add_argument("--tokenizer", help="tokenizer directory or preset (default: ADAPTER/tokenizer, else the model's)")
    ap.add_argument("--new-rows", help="distilled rows of the tokenizer's new tokens (tools/distill_rows.py), "
                                       "for an untrained extended model")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="auto: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda if available)")


def emit_report(report: dict, out: Path | None, summary: str) -> None:
    """A tool's result: ``summary`` on stderr; the JSON report to ``out``, or to stdout without one."""
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(summary, file=sys.stderr)
    if not out:
        print(text)


def _close_process_group() -> None:
    """Destroy a process group the run left open (an error path, or a tool that never ends one).

    A process that exits with its gloo/NCCL group alive can abort during interpreter shutdown
    ('terminate called without an active exception', pytorch/pytorch#190489) and turn exit 2 into SIGABRT.
    """
    if "torch" not in sys.modules:  # never import torch just to find nothing to close
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
