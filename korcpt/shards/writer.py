"""Documents -> packed token shards: tokenize in parallel, split train/val by document, pack, write.

Mental model::

    documents JSONL ──(LineChunks)──> Encoder (encode.py): worker processes parse, hash-split, tokenize
                    ──(in corpus order)──> ShardWriter.add: one packer per split
                    ──> DIR/{train,val}/shard-NNNNN.bin + .idx.npy ──> ShardWriter.finish:
                        [webdataset tars] ──> report.json ──> manifest.json (last)

The shard stage reads documents only (:mod:`korcpt.shards.documents`): the corpus stage writes the
mixed corpus and, with validation files, the validation documents, both already clean.

Packing, with a worked example. Every document becomes ``<bos> t1 .. tk <eos>`` (the ids come from the
tokenizer; text is encoded without the tokenizer's own special tokens, so ``<bos>`` is never doubled,
and a literal "<eos>" typed in a document stays text). A split's documents are concatenated in corpus
order into one stream ``s`` and cut into windows of ``seq_len + 1`` tokens that overlap by one token::

    window i = s[i * seq_len : i * seq_len + seq_len + 1]      input = window[:-1], target = window[1:]

    seq_len = 4, documents A = a1 a2 a3, B = b1 b2  ->  s = <bos> a1 a2 a3 <eos> <bos> b1 b2 <eos>  (9 tokens)
    window 0 = s[0:5] = <bos> a1 a2 a3 <eos>
    window 1 = s[4:9] = <eos> <bos> b1 b2 <eos>      (s[4] is shared: last target of 0, first input of 1)
    windows = (len(s) - 1) // seq_len = 2; tokens kept = 2 * 4 + 1 = 9; tail dropped = 0

So every token after the first is a target exactly once. Remainder: the last ``(len(s) - 1) % seq_len``
tokens of a split (fewer than ``seq_len``) complete no window and are dropped; the manifest counts them
(``counts.<split>.tail_tokens_dropped``). Nothing is padded.

Shards: a split's windows are cut into files of ``max(1, shard_tokens // seq_len)`` windows; a shard
with ``m`` windows holds ``m * seq_len + 1`` tokens and the next shard starts with that shard's last
token again (the same one-token overlap), so the files are independent and together cover the stream.
Each shard is written to a temporary name and renamed when complete; the manifest is written last.

Validation split, at document level and before packing: a document goes to ``val`` when a keyed hash
of its text falls under ``val_fraction`` (identical texts, such as the 5x medical copies, always land
on the same side), or, with ``val_documents``, that file is the validation set and any corpus
document with the same text as one of them (cleaned or as given) is left out of ``train``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from korcpt.errors import ConfigError, DataError
from korcpt.files import AtomicFile, atomic_write_bytes, atomic_write_json
from korcpt.log import get_logger
from korcpt.shards.documents import LineChunks, read_documents
from korcpt.shards.encode import Encoder, PackTokenizer, TokenizedChunk, doc_hash, load_pack_tokenizer
from korcpt.shards.format import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    REPORT,
    SPLITS,
)

log = get_logger(__name__)

PACKING = ("each document is <bos> tokens <eos>; windows of seq_len+1 tokens overlap by one token; "
           "the tail that completes no window is dropped")


@dataclass
class ShardOptions:
    """How to turn a corpus into shards (the shard flags of ``tools/build_shards.py``)."""

    tokenizer: Any
    """Tokenizer: a preset (gemma3-270m, tiny-ko), a local directory, a hub id, or a loaded fast tokenizer."""
    seq_len: int = 2048
    """Tokens per training sequence (windows hold seq_len + 1)."""
    val_fraction: float = 0.01
    """Share of documents held out for validation, by a hash of their text (unless a validation set is given)."""
    val_documents: Path | None = None
    """The validation set: a documents JSONL written by the corpus stage (korcpt.corpus.validation)."""
    shard_tokens: int = 100_000_000
    """Target tokens per shard file (rounded down to whole windows, at least one window)."""
    seed: int = 42
    """Seed of the validation hash."""
    workers: int = 0
    """Tokenizer processes (0: all cores; 1: tokenize in this process)."""
    webdataset: bool = False
    """Also write the windows as webdataset tar shards under DIR/wds/."""

    def validate(self) -> None:
        problems = []
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            problems.append(f"seq_len must be a positive integer, found {self.seq_len!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            problems.append(f"val_fraction must lie in [0, 1), found {self.val_fraction!r}")
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            problems.append(f"shard_tokens must be a positive integer, found {self.shard_tokens!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            problems.append(f"workers must be >= 0 (0: all cores), found {self.workers!r}")
        if problems:
            raise ConfigError("; ".join(problems))


class _SplitWriter:
    """Packs one split's token stream into overlapping windows and shard files (see module docstring)."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, seq_len: int, windows_per_shard: int):
        self.root, self.split, self.dtype, self.S = root, split, dtype, seq_len
        self.per_shard = windows_per_shard
        (root / split).mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self.pending = np.empty(0, dtype=dtype)  # tokens not yet written; s[base + written] is pending[0]
        self.base = 0  # stream position of the current shard's first token
        self.written = 0  # tokens in the current shard file
        self.windows = 0  # windows in the current shard file
        self.out: AtomicFile | None = None  # the shard file being written, renamed into place when full
        self.hasher = hashlib.sha256()
        self.doc_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (start, line, source)
        self.head = (-1, -1)  # (line, source) of the document running at self.base, if it started before
        self.stream_tokens = 0
        self.documents = 0

    def add(self, tokens: np.ndarray, lens: np.ndarray, lines: np.ndarray, source_ids: np.ndarray) -> None:
        if not tokens.size:
            return
        starts = self.stream_tokens + np.concatenate(([0], np.cumsum(lens)[:-1]))
        self.doc_parts.append((starts, lines, source_ids))
        self.stream_tokens += int(tokens.size)
        self.documents += int(lens.size)
        self.pending = np.concatenate((self.pending, tokens)) if self.pending.size else tokens
        while True:
            first = 1 if self.written == 0 else 0  # a shard's first window needs seq_len + 1 tokens
            k = (self.pending.size - first) // self.S if self.pending.size > first else 0
            k = min(k, self.per_shard - self.windows)
            if k <= 0:
                break
            n = k * self.S + first
            self._write(self.pending[:n])
            self.windows += k
            last = self.pending[n - 1: n]
            self.pending = self.pending[n:]
            if self.windows == self.per_shard:
                self._close()
                self.pending = np.concatenate((last, self.pending))  # next shard starts on the shared token

    def _write(self, block: np.ndarray) -> None:
        if self.out is None:
            self.out = AtomicFile(self.root / self.split / f"{self._name()}.bin")
            self.hasher = hashlib.sha256()
        data = np.ascontiguousarray(block, dtype=self.dtype.newbyteorder("<")).tobytes()
        self.out.write(data)
        self.hasher.update(data)
        self.written += int(block.size)

    def _name(self) -> str:
        return f"shard-{len(self.entries):05d}"

    def _close(self) -> None:
        name, end = self._name(), self.base + self.written  # this shard covers s[base:end]
        if self.doc_parts:
            starts, lines, srcs = (np.concatenate(c) for c in zip(*self.doc_parts))
        else:
            starts = lines = srcs = np.empty(0, np.int64)
        inside = (starts >= self.base) & (starts < end)
        rows = [np.stack([starts[inside] - self.base, lines[inside], srcs[inside], np.ones(int(inside.sum()), np.int64)], 1)]
        if not (inside.any() and starts[inside][0] == self.base):
            rows.insert(0, np.array([[0, self.head[0], self.head[1], 0]], dtype=np.int64))
        index = np.concatenate(rows).astype(np.int64)
        buf = io.BytesIO()
        np.save(buf, index, allow_pickle=False)
        index_path = self.root / self.split / f"{name}{INDEX_SUFFIX}"
        atomic_write_bytes(index_path, buf.getvalue())
        self.out.commit()
        self.entries.append({
            "split": self.split,
            "path": f"{self.split}/{name}.bin",
            "index": f"{self.split}/{name}{INDEX_SUFFIX}",
            "tokens": self.written,
            "sequences": self.windows,
            "documents": int(inside.sum()),
            "sha256": self.hasher.hexdigest(),
            "index_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        })
        # The next shard starts on this shard's last token; remember the document running there.
        next_base = end - 1
        covering = starts <= next_base
        if covering.any():
            j = int(np.flatnonzero(covering)[-1])
            self.head = (int(lines[j]), int(srcs[j]))
        keep = starts >= next_base
        self.doc_parts = [(starts[keep], lines[keep], srcs[keep])] if keep.any() else []
        self.base, self.written, self.windows, self.out = next_base, 0, 0, None

    def finish(self) -> dict:
        """Close the last shard (if it holds a window), drop the tail, return this split's counts."""
        if self.windows:
            self._close()
        self.abort()  # a shard file without a window (only possible as a leftover) is removed
        sequences = sum(e["sequences"] for e in self.entries)
        covered = sequences * self.S + 1 if sequences else 0
        return {"documents": self.documents, "tokens": self.stream_tokens, "sequences": sequences,
                "tail_tokens_dropped": self.stream_tokens - covered, "shards": len(self.entries)}

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()
            self.out = None


def _clear_outputs(out_dir: Path) -> None:
    """Remove what a previous build left (manifest first, so a half-rebuilt set never looks complete)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out_dir / split).glob("shard-*") if (out_dir / split).is_dir() else ():
            old.unlink()
        for old in (out_dir / split).glob(".shard-*.tmp") if (out_dir / split).is_dir() else ():
            old.unlink()
    shutil.rmtree(out_dir / "wds", ignore_errors=True)


class ShardWriter:
    """Packs tokenized documents into a shard directory; the manifest, written last, completes it.

    Usage::

        with ShardWriter(out_dir, "uint16", seq_len=2048, shard_tokens=10**8) as writer:
            for chunk in chunks:                   # TokenizedChunk, in corpus order
                writer.add(chunk)
            manifest = writer.finish(header)       # last shards, report.json, then manifest.json

    Opening removes what an earlier build left in ``out_dir`` (its manifest first). An exception inside
    the ``with`` block removes everything this writer wrote, so no manifest and no shard remain.

    Args:
        out_dir: the shard directory (created).
        dtype: ``"uint16"`` or ``"uint32"`` (:func:`~korcpt.shards.format.choose_dtype`).
        seq_len: tokens per training sequence.
        shard_tokens: target tokens per shard file (whole windows, at least one).
    """

    def __init__(self, out_dir: Path, dtype: str, seq_len: int, shard_tokens: int):
        self.out_dir, self.dtype, self.seq_len = Path(out_dir), dtype, seq_len
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _clear_outputs(self.out_dir)
        per_shard = max(1, shard_tokens // seq_len)
        self._splits = {s: _SplitWriter(self.out_dir, s, DTYPES[dtype], seq_len, per_shard) for s in SPLITS}
        self._source_ids: dict[str, int] = {}
        self._per_source: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
        self._skipped = 0
        self._finished = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, chunk: TokenizedChunk) -> None:
        """Append a chunk's documents to their splits' streams, writing every shard that fills."""
        self._skipped += chunk.skipped
        for split, docs in chunk.splits.items():
            ids = np.fromiter((self._source_ids.setdefault(s, len(self._source_ids)) for s in docs.sources),
                              np.int64, len(docs.sources))
            self._splits[split].add(docs.tokens, docs.lengths, docs.lines, ids)
            stats = self._per_source[split]
            for s, n in zip(docs.sources, docs.lengths.tolist()):
                entry = stats.setdefault(s, {"documents": 0, "tokens": 0})
                entry["documents"] += 1
                entry["tokens"] += n

    def finish(self, header: dict, webdataset: bool = False, corpus_report: dict | None = None) -> dict:
        """Close the last shards; write the webdataset tars (if asked), ``report.json``, then ``manifest.json``.

        Args:
            header: the manifest's ``tokenizer``, ``bos_id``, ``eos_id``, ``split`` and ``corpus`` entries.
            webdataset: also write the windows as tar shards under ``DIR/wds/``.
            corpus_report: the corpus stage's report, merged into ``report.json``.

        Returns:
            The manifest, as written.

        Raises:
            DataError: the train split holds fewer tokens than one window.
        """
        counts = {s: w.finish() for s, w in self._splits.items()}
        if counts["train"]["sequences"] == 0:
            raise DataError(
                f"{header['corpus']['path']}: the train split has {counts['train']['tokens']} tokens, fewer than one "
                f"window of seq_len + 1 = {self.seq_len + 1}; add text or lower --seq-len"
            )
        if counts["val"]["documents"] and not counts["val"]["sequences"]:
            log.warning("validation split: %d tokens make no window of %d; it is empty",
                        counts["val"]["tokens"], self.seq_len + 1)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "tokenizer": header["tokenizer"], "dtype": self.dtype,
            "seq_len": self.seq_len, "bos_id": header["bos_id"], "eos_id": header["eos_id"], "packing": PACKING,
            "sources": sorted(self._source_ids, key=self._source_ids.get),
            "split": header["split"], "corpus": header["corpus"],
            "counts": {**counts, "skipped_documents": self._skipped},
            "shards": self._splits["train"].entries + self._splits["val"].entries,
        }
        atomic_write_json(self.out_dir / REPORT, _report(manifest, self._per_source, corpus_report))
        if webdataset:
            manifest = add_webdataset(self.out_dir, manifest)
        else:
            atomic_write_json(self.out_dir / MANIFEST, manifest)
        self._finished = True
        return manifest

    def abort(self) -> None:
        """Remove the partial shard being written and every shard of this build (a no-op once finished)."""
        if self._finished:
            return
        for split in self._splits.values():
            split.abort()
        _clear_outputs(self.out_dir)


def add_webdataset(directory: Path, manifest: dict) -> dict:
    """Export a shard directory's windows as webdataset tars and list them in its manifest, rewritten
    last (atomically): the one export step of ``build_shards --format webdataset``, tools/export_wds.py
    and the tests.

    Args:
        directory: the shard directory (its token shards already on disk).
        manifest: its manifest.

    Returns:
        The manifest as written, with ``"webdataset"`` entries (see :func:`~korcpt.shards.wds.export_webdataset`).
    """
    from korcpt.shards.wds import export_webdataset

    manifest = {**manifest, "webdataset": export_webdataset(Path(directory), manifest)}
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def write_shards(corpus_path: Path, out_dir: Path, options: ShardOptions, corpus_report: dict | None = None) -> dict:
    """Tokenize a documents JSONL corpus and write packed shards, report and manifest.

    Args:
        corpus_path: the mixed corpus, one JSON object per line with a string ``text`` (and optionally
            ``source``, used for per-source statistics and per-token source ids).
        out_dir: the shard directory (created); previous shards and manifest in it are replaced.
        options: see :class:`ShardOptions`.
        corpus_report: the corpus stage's report, merged into ``report.json`` (default: the one the corpus
            stage left in ``out_dir``, when the corpus lies there).

    Returns:
        The manifest, as written to ``out_dir/manifest.json``.

    Raises:
        DataError: a missing corpus or validation file, a line that is not a ``{"text"}`` object, or a
            train split without a single window.
        ConfigError: impossible options. ModelError: the tokenizer cannot be loaded or lacks ``<eos>``.
    """
    options.validate()
    corpus = LineChunks(_existing(corpus_path, "corpus"))
    val = LineChunks(_existing(options.val_documents, "validation documents")) if options.val_documents else None
    tokenizer = load_pack_tokenizer(options.tokenizer)
    encoder = Encoder(tokenizer, options.seed, options.val_fraction, options.workers)
    out_dir = Path(out_dir)
    if corpus_report is None and corpus.path.parent.resolve() == out_dir.resolve():
        corpus_report = _previous_corpus_report(out_dir / REPORT)  # the corpus stage ran into this directory
    started = time.perf_counter()
    with ShardWriter(out_dir, tokenizer.dtype, options.seq_len, options.shard_tokens) as writer:
        if val is None:
            encoder.encode(corpus, writer.add)
        else:
            # The validation set goes first; a corpus document equal to one of its documents stays out of train.
            encoder.encode(val, writer.add, split="val")
            encoder.encode(corpus, writer.add, split="train", exclude=_val_hashes(val.path, options.seed))
        manifest = writer.finish(_header(tokenizer, encoder.fingerprint(), options, corpus),
                                 options.webdataset, corpus_report)
    _log_summary(manifest, time.perf_counter() - started)
    return manifest


def _existing(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    return path


def _val_hashes(path: Path, seed: int) -> frozenset[bytes]:
    """Hashes of the validation documents, as cleaned and as given (``raw``)."""
    return frozenset(doc_hash(t.encode("utf-8", "surrogatepass"), seed)
                     for doc in read_documents(path) for t in (doc.text, doc.raw) if t is not None)


def _header(tokenizer: PackTokenizer, fingerprint: str, options: ShardOptions, corpus: LineChunks) -> dict:
    """The manifest entries that describe what was packed (read once the corpus has been hashed)."""
    split = ({"method": "files", "files": [str(Path(options.val_documents))]} if options.val_documents else
             {"method": "hash", "val_fraction": float(options.val_fraction), "seed": options.seed})
    return {
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "fingerprint": fingerprint},
        "bos_id": tokenizer.bos,
        "eos_id": tokenizer.eos,
        "split": split,
        "corpus": {"path": str(corpus.path), "sha256": corpus.sha256()},
    }


def _log_summary(manifest: dict, elapsed: float) -> None:
    counts = manifest["counts"]
    total = counts["train"]["tokens"] + counts["val"]["tokens"]
    log.info("shards: %d documents, %s tokens (%s train sequences, %s val) in %.1f s (%s tok/s), dtype %s",
             counts["train"]["documents"] + counts["val"]["documents"], f"{total:,}",
             f"{counts['train']['sequences']:,}", f"{counts['val']['sequences']:,}", elapsed,
             f"{total / max(elapsed, 1e-9):,.0f}", manifest["dtype"])


def _previous_corpus_report(path: Path) -> dict | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in report.items() if k != "tokens"} if isinstance(report, dict) else None


def _report(manifest: dict, per_source: dict, corpus_report: dict | None) -> dict:
    """report.json: the corpus report plus train_raw_korean_text.md's 'Dataset Token Analysis' per split and source."""
    def summary(docs: int, tokens: int) -> dict:
        return {"documents": docs, "tokens": tokens, "avg_tokens_per_document": round(tokens / docs, 1) if docs else 0.0}

    splits = {}
    for split in SPLITS:
        c = manifest["counts"][split]
        splits[split] = {**summary(c["documents"], c["tokens"]), "sequences": c["sequences"],
                         "tail_tokens_dropped": c["tail_tokens_dropped"],
                         "by_source": {s: summary(v["documents"], v["tokens"]) for s, v in sorted(per_source[split].items())}}
    by_source: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        for s, v in per_source[split].items():
            e = by_source.setdefault(s, {"documents": 0, "tokens": 0})
            e["documents"] += v["documents"]
            e["tokens"] += v["tokens"]
    docs = sum(v["documents"] for v in by_source.values())
    tokens = sum(v["tokens"] for v in by_source.values())
    token_stats = {
        **summary(docs, tokens),
        "tokens_counted": "each document's tokens plus its <bos> and <eos>",
        "by_source": {s: summary(v["documents"], v["tokens"]) for s, v in sorted(by_source.items())},
        "splits": splits,
        "seq_len": manifest["seq_len"],
        "tokenizer": manifest["tokenizer"]["name"],
    }
    return {**(corpus_report or {}), "tokens": token_stats}



__all__ = ["ShardOptions", "ShardWriter", "write_shards", "doc_hash"]
