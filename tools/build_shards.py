"""Raw sources -> clean mixed corpus (raw_text_mixed.jsonl) -> packed token shards (+ manifest).

    python tools/build_shards.py --korean namu.json --mcq train.jsonl --medical-dict dict.json \
        --char-dict chars.json --tokenizer gemma3-270m --out data/shards/full
    python tools/build_shards.py --corpus-only --korean ... --out DIR      # corpus stage alone
    python tools/build_shards.py --from-jsonl DIR/raw_text_mixed.jsonl --tokenizer PATH --out DIR

With --val-korean, the corpus stage first cleans those files into DIR/val_documents.jsonl, the
validation set the shard stage packs. Defaults are those of korcpt.corpus.build.CorpusOptions and
korcpt.shards.writer.ShardOptions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401

from korcpt.cli import add_options, from_args, run_tool
from korcpt.corpus.build import OUTPUT_NAME, CorpusOptions
from korcpt.corpus.validation import VAL_NAME
from korcpt.errors import DataError
from korcpt.shards.format import MANIFEST
from korcpt.shards.writer import ShardOptions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("raw sources (at least one, unless --from-jsonl)")
    add_options(src, CorpusOptions, "korean", "mcq", "medical_dict", "char_dict", "exclude_mcq",
                exclude_mcq={"action": "append", "nargs": None})
    src.add_argument("--from-jsonl", type=Path, help="start from an existing mixed corpus ({\"text\"} JSONL)")
    mix = ap.add_argument_group("corpus")
    add_options(mix, CorpusOptions, "medical_multiplier", "seed", "max_samples", "min_chars", "min_hangul_ratio",
                "strict", seed={"help": "seed of the shuffle and the validation split"})
    mix.add_argument("--corpus-only", action="store_true", help="write raw_text_mixed.jsonl and report.json only")
    sh = ap.add_argument_group("shards")
    add_options(sh, ShardOptions, "tokenizer", "seq_len", "val_fraction", tokenizer={
        "required": False, "help": "tokenizer directory, hub id or preset (gemma3-270m, tiny-ko)"})
    add_options(sh, CorpusOptions, "val_korean")
    add_options(sh, ShardOptions, "shard_tokens")
    sh.add_argument("--format", choices=["npy", "webdataset"],
                    default="webdataset" if ShardOptions.webdataset else "npy",
                    help="also write webdataset tar shards of the packed sequences (default: %(default)s)")
    add_options(ap, CorpusOptions, "workers", workers={"help": "worker processes (0: all cores)"})
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.log import get_logger

    log = get_logger("build_shards")
    if not args.from_jsonl and not (args.korean or args.mcq or args.medical_dict or args.char_dict):
        raise DataError("no input: give at least one of --korean, --mcq, --medical-dict, --char-dict or --from-jsonl")
    if not (args.corpus_only or args.tokenizer):
        raise DataError("--tokenizer is required to build shards (or pass --corpus-only)")
    if args.from_jsonl and not args.val_korean:  # nothing for the corpus stage to do
        corpus_path, corpus_report = args.from_jsonl, None
    else:
        # A manifest from an earlier build would declare its shards complete beside the corpus (or the
        # validation documents) about to replace theirs: remove it first, as write_shards does.
        (args.out / MANIFEST).unlink(missing_ok=True)
        corpus_path, corpus_report = _corpus_stage(args, log)
    if args.corpus_only:
        return 0
    from korcpt.shards.writer import write_shards

    options = from_args(ShardOptions, args, val_documents=args.out / VAL_NAME if args.val_korean else None,
                       webdataset=args.format == "webdataset")
    manifest = write_shards(corpus_path, args.out, options, corpus_report=corpus_report)
    log.info("wrote %d shards to %s", len(manifest["shards"]), args.out)
    return 0


def _corpus_stage(args: argparse.Namespace, log: Any) -> tuple[Path, dict | None]:
    """Run the corpus stage into ``--out``: the mixed corpus (unless --from-jsonl) and the validation documents."""
    if args.from_jsonl:
        from korcpt.corpus.validation import write_val_documents

        n = write_val_documents(args.val_korean, args.out / VAL_NAME)
        log.info("validation: %d documents in %s", n, args.out / VAL_NAME)
        return args.from_jsonl, None
    from korcpt.corpus.build import build_corpus

    corpus_report = build_corpus(from_args(CorpusOptions, args), args.out)
    log.info("corpus: %s", args.out / OUTPUT_NAME)
    return args.out / OUTPUT_NAME, corpus_report


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
