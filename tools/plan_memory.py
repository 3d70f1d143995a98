"""Parameter counts and per-GPU memory of a run, from its config and the architecture on the meta device.

    python tools/plan_memory.py --config configs/27b_zero3.yaml [--gpus 8] [--gpu-mem 80] [--vocab N] [--json]
    python tools/plan_memory.py --config configs/4b.yaml --vocab 282738 --compare-embeddings

The ZeRO stage and GPU count default to the accelerate config that goes with the run config
(configs/accelerate/zero3.yaml for *_zero3.yaml, zero2.yaml for *_zero2.yaml, single_gpu.yaml
otherwise); the vocabulary defaults to the size of model.tokenizer when it is a local directory,
else the architecture's; the sequence length to the shards' manifest, else 2048.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool
from korcpt.config import load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    ap.add_argument("--accelerate-config", type=Path, help="accelerate config naming the ZeRO stage and GPU count")
    ap.add_argument("--gpus", type=int, help="number of GPUs (default: num_processes of the accelerate config)")
    ap.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default: from the accelerate config)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    ap.add_argument("--vocab", type=int, help="tokenizer size after extension (e.g. 282738)")
    ap.add_argument("--base-vocab", type=int, help="embedding rows of the base model (default: the architecture's)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the shards' manifest, else 2048)")
    ap.add_argument("--compare-embeddings", action="store_true", help="also plan the other two embedding modes")
    ap.add_argument("--json", action="store_true", help="print one JSON object (a list with --compare-embeddings)")
    return ap.parse_args(argv)


def default_accelerate_config(config_path: Path) -> Path:
    from korcpt.assets import ROOT

    stem = config_path.stem
    name = "zero3" if stem.endswith("zero3") else "zero2" if stem.endswith("zero2") else "single_gpu"
    return ROOT / "configs" / "accelerate" / f"{name}.yaml"


def tokenizer_size(name: str) -> int | None:
    """len(tokenizer) of a local tokenizer directory (no download), else None."""
    if not name or not Path(name).expanduser().is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(Path(name).expanduser(), local_files_only=True))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer falls back to the architecture's vocabulary
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.model.memory import format_plan, plan, seq_len_of_shards, zero_stage_of_accelerate_config

    cfg = load_config(args.config, args.set, check_files=False)
    acc = args.accelerate_config or default_accelerate_config(args.config)
    stage, procs = zero_stage_of_accelerate_config(acc) if acc.is_file() else (0, 1)
    zero = stage if args.zero is None else args.zero
    gpus = args.gpus or procs
    vocab = args.vocab or tokenizer_size(cfg.model.tokenizer)
    seq_len = args.seq_len or seq_len_of_shards(cfg)
    modes = [cfg.lora.embeddings]
    if args.compare_embeddings:
        modes += [m for m in ("full", "new_tokens", "frozen") if m != cfg.lora.embeddings]
    plans = []
    for mode in modes:
        run = replace(cfg, lora=replace(cfg.lora, embeddings=mode))
        plans.append(plan(run, gpus=gpus, gpu_mem_gib=args.gpu_mem, zero_stage=zero, seq_len=seq_len,
                          vocab=vocab, base_vocab=args.base_vocab))
    if args.json:
        out = [p.to_json() for p in plans]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print(f"accelerate config: {acc if acc.is_file() else '(none)'}")
        print("\n\n".join(format_plan(p) for p in plans))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
