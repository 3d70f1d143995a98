"""Distil the input and output embedding rows of an extended tokenizer's new tokens from the base model.

    python tools/distill_rows.py --model medgemma-4b --tokenizer model/tokenizer/medgemma_ko_med \
        --corpus data/corpus/raw_text_mixed.jsonl --out model/rows/medgemma_ko_med
    launch/train.py --config configs/4b.yaml --tokenizer-path model/tokenizer/medgemma_ko_med \
        --set model.new_rows=model/rows/medgemma_ko_med

Writes DIR/rows.safetensors (input and output rows, float32) and DIR/report.json (cost, per-token
losses, tokens with too few contexts); DIR is built beside and renamed into place. See
korcpt/model/distill.py for the method.
"""

from __future__ import annotations

import argparse
import json

import _bootstrap  # noqa: F401

from korcpt.cli import add_options, from_args, run_tool
from korcpt.model.distill import OUTPUT_MODES, DistillOptions, distill_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, DistillOptions, "model", "tokenizer", "corpus", "out_dir", "contexts_per_token", "context_tokens",
                "depth", "epochs", "lr", "batch_size", "output", "output_steps", "output_base_share", "output_pull",
                "output_positions", "min_contexts", "seed", "dtype", "device", "peak_tflops",
                out_dir={"flag": "--out"}, output={"choices": OUTPUT_MODES},
                dtype={"choices": ["auto", "float32", "bfloat16"]})
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    report = distill_rows(from_args(DistillOptions, parse_args(argv)))
    keys = ("new_tokens", "loss_mean_init", "loss_final", "seconds")
    print(json.dumps({**{k: report[k] for k in keys}, "too_few_contexts": report["too_few_contexts"]["count"],
                      "tokens_read": report["cost"]["tokens_read"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
