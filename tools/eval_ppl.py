"""Validation loss and perplexity of a base model or a trained adapter on the val split of shards.

    python tools/eval_ppl.py --model gemma3-270m --shards data/shards/full --out base_ppl.json
    python tools/eval_ppl.py --model gemma3-270m --adapter outputs/run --shards data/shards/full

Token-weighted (sum of token NLL / target tokens), with a per-source breakdown (Korean text vs
medical text) from the shards' index. --max-val-sequences N scores the first N validation sequences
in stored order, the same ones the trainer scores with eval.max_val_sequences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import add_model_arguments, emit_report, run_tool
from korcpt.errors import DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--shards", type=Path, required=True, help="shard directory written by tools/build_shards.py")
    ap.add_argument("--max-val-sequences", type=int, default=0, help="first N validation sequences only (0: all)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    ap.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every shard (sizes still checked)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    return ap.parse_args(argv)


def val_batches(shards, max_sequences: int, batch_size: int):
    """Batches of the first ``max_sequences`` val sequences in stored order, each with per-token sources."""
    import torch

    from korcpt.shards.reader import SequenceStream

    stream = SequenceStream(shards, seed=0, shuffle=False, limit=max_sequences)
    batch: list[dict] = []
    for sample in stream:
        # source_ids covers the seq_len + 1 window; labels are window[1:], so their sources are [1:] too.
        sample["token_source"] = torch.from_numpy(shards.source_ids(int(sample["sample_id"]))[1:].astype("int64"))
        batch.append(sample)
        if len(batch) == batch_size:
            yield {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
            batch = []
    if batch:
        yield {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.eval.loading import load_from_arguments
    from korcpt.eval.perplexity import evaluate_perplexity
    from korcpt.shards import tokenizer_fingerprint
    from korcpt.shards.reader import open_shards

    model, tokenizer = load_from_arguments(args)
    shards = open_shards(args.shards, "val", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                         verify=not args.no_verify)
    if shards.num_sequences == 0:
        raise DataError(f"{args.shards}: the val split has no sequences (build the shards with --val-fraction > 0)")
    result = evaluate_perplexity(model, val_batches(shards, args.max_val_sequences, args.batch_size),
                                 source_names=shards.sources or None)
    result.update(model=args.model, adapter=str(args.adapter) if args.adapter else None, shards=str(args.shards))
    emit_report(result, args.out, f"val loss {result['loss']:.4f}, ppl {result['ppl']:.3f} on {result['tokens']} "
                f"tokens ({result['sequences']} sequences)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
