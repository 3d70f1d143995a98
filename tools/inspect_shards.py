"""Summarise a shard directory, verify every checksum, and decode sample N back to text.

    python tools/inspect_shards.py data/shards/full                 # summary + SHA-256 of every file
    python tools/inspect_shards.py data/shards/full --sample 0 --sample 17 --split val
    python tools/inspect_shards.py DIR --no-verify --sample 3 --tokenizer tiny-ko
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path, help="shard directory (holds manifest.json)")
    ap.add_argument("--sample", type=int, action="append", default=[], metavar="N",
                    help="decode global sequence N of --split (repeatable)")
    ap.add_argument("--split", choices=["train", "val"], default="train", help="split of --sample (default train)")
    ap.add_argument("--no-verify", action="store_true", help="check sizes only, not SHA-256 checksums")
    ap.add_argument("--tokenizer", help="tokenizer to decode with (default: the one named in the manifest)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.errors import DataError, ModelError
    from korcpt.shards.format import load_manifest, tokenizer_fingerprint
    from korcpt.shards.reader import open_shards

    manifest = load_manifest(args.directory)
    tok = manifest["tokenizer"]
    counts = manifest.get("counts", {})
    print(f"shards      {args.directory}  (format {manifest['format_version']})")
    print(f"tokenizer   {tok.get('name')}  vocab {tok.get('vocab_size'):,}  {tok.get('fingerprint')}")
    print(f"tokens      {manifest['dtype']}  seq_len {manifest['seq_len']}  bos {manifest['bos_id']}  eos {manifest['eos_id']}")
    print(f"sources     {', '.join(manifest.get('sources', [])) or '-'}")
    print(f"{'split':<7}{'shards':>8}{'documents':>12}{'tokens':>15}{'sequences':>12}{'tail dropped':>14}")
    for split in ("train", "val"):
        c = counts.get(split, {})
        n = sum(1 for s in manifest["shards"] if s["split"] == split)
        print(f"{split:<7}{n:>8}{c.get('documents', 0):>12,}{c.get('tokens', 0):>15,}{c.get('sequences', 0):>12,}"
              f"{c.get('tail_tokens_dropped', 0):>14,}")
    if manifest.get("webdataset"):
        print(f"webdataset  {len(manifest['webdataset'])} tar shards under {args.directory / 'wds'}")

    started = time.perf_counter()
    sets = {split: open_shards(args.directory, split, verify=not args.no_verify) for split in ("train", "val")}
    checked = len(manifest["shards"])
    what = "sizes and SHA-256" if not args.no_verify else "sizes (checksums skipped: --no-verify)"
    print(f"verified    {checked} shards and their indexes: {what} OK ({time.perf_counter() - started:.1f} s)")

    if not args.sample:
        return 0
    shards = sets[args.split]
    tokenizer = None
    name = args.tokenizer or tok.get("name")
    try:
        from korcpt.assets import load_tokenizer

        tokenizer = load_tokenizer(name)
    except ModelError as exc:
        print(f"note        cannot load tokenizer {name!r} ({exc}); showing ids only")
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != tok.get("fingerprint"):
        print(f"warning     tokenizer {name!r} is not the one these shards were built with (fingerprint differs)")
    for n in args.sample:
        if not 0 <= n < shards.num_sequences:
            raise DataError(f"--sample {n}: the {args.split} split has sequences 0..{shards.num_sequences - 1}")
        k, j = shards.locate(n)
        window = shards.window(n)
        starts = shards.document_starts(n)
        sources = shards.source_ids(n)
        names = sorted({shards.sources[s] if 0 <= s < len(shards.sources) else "?" for s in sources.tolist()})
        print(f"\n== {args.split} sample {n}: {shards.entries[k]['path']} window {j}, {window.size} tokens, "
              f"documents start at {starts.tolist()}, sources {names}")
        if tokenizer is None:
            print(window.tolist())
        else:
            print(tokenizer.decode(window.tolist(), skip_special_tokens=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
