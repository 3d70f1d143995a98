"""Extend a tokenizer with Korean (medical) tokens learned from a corpus and term lists.

    python tools/extend_tokenizer.py --base gemma3-270m --corpus DIR/raw_text_mixed.jsonl \
        --terms medical_terms_ko.txt --max-new-tokens 8192 --out model/tokenizer/extended

Writes DIR loadable with AutoTokenizer.from_pretrained(DIR) and DIR/report.json. New tokens get ids
after every base id; base ids never change. See korcpt/vocab/extend.py for the method.
"""

from __future__ import annotations

import argparse
import json

import _bootstrap  # noqa: F401

from korcpt.cli import add_options, from_args, run_tool
from korcpt.vocab.extend import ExtendOptions, extend_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, ExtendOptions, "base", "corpus", "terms", "max_new_tokens", "min_frequency", "add_syllables",
                "max_corpus_chars", "eval_files", "out_dir", terms={"metavar": "FILE"},
                add_syllables={"flag": "--no-syllables"}, eval_files={"flag": "--eval", "metavar": "FILE"},
                out_dir={"flag": "--out"})
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    report = extend_tokenizer(from_args(ExtendOptions, parse_args(argv)))
    summary = {k: report[k] for k in ("new_tokens", "new_vocab_size", "training_tokens_before", "training_tokens_after")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
