"""Raw sources -> clean mixed corpus (raw_text_mixed.jsonl) -> packed token shards (+ manifest).

    python tools/build_shards.py --korean namu.json --mcq train.jsonl --medical-dict dict.json \
        --char-dict chars.json --tokenizer gemma3-270m --out data/shards/full
    python tools/build_shards.py --corpus-only --korean ... --out DIR      # corpus stage alone
    python tools/build_shards.py --from-jsonl DIR/raw_text_mixed.jsonl --tokenizer PATH --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool
from korcpt.errors import DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("raw sources (at least one, unless --from-jsonl)")
    src.add_argument("--korean", nargs="+", type=Path, default=[], metavar="PATH",
                     help="Korean text: JSON array (Namu dump), JSONL, .txt, a directory of those, or a "
                          "HuggingFace datasets directory saved with save_to_disk")
    src.add_argument("--mcq", type=Path, help="KorMedMCQA JSONL (question, A..E, answer 1-based)")
    src.add_argument("--medical-dict", type=Path, help="medical dictionary: JSON list or JSONL of {term, definition}")
    src.add_argument("--char-dict", type=Path, help="medical symbol dictionary: JSON list of {term, definition}")
    src.add_argument("--exclude-mcq", type=Path, action="append", default=[], metavar="PATH",
                     help="KorMedMCQA file(s) held out for evaluation: their questions are removed from every source")
    src.add_argument("--from-jsonl", type=Path, help="start from an existing mixed corpus ({\"text\"} JSONL)")
    mix = ap.add_argument_group("corpus")
    mix.add_argument("--medical-multiplier", type=int, default=5, help="copies of each medical record (default 5)")
    mix.add_argument("--seed", type=int, default=42, help="seed of the shuffle and the validation split")
    mix.add_argument("--max-samples", type=int, default=0,
                     help="cap on mixed documents (0: all): the first N of the seeded shuffle are kept")
    mix.add_argument("--min-chars", type=int, default=100, help="drop Korean documents shorter than this after cleaning")
    mix.add_argument("--min-hangul-ratio", type=float, default=0.10,
                     help="drop Korean documents with a smaller share of Hangul among non-space characters")
    mix.add_argument("--strict", action="store_true", help="stop at the first rejected record, naming file and line")
    mix.add_argument("--corpus-only", action="store_true", help="write raw_text_mixed.jsonl and report.json only")
    sh = ap.add_argument_group("shards")
    sh.add_argument("--tokenizer", help="tokenizer directory, hub id or preset (gemma3-270m, tiny-ko)")
    sh.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (windows hold seq_len+1)")
    sh.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    sh.add_argument("--val-korean", nargs="+", type=Path, default=[], metavar="PATH",
                    help="explicit validation text (same formats as --korean) instead of --val-fraction")
    sh.add_argument("--shard-tokens", type=int, default=100_000_000, help="target tokens per shard file")
    sh.add_argument("--format", choices=["npy", "webdataset"], default="npy",
                    help="also write webdataset tar shards of the packed sequences")
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: all cores)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.log import get_logger

    log = get_logger("build_shards")
    if args.from_jsonl:
        corpus_path, corpus_report = args.from_jsonl, None
    else:
        if not (args.korean or args.mcq or args.medical_dict or args.char_dict):
            raise DataError("no input: give at least one of --korean, --mcq, --medical-dict, --char-dict or --from-jsonl")
        from korcpt.corpus.build import CorpusOptions, build_corpus

        opts = CorpusOptions(
            korean=args.korean, mcq=args.mcq, medical_dict=args.medical_dict, char_dict=args.char_dict,
            exclude_mcq=args.exclude_mcq, medical_multiplier=args.medical_multiplier, seed=args.seed,
            max_samples=args.max_samples, min_chars=args.min_chars, min_hangul_ratio=args.min_hangul_ratio,
            strict=args.strict, workers=args.workers,
        )
        # A manifest from an earlier build would declare its shards complete beside the corpus about to
        # replace theirs: remove it first, as write_shards does before touching any shard.
        (args.out / "manifest.json").unlink(missing_ok=True)
        corpus_report = build_corpus(opts, args.out)
        corpus_path = args.out / "raw_text_mixed.jsonl"
        log.info("corpus: %s", corpus_path)
    if args.corpus_only:
        return 0
    if not args.tokenizer:
        raise DataError("--tokenizer is required to build shards (or pass --corpus-only)")
    from korcpt.shards.writer import ShardOptions, write_shards

    manifest = write_shards(
        corpus_path, args.out,
        ShardOptions(tokenizer=args.tokenizer, seq_len=args.seq_len, val_fraction=args.val_fraction,
                     val_korean=args.val_korean, shard_tokens=args.shard_tokens, seed=args.seed,
                     workers=args.workers, webdataset=args.format == "webdataset"),
        corpus_report=corpus_report,
    )
    log.info("wrote %d shards to %s", len(manifest["shards"]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
