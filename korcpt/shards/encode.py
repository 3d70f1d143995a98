"""Documents -> token ids, in worker processes: parse, split train/val by document hash, tokenize.

    LineChunks (1 MiB of JSONL lines) ──> worker: parse, hash-split, encode_batch, <bos> ids <eos>
                                       ──(in file order)──> sink (the ShardWriter's add)

The workers are forked where the platform can (they inherit the tokenizer, nothing is pickled) and
spawned elsewhere (the tokenizer travels as its JSON). At most ``2 * workers`` chunks are in flight, so
memory stays constant in the corpus size, and results are handed on in file order, so the output does
not depend on the number of workers.

Validation split, at document level: a document goes to ``val`` when a keyed hash of its text falls
under ``val_fraction`` (identical texts, such as the 5x medical copies, always land on the same side);
with a forced split, every document goes to that split unless its hash is in ``exclude``.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from korcpt.errors import ModelError
from korcpt.log import progress
from korcpt.shards.documents import LineChunks, parse_document
from korcpt.shards.format import DTYPES, SPLITS, choose_dtype, tokenizer_fingerprint


@dataclass(frozen=True)
class PackTokenizer:
    """A fast tokenizer and what packing needs to know of it."""

    name: str
    hf: Any  # the HuggingFace tokenizer: its vocabulary gives the fingerprint
    backend: Any  # its Rust tokenizers.Tokenizer, which the workers run
    bos: int | None
    eos: int
    vocab_size: int  # ids run 0 .. vocab_size - 1, added tokens included
    dtype: str  # "uint16" or "uint32", see format.choose_dtype


def load_pack_tokenizer(spec: Any) -> PackTokenizer:
    """Resolve a tokenizer for packing: a preset, a directory or hub id, or a loaded fast tokenizer.

    Raises:
        ModelError: it cannot be loaded, has no fast (Rust) backend, or has no ``<eos>``.
    """
    if isinstance(spec, (str, os.PathLike)):
        from korcpt.assets import load_tokenizer

        name, tokenizer = str(spec), load_tokenizer(str(spec))
    else:
        name, tokenizer = getattr(spec, "name_or_path", type(spec).__name__), spec
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {name!r} has no fast (Rust) backend; korcpt packs with fast tokenizers only")
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {name!r} has no eos token; documents need one as their separator")
    vocab_size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    return PackTokenizer(name, tokenizer, backend, tokenizer.bos_token_id, tokenizer.eos_token_id, vocab_size,
                         choose_dtype(vocab_size))


@dataclass
class SplitDocs:
    """One split's documents of a chunk, tokenized, in file order."""

    tokens: np.ndarray  # every document as <bos> ids <eos>, concatenated
    lengths: np.ndarray  # tokens per document, <bos> and <eos> included (int64)
    lines: np.ndarray  # 1-based line of each document in its file (int64)
    sources: list[str]  # source of each document


@dataclass
class TokenizedChunk:
    """What a worker returns for one chunk of lines."""

    skipped: int  # empty documents, and documents kept out of train (``exclude``)
    splits: dict[str, SplitDocs]  # by split name


def doc_hash(text: bytes, seed: int) -> bytes:
    """16-byte keyed BLAKE2b of a document's UTF-8 text: equal texts hash equal, whatever their position."""
    return hashlib.blake2b(text, digest_size=16, key=str(seed).encode()).digest()


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


def _encode_chunk(first_line: int, lines: list[bytes]) -> TokenizedChunk:
    """Parse, split and tokenize one chunk of JSONL lines."""
    w = _W
    texts: list[str] = []
    where: list[int] = []  # index into SPLITS
    line_no: list[int] = []
    sources: list[str] = []
    skipped = 0
    threshold, exclude, forced, seed = w["val_threshold"], w["exclude"], w["forced_split"], w["seed"]
    for k, raw in enumerate(lines):
        if not raw.strip():
            continue
        doc = parse_document(raw, w["path"], first_line + k)
        if not doc.text.strip():
            skipped += 1
            continue
        digest = doc_hash(doc.text.encode("utf-8", "surrogatepass"), seed)
        if forced is not None:
            if digest in exclude:
                skipped += 1
                continue
            split = forced
        else:
            split = 1 if int.from_bytes(digest[:8], "little") < threshold else 0
        texts.append(doc.text)
        where.append(split)
        line_no.append(first_line + k)
        sources.append(doc.source or w["default_source"])
    encodings = w["tok"].encode_batch_fast(texts, add_special_tokens=False) if texts else []
    splits = {}
    for split_id, split in enumerate(SPLITS):
        picks = [i for i, s in enumerate(where) if s == split_id]
        tokens, lens = _with_separators([encodings[i].ids for i in picks])
        splits[split] = SplitDocs(tokens, lens, np.asarray([line_no[i] for i in picks], dtype=np.int64),
                                  [sources[i] for i in picks])
    return TokenizedChunk(skipped, splits)


def _with_separators(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids as one array of ``<bos> ids <eos>`` each (no <bos> without one), and their lengths."""
    bos, eos = _W["bos"], _W["eos"]
    extra = (bos is not None) + 1
    lens = np.fromiter((len(d) + extra for d in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lens.sum()), dtype=_W["dtype"])
    pos = 0
    for d, n in zip(ids, lens.tolist()):
        if bos is not None:
            tokens[pos] = bos
        tokens[pos + extra - 1: pos + n - 1] = d
        tokens[pos + n - 1] = eos
        pos += n
    if tokens.size and int(tokens.max()) > _W["max_id"]:
        raise ModelError(f"tokenizer produced id {int(tokens.max())}, above its vocabulary ({_W['max_id']})")
    return tokens, lens


# ---------------------------------------------------------------- main side


class Encoder:
    """Tokenizes documents files through ``workers`` processes (1: in this process), results in file order.

    Args:
        tokenizer: see :func:`load_pack_tokenizer`.
        seed: key of the document hash that splits train from val.
        val_fraction: share of documents whose hash sends them to val (when no split is forced).
        workers: processes (0: all cores; 1: this process, where the tokenizer's own threads parallelise).
    """

    def __init__(self, tokenizer: PackTokenizer, seed: int, val_fraction: float, workers: int):
        self.tokenizer = tokenizer
        self.workers = workers or os.cpu_count() or 1
        self._settings = {
            "bos": tokenizer.bos, "eos": tokenizer.eos, "dtype": DTYPES[tokenizer.dtype],
            "max_id": tokenizer.vocab_size - 1, "seed": seed, "val_threshold": int(float(val_fraction) * 2**64),
            "default_source": "unknown",
        }
        # The fingerprint reads the whole vocabulary (a second or two for Gemma's): a forked worker
        # computes it alongside the tokenization; otherwise this process does when asked.
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """The tokenizer's :func:`~korcpt.shards.format.tokenizer_fingerprint`."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer.hf)
        return self._fingerprint

    def encode(self, chunks: LineChunks, sink: Callable[[TokenizedChunk], None], split: str | None = None,
               exclude: frozenset[bytes] = frozenset()) -> None:
        """Tokenize every chunk of ``chunks`` and hand the results to ``sink``, in file order.

        Args:
            chunks: the documents file, in chunks of lines.
            sink: called once per chunk, in order (in this process).
            split: send every document to this split instead of splitting by hash.
            exclude: with ``split``, :func:`doc_hash` values of documents to leave out (counted as skipped).

        Raises:
            DataError: a line that is not a ``{"text"}`` object, naming file and line.
        """
        settings = {**self._settings, "forced_split": None if split is None else SPLITS.index(split),
                    "exclude": exclude, "path": str(chunks.path)}
        bar = progress(total=chunks.size(), unit="B", unit_scale=True, desc=f"tokenize {chunks.path.name}")
        started, tokens_done = time.perf_counter(), 0

        def done(chunk: TokenizedChunk, nbytes: int) -> None:
            nonlocal tokens_done
            sink(chunk)
            tokens_done += sum(int(docs.tokens.size) for docs in chunk.splits.values())
            bar.update(nbytes)
            bar.set_postfix_str(f"{tokens_done / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False)

        try:
            if self.workers == 1:
                self._encode_here(settings, chunks, done)
            else:
                self._encode_in_pool(settings, chunks, done)
        finally:
            bar.close()
            _W.clear()

    def _encode_here(self, settings: dict, chunks: LineChunks, done: Callable) -> None:
        backend = self.tokenizer.backend
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True  # "<eos>" written in a document is text
        _W.clear()
        _W.update(settings, tok=backend)
        try:
            for first, lines, nbytes in chunks:
                done(_encode_chunk(first, lines), nbytes)
        finally:
            backend.encode_special_tokens = saved

    def _encode_in_pool(self, settings: dict, chunks: LineChunks, done: Callable) -> None:
        backend, job = self.tokenizer.backend, None
        if "fork" in mp.get_all_start_methods():
            _W.clear()
            _W.update(settings, tok=backend, hf=self.tokenizer.hf)  # inherited by the forked workers, never pickled
            pool = mp.get_context("fork").Pool(self.workers, _init_forked)
            if self._fingerprint is None:
                job = pool.apply_async(_fingerprint_task)
        else:
            pool = mp.get_context("spawn").Pool(
                self.workers, _init_spawned, ({**settings, "tokenizer_json": backend.to_str()},))
        inflight: deque = deque()
        try:
            for first, lines, nbytes in chunks:
                inflight.append((pool.apply_async(_encode_chunk, (first, lines)), nbytes))
                if len(inflight) > 2 * self.workers:  # bounded: memory stays constant in the corpus size
                    res, n = inflight.popleft()
                    done(res.get(), n)
            while inflight:
                res, n = inflight.popleft()
                done(res.get(), n)
            if job is not None:
                self._fingerprint = job.get()
        except Exception:
            # A bad line (DataError from a worker): let the few tasks in flight finish, then shut down
            # the ordinary way; Pool.terminate() can hang while workers sit on its queue.
            for res in [r for r, _ in inflight] + ([job] if job is not None else []):
                res.wait()
            raise
        except BaseException:
            pool.terminate()  # interrupted: the workers may be gone, do not wait for them
            raise
        finally:
            pool.close()
            pool.join()
