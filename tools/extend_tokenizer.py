"""Extend a tokenizer with Korean (medical) tokens learned from a corpus and term lists.

    python tools/extend_tokenizer.py --base gemma3-270m --corpus DIR/raw_text_mixed.jsonl \
        --terms medical_terms_ko.txt --max-new-tokens 8192 --out model/tokenizer/extended

Writes DIR loadable with AutoTokenizer.from_pretrained(DIR) and DIR/report.json. New tokens get ids
after every base id; base ids never change. See korcpt/vocab/extend.py for the method.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool
from korcpt.vocab.extend import ExtendOptions, extend_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # Each dest is a field of ExtendOptions and each default comes from it.
    d = ExtendOptions
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base tokenizer: directory, hub id or preset (gemma3-270m, tiny-ko)")
    ap.add_argument("--corpus", type=Path, default=d.corpus, help="raw_text_mixed.jsonl ({\"text\": ...} a line)")
    ap.add_argument("--terms", type=Path, nargs="+", default=d.terms, metavar="FILE",
                    help="term lists, one term a line")
    ap.add_argument("--max-new-tokens", type=int, required=True, help="cap on new vocabulary entries")
    ap.add_argument("--min-frequency", type=int, default=d.min_frequency,
                    help="a new token must save at least this many tokens (default %(default)s)")
    ap.add_argument("--no-syllables", dest="add_syllables", action="store_false", default=d.add_syllables,
                    help="do not add Hangul syllables missing from the base vocabulary (they fall back to bytes)")
    ap.add_argument("--max-corpus-chars", type=int, default=d.max_corpus_chars,
                    help="read at most this many corpus characters (default %(default)s: all)")
    ap.add_argument("--eval", dest="eval_files", type=Path, nargs="+", default=d.eval_files, metavar="FILE",
                    help="text files to measure before/after in report.json (tokens per 100 syllables, chars/s)")
    ap.add_argument("--out", dest="out_dir", type=Path, required=True, help="output tokenizer directory")
    return ap.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ExtendOptions:
    """The stage's options from the parsed flags (lists of files become tuples, as the dataclass types them)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExtendOptions)}
    return ExtendOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    report = extend_tokenizer(options_from_args(parse_args(argv)))
    summary = {k: report[k] for k in ("new_tokens", "new_vocab_size", "training_tokens_before", "training_tokens_after")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
