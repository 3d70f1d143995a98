"""Merge a trained adapter into its base model and write a full model in safetensors, for serving.

    python tools/merge_adapter.py --model medgemma-4b --adapter outputs/4b --out model/medgemma-4b-ko-cpt

The base is grown to the adapter's tokenizer (ADAPTER/tokenizer) exactly as training grew it, the
LoRA weights are folded into the linear layers and the trained embedding rows written into the
(tied) embedding; untied output rows (model.new_rows) get a head of their own; the tokenizer is saved beside the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import add_options, run_tool
from korcpt.config import ModelConfig


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: preset, local directory, .gguf file or hub id")
    ap.add_argument("--adapter", required=True, type=Path, help="adapter directory written by launch/train.py")
    ap.add_argument("--tokenizer", help="tokenizer (default: ADAPTER/tokenizer, else the model's)")
    add_options(ap, ModelConfig, "dtype", dtype={"help": "dtype of the merged weights (auto: float32 on CPU, "
                                                         "bfloat16 on CUDA)"})
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from korcpt.eval.loading import load_for_eval, merge_adapter

    model, tokenizer = load_for_eval(args.model, adapter=args.adapter, tokenizer=args.tokenizer, dtype=args.dtype)
    merged = merge_adapter(model)
    args.out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
