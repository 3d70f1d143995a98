"""Extend a tokenizer with Korean (medical) tokens learned from a corpus and term lists.

    python tools/extend_tokenizer.py --base gemma3-270m --corpus DIR/raw_text_mixed.jsonl \
        --terms medical_terms_ko.txt --max-new-tokens 8192 --out model/tokenizer/extended

Writes DIR loadable with AutoTokenizer.from_pretrained(DIR) and DIR/report.json. New tokens get ids
after every base id; base ids never change. See korcpt/vocab/extend.py for the method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base tokenizer: directory, hub id or preset (gemma3-270m, tiny-ko)")
    ap.add_argument("--corpus", type=Path, help="raw_text_mixed.jsonl ({\"text\": ...} a line)")
    ap.add_argument("--terms", type=Path, nargs="+", default=[], metavar="FILE", help="term lists, one term a line")
    ap.add_argument("--max-new-tokens", type=int, required=True, help="cap on new vocabulary entries")
    ap.add_argument("--min-frequency", type=int, default=2, help="a new token must save at least this many tokens")
    ap.add_argument("--no-syllables", action="store_true",
                    help="do not add Hangul syllables missing from the base vocabulary (they fall back to bytes)")
    ap.add_argument("--max-corpus-chars", type=int, default=0, help="read at most this many corpus characters (0: all)")
    ap.add_argument("--eval", type=Path, nargs="+", default=[], metavar="FILE",
                    help="text files to measure before/after in report.json (tokens per 100 syllables, chars/s)")
    ap.add_argument("--out", type=Path, required=True, help="output tokenizer directory")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.vocab.extend import extend_tokenizer

    report = extend_tokenizer(
        args.base, args.corpus, args.out, args.max_new_tokens, terms=args.terms, min_frequency=args.min_frequency,
        add_syllables=not args.no_syllables, max_corpus_chars=args.max_corpus_chars, eval_files=args.eval,
    )
    summary = {k: report[k] for k in ("new_tokens", "new_vocab_size", "training_tokens_before", "training_tokens_after")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
