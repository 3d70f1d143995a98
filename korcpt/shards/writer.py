"""Documents -> packed token shards: tokenize in parallel, split train/val by document, pack, write.

Mental model::

    corpus JSONL ──(1 MiB chunks of lines)──> worker processes: parse, hash-split, tokenize, add <bos>/<eos>
                 ──(in corpus order)──> one packer per split ──> DIR/{train,val}/shard-NNNNN.bin + .idx.npy
                 ──> [webdataset tars] ──> report.json ──> manifest.json (last)

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
on the same side), or, with ``val_korean`` files, those files are the validation set and any corpus
document with the same text as one of them is left out of ``train``.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from korcpt.errors import ConfigError, DataError, ModelError
from korcpt.log import get_logger, progress
from korcpt.shards.format import (
    DTYPES,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    REPORT,
    SPLITS,
    atomic_write_bytes,
    atomic_write_json,
    choose_dtype,
    tokenizer_fingerprint,
)

log = get_logger(__name__)

CHUNK_BYTES = 1 << 20  # lines handed to a worker at a time


@dataclass
class ShardOptions:
    """How to turn a corpus into shards (the shard flags of ``tools/build_shards.py``)."""

    # Tokenizer: a preset (gemma3-270m, tiny-ko), a local directory, a hub id, or a loaded fast tokenizer.
    tokenizer: Any
    # Tokens per training sequence; windows hold seq_len + 1 tokens.
    seq_len: int = 2048
    # Share of documents held out for validation (by a hash of their text); ignored with val_korean.
    val_fraction: float = 0.01
    # Explicit validation files, in the formats of --korean (read and cleaned by korcpt.corpus.readers).
    val_korean: list[Path] = field(default_factory=list)
    # Target tokens per shard file (rounded down to whole windows, at least one window).
    shard_tokens: int = 100_000_000
    # Seed of the validation hash.
    seed: int = 42
    # Tokenizer processes (0: all cores; 1: tokenize in this process).
    workers: int = 0
    # Also write the windows as webdataset tar shards under DIR/wds/.
    webdataset: bool = False

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


# ---------------------------------------------------------------- worker side (runs in each process)

_W: dict[str, Any] = {}  # this process's tokenizer and settings (set by _init_* before any chunk)


def _init_forked() -> None:
    """In a forked worker: the parent's tokenizer and settings are already in ``_W`` (copied by fork)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _W["tok"].encode_special_tokens = True  # this process's copy: "<eos>" written in a document is text


def _init_spawned(state: dict) -> None:
    """In a spawned worker (no fork on this platform): rebuild the tokenizer from its JSON."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(state.pop("tokenizer_json"))
    tok.encode_special_tokens = True
    _W.clear()
    _W.update(state, tok=tok)


def _fingerprint_task() -> str:
    return tokenizer_fingerprint(_W["hf"])


def doc_hash(text: bytes, seed: int) -> bytes:
    """16-byte keyed BLAKE2b of a document's UTF-8 text: equal texts hash equal, whatever their position."""
    return hashlib.blake2b(text, digest_size=16, key=str(seed).encode()).digest()


def _encode_chunk(first_line: int, lines: list[bytes]) -> dict:
    """Parse, split and tokenize one chunk of JSONL lines; returns packed arrays per split."""
    w = _W
    texts: list[str] = []
    where: list[int] = []  # 0 train, 1 val
    line_no: list[int] = []
    sources: list[str] = []
    skipped = 0
    threshold = w["val_threshold"]
    exclude = w["exclude"]
    for k, raw in enumerate(lines):
        if not raw.strip():
            continue
        lineno = first_line + k
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply for the decoder
            raise DataError(f"{w['path']}:{lineno}: not valid JSON ({exc})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{w['path']}:{lineno}: expected an object with a string \"text\", found {raw[:80]!r}")
        if not text.strip():
            skipped += 1
            continue
        digest = doc_hash(text.encode("utf-8", "surrogatepass"), w["seed"])
        if w["forced_split"] is not None:
            if digest in exclude:
                skipped += 1
                continue
            split = w["forced_split"]
        else:
            split = 1 if int.from_bytes(digest[:8], "little") < threshold else 0
        source = obj.get("source") or w["default_source"]
        texts.append(text)
        where.append(split)
        line_no.append(lineno)
        sources.append(str(source))
    encodings = w["tok"].encode_batch_fast(texts, add_special_tokens=False) if texts else []
    bos, eos = w["bos"], w["eos"]
    extra = (bos is not None) + 1
    out = {"skipped": skipped, "lines": len(lines)}
    for split_id, split in enumerate(SPLITS):
        picks = [i for i, s in enumerate(where) if s == split_id]
        lens = np.fromiter((len(encodings[i].ids) + extra for i in picks), dtype=np.int64, count=len(picks))
        tokens = np.empty(int(lens.sum()), dtype=w["dtype"])
        pos = 0
        for i, n in zip(picks, lens.tolist()):
            if bos is not None:
                tokens[pos] = bos
            tokens[pos + extra - 1: pos + n - 1] = encodings[i].ids
            tokens[pos + n - 1] = eos
            pos += n
        if tokens.size and int(tokens.max()) > w["max_id"]:
            raise ModelError(f"tokenizer produced id {int(tokens.max())}, above its vocabulary ({w['max_id']})")
        out[split] = (tokens, lens, np.asarray([line_no[i] for i in picks], dtype=np.int64),
                      [sources[i] for i in picks])
    return out


# ---------------------------------------------------------------- main side


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
        self.fh = None
        self.tmp: Path | None = None
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
        if self.fh is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{self._name()}.", suffix=".tmp", dir=self.root / self.split)
            self.fh, self.tmp = os.fdopen(fd, "wb"), Path(tmp)
            self.hasher = hashlib.sha256()
        data = np.ascontiguousarray(block, dtype=self.dtype.newbyteorder("<")).tobytes()
        self.fh.write(data)
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
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        final = self.root / self.split / f"{name}.bin"
        os.replace(self.tmp, final)
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
        self.base, self.written, self.windows, self.fh, self.tmp = next_base, 0, 0, None, None

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
        if self.fh is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.fh = self.tmp = None


def _read_val_documents(paths: list[Path]) -> Iterator[tuple[str, str, str]]:
    """(text, source, raw text) of explicit validation files, read and cleaned as ``--korean`` input is.

    The corpus stage's readers decide the format (JSON array, JSONL, ``.txt`` = one document, a
    ``save_to_disk`` directory); a ``{"text"}`` record is cleaned of wiki markup, a ``.txt`` document
    normalised. No length or Hangul filter applies: the user chose these documents.
    """
    from korcpt.corpus.readers import Rejected, expand_inputs, iter_records
    from korcpt.corpus.text import normalize_text
    from korcpt.corpus.wiki import clean_wiki, is_redirect

    for path in expand_inputs([Path(p) for p in paths]):
        for rec in iter_records(path):
            if isinstance(rec, Rejected):
                raise DataError(f"{rec.where}: validation record rejected ({rec.reason}: {rec.detail})")
            if rec.is_text:
                yield normalize_text(rec.value), "val_korean", rec.value
                continue
            raw = rec.value.get("text") if isinstance(rec.value, dict) else rec.value
            if not isinstance(raw, str):
                raise DataError(f"{rec.where}: expected a string or an object with a string \"text\"")
            if is_redirect(raw):
                continue
            source = rec.value.get("source") if isinstance(rec.value, dict) else None
            yield clean_wiki(raw), str(source or "val_korean"), raw


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, list[bytes], int]]:
    """(first line number, lines, bytes) of consecutive chunks of a file, line numbers 1-based."""
    lines: list[bytes] = []
    size, first, lineno = 0, 1, 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            lines.append(line)
            size += len(line)
            if size >= chunk_bytes:
                yield first, lines, size
                lines, size, first = [], 0, lineno + 1
    if lines:
        yield first, lines, size


def _list_chunks(lines: list[bytes], chunk_bytes: int) -> Iterator[tuple[int, list[bytes], int]]:
    """The same chunks as :func:`_line_chunks`, from lines in memory (numbered from 1)."""
    start, size = 0, 0
    for i, line in enumerate(lines):
        size += len(line)
        if size >= chunk_bytes or i == len(lines) - 1:
            yield start + 1, lines[start: i + 1], size
            start, size = i + 1, 0


def _load(tokenizer: Any):
    if isinstance(tokenizer, (str, os.PathLike)):
        from korcpt.assets import load_tokenizer

        return str(tokenizer), load_tokenizer(str(tokenizer))
    return getattr(tokenizer, "name_or_path", type(tokenizer).__name__), tokenizer


def _clear_outputs(out_dir: Path) -> None:
    """Remove what a previous build left (manifest first, so a half-rebuilt set never looks complete)."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for old in (out_dir / split).glob("shard-*") if (out_dir / split).is_dir() else ():
            old.unlink()
        for old in (out_dir / split).glob(".shard-*.tmp") if (out_dir / split).is_dir() else ():
            old.unlink()
    shutil.rmtree(out_dir / "wds", ignore_errors=True)


def write_shards(corpus_path: Path, out_dir: Path, options: ShardOptions, corpus_report: dict | None = None) -> dict:
    """Tokenize a ``{"text", "source"?}`` JSONL corpus and write packed shards, report and manifest.

    Args:
        corpus_path: the mixed corpus, one JSON object per line with a string ``text`` (and optionally
            ``source``, used for per-source statistics and per-token source ids).
        out_dir: the shard directory (created); previous shards and manifest in it are replaced.
        options: see :class:`ShardOptions`.
        corpus_report: the corpus stage's report, merged into ``report.json``.

    Returns:
        The manifest, as written to ``out_dir/manifest.json``.

    Raises:
        DataError: unreadable corpus or validation files, a line that is not a ``{"text"}`` object, or a
            split left without a single window.
        ConfigError: impossible options. ModelError: the tokenizer cannot be loaded or lacks ``<eos>``.
    """
    options.validate()
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    if not corpus_path.is_file():
        raise DataError(f"corpus {corpus_path} not found")
    name, tokenizer = _load(options.tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {name!r} has no fast (Rust) backend; korcpt packs with fast tokenizers only")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        raise ModelError(f"tokenizer {name!r} has no eos token; documents need one as their separator")
    vocab_size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    dtype = choose_dtype(vocab_size)
    seq_len = options.seq_len
    per_shard = max(1, options.shard_tokens // seq_len)
    workers = options.workers or os.cpu_count() or 1
    t0 = time.perf_counter()

    # The fingerprint reads the whole vocabulary (a second or two for Gemma's): a forked worker computes
    # it alongside the tokenization; otherwise this process does at the end.
    fingerprint: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    writers = {s: _SplitWriter(out_dir, s, DTYPES[dtype], seq_len, per_shard) for s in SPLITS}
    source_ids: dict[str, int] = {}
    per_source: dict[str, dict[str, dict[str, int]]] = {s: {} for s in SPLITS}
    skipped = 0
    state = {
        "bos": bos, "eos": eos, "dtype": DTYPES[dtype], "max_id": vocab_size - 1,
        "seed": options.seed, "val_threshold": int(float(options.val_fraction) * 2**64),
        "exclude": frozenset(), "forced_split": None, "path": str(corpus_path), "default_source": "unknown",
    }

    def consume(result: dict) -> None:
        nonlocal skipped
        skipped += result["skipped"]
        for split in SPLITS:
            tokens, lens, lines, sources = result[split]
            ids = np.fromiter((source_ids.setdefault(s, len(source_ids)) for s in sources), np.int64, len(sources))
            writers[split].add(tokens, lens, lines, ids)
            stats = per_source[split]
            for s, n in zip(sources, lens.tolist()):
                entry = stats.setdefault(s, {"documents": 0, "tokens": 0})
                entry["documents"] += 1
                entry["tokens"] += n

    def run(path: Path, chunks: Iterator[tuple[int, list[bytes], int]], total: int, **overrides) -> str:
        """Tokenize all chunks in order through ``workers`` processes; returns the SHA-256 of the input."""
        run_state = {**state, **overrides, "path": str(path)}
        digest = hashlib.sha256()
        bar = progress(total=total, unit="B", unit_scale=True, desc=f"tokenize {path.name}")
        tokens_done = 0
        started = time.perf_counter()

        def done(result: dict, nbytes: int) -> None:
            nonlocal tokens_done
            consume(result)
            tokens_done += sum(int(result[s][0].size) for s in SPLITS)
            bar.update(nbytes)
            bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False)

        try:
            if workers == 1:
                # In this process: the tokenizer's own threads parallelise encode_batch.
                saved = backend.encode_special_tokens
                backend.encode_special_tokens = True
                _W.clear()
                _W.update(run_state, tok=backend)
                try:
                    for first, lines, nbytes in chunks:
                        for line in lines:
                            digest.update(line)
                        done(_encode_chunk(first, lines), nbytes)
                finally:
                    backend.encode_special_tokens = saved
                    _W.clear()
            else:
                if "fork" in mp.get_all_start_methods():
                    _W.clear()
                    _W.update(run_state, tok=backend, hf=tokenizer)  # inherited by the forked workers, never pickled
                    pool = mp.get_context("fork").Pool(workers, _init_forked)
                    job = None if fingerprint else pool.apply_async(_fingerprint_task)
                else:
                    pool = mp.get_context("spawn").Pool(
                        workers, _init_spawned, ({**run_state, "tokenizer_json": backend.to_str()},))
                    job = None
                inflight: deque = deque()
                try:
                    for first, lines, nbytes in chunks:
                        for line in lines:
                            digest.update(line)
                        inflight.append((pool.apply_async(_encode_chunk, (first, lines)), nbytes))
                        if len(inflight) > 2 * workers:  # bounded: memory stays constant in the corpus size
                            res, n = inflight.popleft()
                            done(res.get(), n)
                    while inflight:
                        res, n = inflight.popleft()
                        done(res.get(), n)
                    if job is not None:
                        fingerprint.append(job.get())
                except Exception:
                    # A bad line (DataError from a worker): let the few tasks in flight finish, then shut
                    # down the ordinary way; Pool.terminate() can hang while workers sit on its queue.
                    for res in [r for r, _ in inflight] + ([job] if job is not None else []):
                        res.wait()
                    raise
                except BaseException:
                    pool.terminate()  # interrupted: the workers may be gone, do not wait for them
                    raise
                finally:
                    pool.close()
                    pool.join()
        finally:
            bar.close()
            _W.clear()
        return digest.hexdigest()

    try:
        val_files: list[str] = []
        if options.val_korean:
            # The explicit validation set goes first: its hashes are then kept out of train.
            records = list(_read_val_documents(options.val_korean))
            val_files = sorted({str(Path(p)) for p in options.val_korean})
            # A corpus document equal to a validation document, cleaned or as given, stays out of train.
            exclude = frozenset(doc_hash(t.encode("utf-8", "surrogatepass"), options.seed)
                                for rec in records for t in (rec[0], rec[2]))
            lines = [json.dumps({"text": t, "source": s}, ensure_ascii=False).encode() + b"\n" for t, s, _ in records]
            run(Path(options.val_korean[0]), _list_chunks(lines, CHUNK_BYTES), sum(map(len, lines)), forced_split=1)
            corpus_sha = run(corpus_path, _line_chunks(corpus_path, CHUNK_BYTES), corpus_path.stat().st_size,
                             forced_split=0, exclude=exclude)
        else:
            corpus_sha = run(corpus_path, _line_chunks(corpus_path, CHUNK_BYTES), corpus_path.stat().st_size)
        counts = {s: writers[s].finish() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if counts["train"]["sequences"] == 0:
        raise DataError(
            f"{corpus_path}: the train split has {counts['train']['tokens']} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; add text or lower --seq-len"
        )
    if counts["val"]["documents"] and not counts["val"]["sequences"]:
        log.warning("validation split: %d tokens make no window of %d; it is empty", counts["val"]["tokens"], seq_len + 1)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": name, "vocab_size": vocab_size, "fingerprint": fingerprint[0] if fingerprint else tokenizer_fingerprint(tokenizer)},
        "dtype": dtype,
        "seq_len": seq_len,
        "bos_id": bos,
        "eos_id": eos,
        "packing": "each document is <bos> tokens <eos>; windows of seq_len+1 tokens overlap by one token; "
                   "the tail that completes no window is dropped",
        "sources": sorted(source_ids, key=source_ids.get),
        "split": {"method": "files", "files": val_files} if options.val_korean else
                 {"method": "hash", "val_fraction": float(options.val_fraction), "seed": options.seed},
        "corpus": {"path": str(corpus_path), "sha256": corpus_sha},
        "counts": {**counts, "skipped_documents": skipped},
        "shards": writers["train"].entries + writers["val"].entries,
    }
    if options.webdataset:
        from korcpt.shards.wds import export_webdataset

        manifest["webdataset"] = export_webdataset(out_dir, manifest)
    if corpus_report is None and corpus_path.parent.resolve() == out_dir.resolve():
        corpus_report = _previous_corpus_report(out_dir / REPORT)  # the corpus stage ran into this directory
    atomic_write_json(out_dir / REPORT, _report(manifest, per_source, corpus_report))
    atomic_write_json(out_dir / MANIFEST, manifest)
    elapsed = time.perf_counter() - t0
    total = counts["train"]["tokens"] + counts["val"]["tokens"]
    log.info("shards: %d documents, %s tokens (%s train sequences, %s val) in %.1f s (%s tok/s), dtype %s",
             counts["train"]["documents"] + counts["val"]["documents"], f"{total:,}",
             f"{counts['train']['sequences']:,}", f"{counts['val']['sequences']:,}", elapsed,
             f"{total / max(elapsed, 1e-9):,.0f}", dtype)
    return manifest


def _previous_corpus_report(path: Path) -> dict | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in report.items() if k != "tokens"} if isinstance(report, dict) else None


def _report(manifest: dict, per_source: dict, corpus_report: dict | None) -> dict:
    """report.json: the corpus report plus the spec's 'Dataset Token Analysis' figures per split and source."""
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


__all__ = ["ShardOptions", "write_shards", "doc_hash"]
