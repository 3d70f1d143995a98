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
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool
from korcpt.corpus.build import OUTPUT_NAME, CorpusOptions
from korcpt.corpus.validation import VAL_NAME
from korcpt.errors import DataError
from korcpt.shards.format import MANIFEST
from korcpt.shards.writer import ShardOptions


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The usage examples as written, and every option's default (from the dataclasses) in its help."""


def _field_docs(cls: type) -> dict[str, str]:
    """The comment above each field of dataclass ``cls``: korcpt documents its option fields that way."""
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("# "))
            continue
        field = re.match(r"(\w+)\s*:", text)
        if field and comment:
            docs[field.group(1)] = " ".join(comment)
        comment = []
    return docs


_DOCS = {cls: _field_docs(cls) for cls in (CorpusOptions, ShardOptions)}


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _add(group: Any, cls: type, name: str, **kwargs) -> None:
    """``--name`` for field ``name`` of ``cls``, its default and help taken from the dataclass."""
    field = _field(cls, name)
    default = _default(field)
    if isinstance(default, bool):
        kwargs.setdefault("action", "store_true")
    elif isinstance(default, (int, float)):
        kwargs.setdefault("type", type(default))
    elif "Path" in str(field.type):
        kwargs.setdefault("type", Path)
        if isinstance(default, list) and "action" not in kwargs:
            kwargs.setdefault("nargs", "+")
            kwargs.setdefault("metavar", "PATH")
    help_text = kwargs.pop("help", None) or _DOCS[cls][name]
    group.add_argument(f"--{name.replace('_', '-')}", default=default, help=help_text.replace("%", "%%"), **kwargs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    src = ap.add_argument_group("raw sources (at least one, unless --from-jsonl)")
    for name in ("korean", "mcq", "medical_dict", "char_dict"):
        _add(src, CorpusOptions, name)
    _add(src, CorpusOptions, "exclude_mcq", action="append", metavar="PATH")
    src.add_argument("--from-jsonl", type=Path, help="start from an existing mixed corpus ({\"text\"} JSONL)")
    mix = ap.add_argument_group("corpus")
    _add(mix, CorpusOptions, "medical_multiplier")
    _add(mix, CorpusOptions, "seed", help="seed of the shuffle and the validation split")
    for name in ("max_samples", "min_chars", "min_hangul_ratio", "strict"):
        _add(mix, CorpusOptions, name)
    mix.add_argument("--corpus-only", action="store_true", help="write raw_text_mixed.jsonl and report.json only")
    sh = ap.add_argument_group("shards")
    _add(sh, ShardOptions, "tokenizer", help="tokenizer directory, hub id or preset (gemma3-270m, tiny-ko)")
    for name in ("seq_len", "val_fraction"):
        _add(sh, ShardOptions, name)
    _add(sh, CorpusOptions, "val_korean")
    _add(sh, ShardOptions, "shard_tokens")
    webdataset = _default(_field(ShardOptions, "webdataset"))
    sh.add_argument("--format", choices=["npy", "webdataset"], default="webdataset" if webdataset else "npy",
                    help="also write webdataset tar shards of the packed sequences")
    _add(ap, CorpusOptions, "workers", help="worker processes (0: all cores)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    return ap.parse_args(argv)


def _options(cls: type, args: argparse.Namespace, **given):
    """An instance of ``cls`` from the flags named like its fields, and ``given``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


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

    options = _options(ShardOptions, args, val_documents=args.out / VAL_NAME if args.val_korean else None,
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

    corpus_report = build_corpus(_options(CorpusOptions, args), args.out)
    log.info("corpus: %s", args.out / OUTPUT_NAME)
    return args.out / OUTPUT_NAME, corpus_report


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
