"""The on-disk format of a shard directory, shared by the writer, the reader and the tools.

Layout of ``DIR`` (everything but ``manifest.json`` and ``report.json`` is named by the manifest)::

    DIR/train/shard-00000.bin       bare little-endian token array (uint16 or uint32), no header:
                                    np.memmap(path, dtype) reads it, as any nanoGPT-style loader does
    DIR/train/shard-00000.idx.npy   int64 array (D, 4), one row per document segment in the shard:
                                    [token offset, corpus line, source id, 1 if a document starts there]
    DIR/val/...                     the same for the validation split
    DIR/wds/{train,val}/shard-00000.tar   with --format webdataset: the same windows as tar members
    DIR/report.json                 corpus report + token statistics
    DIR/manifest.json               written last, atomically: its presence means the set is complete

Packing (see :mod:`korcpt.shards.writer` for a worked example): each document becomes
``<bos> tokens <eos>``; a split's documents are concatenated in corpus order and cut into windows of
``seq_len + 1`` tokens that overlap by one token, so that every token after the first is a target
exactly once. A shard with ``sequences`` windows holds ``sequences * seq_len + 1`` tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from korcpt.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
SPLITS = ("train", "val")
INDEX_SUFFIX = ".idx.npy"
# Columns of a shard's index array.
IDX_OFFSET, IDX_LINE, IDX_SOURCE, IDX_IS_START = 0, 1, 2, 3
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def choose_dtype(vocab_size: int) -> str:
    """``"uint16"`` when every id of a vocabulary of ``vocab_size`` fits in 16 bits, else ``"uint32"``.

    Example: a 4,096-token tokenizer -> uint16; Gemma 3's 262,144 tokens -> uint32 (ids up to 262,143).
    """
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_fingerprint(tokenizer: Any, vocab: dict[str, int] | None = None) -> str:
    """A hash of what token ids mean for ``tokenizer``: its id->token table and special tokens.

    Two tokenizers with the same fingerprint turn the same ids into the same strings, whatever files
    they were loaded from (a GGUF, a saved directory, the hub); any added, removed or renumbered token
    changes it. The trainer compares this with ``manifest["tokenizer"]["fingerprint"]``.

    Args:
        tokenizer: a HuggingFace tokenizer (anything with ``get_vocab()``), or a ``tokenizers.Tokenizer``.
        vocab: ``tokenizer.get_vocab()`` if the caller has it already (it takes a second for Gemma's).

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    vocab = tokenizer.get_vocab() if vocab is None else vocab
    by_id = [""] * (max(vocab.values(), default=-1) + 1)
    for token, idx in vocab.items():
        by_id[idx] = token
    table = f"{len(vocab)}\n" + "\n".join(by_id)  # line i is token i; the count tells a gap from ""
    specials = "".join(f"\n{name}={getattr(tokenizer, name, None)}"
                       for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"))
    return "sha256:" + hashlib.sha256((table + specials).encode("utf-8", "surrogatepass")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_member(directory: Path, relative: str, what: str) -> Path:
    """Resolve a path named by a manifest, refusing any that leaves ``directory``.

    Refused: absolute paths, ``..`` components, and symlinks (anywhere on the way) whose target lies
    outside the directory. Raises :class:`DataError` naming the manifest and the path.
    """
    manifest = directory / MANIFEST
    rel = check_relative(manifest, relative, what)
    root = directory.resolve()
    full = (directory / rel).resolve()
    if full != root and root not in full.parents:
        raise DataError(
            f"{manifest}: {what} path {relative!r} resolves to {full}, outside the shard directory {root}"
        )
    return directory / rel


def check_relative(where: Path | str, relative: Any, what: str) -> Path:
    """``relative`` as a path if it names something inside the directory it is relative to: refused (a
    :class:`DataError` naming ``where``) are non-strings, absolute paths, ``..`` components and a first
    component with a drive or a URL scheme. Symlinks are :func:`safe_member`'s to check, on disk."""
    if not isinstance(relative, str) or not relative:
        raise DataError(f"{where}: {what} path must be a non-empty relative string, found {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ".." in rel.parts or ":" in rel.parts[0]:
        raise DataError(f"{where}: {what} path {relative!r} leaves the shard directory; expected a relative path "
                        "inside it")
    return rel


def load_manifest(directory: Path) -> dict:
    """Read and structurally check ``DIR/manifest.json``; raises :class:`DataError` naming the file."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} not found: {directory} is not a complete shard directory "
            "(the manifest is written last; build it with tools/build_shards.py)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    return parse_manifest(data, str(path))


def parse_manifest(data: bytes, path: str) -> dict:
    """Decode and structurally check a manifest's bytes (read from a file or a URL named ``path``)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION} (rebuild the shards)")
    missing = [k for k in ("tokenizer", "dtype", "seq_len", "bos_id", "eos_id", "shards") if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}")
    if manifest["dtype"] not in DTYPES:
        raise DataError(f"{path}: dtype {manifest['dtype']!r}, expected one of {sorted(DTYPES)}")
    if not isinstance(manifest["seq_len"], int) or manifest["seq_len"] < 1:
        raise DataError(f"{path}: seq_len {manifest['seq_len']!r}, expected a positive integer")
    if not isinstance(manifest["shards"], list):
        raise DataError(f"{path}: shards must be a list, found {type(manifest['shards']).__name__}")
    for i, shard in enumerate(manifest["shards"]):
        keys = ("split", "path", "index", "tokens", "sequences", "sha256")
        if not isinstance(shard, dict) or any(k not in shard for k in keys):
            raise DataError(f"{path}: shards[{i}] must be an object with keys {list(keys)}, found {shard!r}")
        if shard["split"] not in SPLITS:
            raise DataError(f"{path}: shards[{i}].split {shard['split']!r}, expected one of {list(SPLITS)}")
        seqs, toks = shard["sequences"], shard["tokens"]
        if not (isinstance(seqs, int) and isinstance(toks, int) and seqs >= 1 and toks == seqs * manifest["seq_len"] + 1):
            raise DataError(
                f"{path}: shards[{i}] ({shard['path']}) has tokens={toks!r}, sequences={seqs!r}; "
                f"expected tokens = sequences * seq_len + 1 with seq_len={manifest['seq_len']}"
            )
    _check_webdataset(manifest, path)
    return manifest


def _check_webdataset(manifest: dict, path: str) -> None:
    """The export's entries (``"webdataset"``, optional): per split, contiguous from sequence 0, inside
    the export, and holding as many sequences as the split's token shards."""
    entries = manifest.get("webdataset", [])
    if not isinstance(entries, list):
        raise DataError(f"{path}: webdataset must be a list, found {type(entries).__name__}")
    keys = ("split", "path", "first_sequence", "sequences", "sha256")
    first = dict.fromkeys(SPLITS, 0)
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in keys) or e["split"] not in SPLITS:
            raise DataError(f"{path}: webdataset[{i}] must be an object with keys {list(keys)} and split in "
                            f"{list(SPLITS)}, found {e!r}")
        if e["first_sequence"] != first[e["split"]] or not isinstance(e["sequences"], int) or e["sequences"] < 1:
            raise DataError(f"{path}: webdataset[{i}] ({e['path']}) has first_sequence={e['first_sequence']!r}, "
                            f"sequences={e['sequences']!r}; expected first_sequence={first[e['split']]} and sequences >= 1")
        check_relative(path, e["path"], "webdataset")
        first[e["split"]] += e["sequences"]
    for split in {e["split"] for e in entries}:
        memmap = sum(s["sequences"] for s in manifest["shards"] if s["split"] == split)
        if first[split] != memmap:
            raise DataError(f"{path}: the {split} tars hold {first[split]} sequences, expected {memmap} (the token "
                            "shards'); re-export")
