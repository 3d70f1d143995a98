"""Validation loss and perplexity of a base model or a trained adapter on the val split of shards,
or bits per character on plain text (the measure that compares two tokenizers).

    python tools/eval_ppl.py --model gemma3-270m --shards data/shards/full --out base_ppl.json
    python tools/eval_ppl.py --model gemma3-270m --adapter outputs/run --shards data/shards/full
    python tools/eval_ppl.py --model gemma3-270m [--adapter DIR] [--tokenizer DIR] --text FILE --out REPORT.json

--text FILE: a .txt (a document a non-empty line) or .jsonl ({"text"} a line). Each document is scored
alone from <bos>, its targets every token after it (no <eos>), its characters len(text); REPORT.json
holds bpc, bits_per_syllable, tokens, chars, ppl (per token) and tokens_per_100_chars. Per-token
perplexity of an extended tokenizer is not comparable with the base's (fewer, longer tokens raise it
for the same text); bits per character are.

With --shards:
Token-weighted (sum of token NLL / target tokens), with a per-source breakdown (Korean text vs
medical text) from the shards' index. --max-val-sequences N scores the first N validation sequences
in stored order, the same ones the trainer scores with eval.max_val_sequences.

The forward gets what the trainer's gets (korcpt.model.loss.model_batch): with document masking,
positions restart and attention stops at every document boundary of a packed sequence; without it,
neither. The setting is --document-mask/--no-document-mask, else data.document_mask of the run's
config.yaml beside --adapter, else the trainer's default (off).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import add_model_arguments, add_options, emit_report, run_tool
from korcpt.config import EvalConfig
from korcpt.errors import ConfigError, DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", type=Path, help="shard directory written by tools/build_shards.py")
    source.add_argument("--text", type=Path, help="plain documents: .txt (a line each) or .jsonl ({\"text\"})")
    add_options(ap, EvalConfig, "max_val_sequences", "batch_size")  # the trainer's defaults
    ap.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=None,
                    help="mask attention per document as the trainer's data.document_mask does (default: the "
                         "run's config.yaml beside --adapter, else off)")
    ap.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every shard (sizes still checked)")
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    return ap.parse_args(argv)


def document_mask_setting(flag: bool | None, adapter: Path | None) -> bool:
    """--document-mask if given, else the run's data.document_mask (ADAPTER/config.yaml), else the default."""
    from korcpt.config import DataConfig

    if flag is not None:
        return flag
    run_config = adapter / "config.yaml" if adapter is not None else None
    if run_config is None or not run_config.is_file():
        return DataConfig().document_mask
    import yaml

    value = ((yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("data") or {}).get(
        "document_mask", DataConfig().document_mask)
    if not isinstance(value, bool):
        raise ConfigError(f"{run_config}: data.document_mask must be true or false, found {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.eval.loading import load_from_arguments
    from korcpt.eval.perplexity import evaluate_perplexity, val_batches
    from korcpt.shards import tokenizer_fingerprint
    from korcpt.shards.reader import open_shards

    if args.text is not None:
        return score_text_file(args)
    model, tokenizer = load_from_arguments(args)
    shards = open_shards(args.shards, "val", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                         verify=not args.no_verify)
    if shards.num_sequences == 0:
        raise DataError(f"{args.shards}: the val split has no sequences (build the shards with --val-fraction > 0)")
    document_mask = document_mask_setting(args.document_mask, args.adapter)
    batches = val_batches(model, shards, max_sequences=args.max_val_sequences, batch_size=args.batch_size,
                          document_mask=document_mask)
    result = evaluate_perplexity(model, batches, source_names=shards.sources or None)
    result.update(model=args.model, adapter=str(args.adapter) if args.adapter else None, shards=str(args.shards),
                  document_mask=document_mask)
    emit_report(result, args.out, f"val loss {result['loss']:.4f}, ppl {result['ppl']:.3f} on {result['tokens']} "
                f"tokens ({result['sequences']} sequences)")
    return 0


def score_text_file(args: argparse.Namespace) -> int:
    from korcpt.eval.loading import load_from_arguments
    from korcpt.eval.perplexity import read_heldout_texts, score_text

    texts, skipped = read_heldout_texts(args.text)  # bad input fails before the model loads
    if not texts:
        raise DataError(f"{args.text}: no document to score ({len(skipped)} line(s) skipped)")
    model, tokenizer = load_from_arguments(args)
    result = score_text(model, tokenizer, texts, batch_size=args.batch_size)
    result.update(model=args.model, adapter=str(args.adapter) if args.adapter else None, text=str(args.text),
                  tokenizer_size=len(tokenizer), skipped=len(skipped), skipped_lines=skipped[:20])
    emit_report(result, args.out, f"{result['bpc']:.4f} bits per character, {result['tokens_per_100_chars']:.1f} "
                f"tokens per 100 characters on {result['documents']} documents ({len(skipped)} skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
