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
import dataclasses
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool
from korcpt.model.distill import OUTPUT_MODES, DistillOptions, distill_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Each dest is a field of DistillOptions and each default comes from it.
    d = DistillOptions
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: preset, directory, .gguf or hub id")
    ap.add_argument("--tokenizer", type=Path, required=True, help="extended tokenizer (tools/extend_tokenizer.py)")
    ap.add_argument("--corpus", type=Path, required=True, help="raw_text_mixed.jsonl the tokenizer was learned on")
    ap.add_argument("--out", dest="out_dir", type=Path, required=True, help="output directory")
    ap.add_argument("--contexts-per-token", type=int, default=d.contexts_per_token,
                    help="windows read per new token (default %(default)s)")
    ap.add_argument("--context-tokens", type=int, default=d.context_tokens,
                    help="extended tokens per window (default %(default)s)")
    ap.add_argument("--depth", type=float, default=d.depth,
                    help="share of the decoder layers whose output is matched (default %(default)s; 1: all)")
    ap.add_argument("--epochs", type=int, default=d.epochs, help="passes over the windows (default %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per step (default %(default)s)")
    ap.add_argument("--output", choices=OUTPUT_MODES, default=d.output,
                    help="how output rows are made (default %(default)s; see korcpt/model/distill.py)")
    ap.add_argument("--output-steps", type=int, default=d.output_steps,
                    help="steps of the ntp output rows (default %(default)s)")
    ap.add_argument("--output-pull", type=float, default=d.output_pull,
                    help="pull of the ntp output rows toward the mean of their pieces (default %(default)s)")
    ap.add_argument("--output-positions", type=int, default=d.output_positions,
                    help="positions the output rows are fitted on (default %(default)s)")
    ap.add_argument("--min-contexts", type=int, default=d.min_contexts,
                    help="tokens seen in fewer windows keep the mean of their pieces (default %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the window order (default %(default)s)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=d.dtype,
                    help="model dtype (auto: bfloat16 on CUDA, float32 on CPU); rows are float32")
    ap.add_argument("--device", default=d.device, help="cpu, cuda, cuda:0 (default %(default)s)")
    ap.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                    help="device TFLOP/s for the printed time estimate (default %(default)s: none)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = DistillOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillOptions)
                             if hasattr(args, f.name)})
    report = distill_rows(opts)
    keys = ("new_tokens", "loss_mean_init", "loss_final", "seconds")
    print(json.dumps({**{k: report[k] for k in keys}, "too_few_contexts": report["too_few_contexts"]["count"],
                      "tokens_read": report["cost"]["tokens_read"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
