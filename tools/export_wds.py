"""Add webdataset tar shards to an existing shard directory (what `build_shards.py --format webdataset` does).

    python tools/export_wds.py data/shards/full        # writes DIR/wds/{train,val}/shard-NNNNN.tar

Each tar holds, per window, `<index>.tokens.npy` (seq_len + 1 ids), `<index>.starts.npy` (document
starts) and `<index>.segments.npy` (each segment's source); never a pickle. The manifest is rewritten
(atomically, last) to list the tars with their SHA-256. Upload DIR/manifest.json and DIR/wds/ as they
are, then train from them with data.shards set to the train tars, e.g.

    data.shards: https://host/shards/full/wds/train/shard-{00000..00009}.tar
    data.shards: "pipe:aws s3 cp s3://bucket/shards/full/wds/train/shard-{00000..00009}.tar -"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory", type=Path, help="shard directory (holds manifest.json)")
    ap.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the token shards first")
    args = ap.parse_args(argv)
    from korcpt.shards.format import load_manifest
    from korcpt.shards.reader import open_shards
    from korcpt.shards.writer import add_webdataset

    manifest = load_manifest(args.directory)
    for split in ("train", "val"):
        open_shards(args.directory, split, verify=not args.no_verify)
    manifest = add_webdataset(args.directory, manifest)
    print(f"wrote {len(manifest['webdataset'])} tar shards under {args.directory / 'wds'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
