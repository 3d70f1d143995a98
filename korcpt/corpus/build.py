"""The corpus stage: raw sources -> ``raw_text_mixed.jsonl`` + ``report.json`` (+ ``val_documents.jsonl``).

How it runs, and why memory stays flat in the size of the Korean input:

1. Each source is streamed record by record (:mod:`korcpt.corpus.readers`) and converted
   (:mod:`~korcpt.corpus.wiki`, :mod:`~korcpt.corpus.medical`); a Korean record gets the Namu, wiki
   or plain cleaner its input names or its shape shows (:mod:`~korcpt.corpus.textformat`), in a
   process pool when the input is large, a bounded window of batches in flight, results in input
   order (so the output does not depend on the number of workers).
2. Every kept document is written once, already as its final JSON line, to a spool file beside
   the output; memory holds 17 bytes per document (offset, source, an 8-byte hash for the
   duplicate check, which runs once at the end; the first copy is kept; copies are per source),
   at most about 30 at the duplicate check's peak (the hashes' sort order and its buffer). A medical document is spooled
   once and counted ``medical_multiplier`` times.
3. The lines (each document repeated its copies) are permuted with ``numpy.random.default_rng(seed)``;
   ``max_samples`` keeps the first N of that permutation (a uniform random subset, so the source
   mix is kept in expectation). The permutation (4 bytes a line, int32) is the only per-line array:
   it is read a slice at a time, each line found from its position by a binary search over the
   documents' running copy totals, and copied from the spool; the output appears under its name
   only when complete, and ``report.json`` is written last.

The measured peak memory is in bench/README.md, "Scale".

Same inputs and seed give a byte-identical ``raw_text_mixed.jsonl``. Each line is
``{"text": ..., "source": "korean|mcq|medical_dict|char_dict"}``; the shard stage may split
train/validation by a hash of ``text``, which puts identical medical copies on the same side. With
``val_korean``, those files are cleaned first into ``val_documents.jsonl``
(:mod:`~korcpt.corpus.validation`), the validation set the shard stage reads.

Held-out questions (``exclude_mcq``) are matched after collapsing whitespace: an MCQ record is
excluded when its question equals a held-out question; a document of any other source when it
contains a held-out question of at least :data:`MIN_EXCLUDE_CHARS` characters (a shorter question,
like "다음 중 옳은 것은?", would match innocent text).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from korcpt.corpus.medical import RecordError, char_dict_text, medical_dict_text, mcq_text, parse_mcq
from korcpt.corpus.readers import NON_UTF8, REJECT_REASONS, Record, Rejected, expand_inputs, input_bytes, iter_records
from korcpt.corpus.text import DROP_REASONS, DUPLICATE, EXCLUDED, REDIRECT, collapse_spaces, drop_reason
from korcpt.corpus.textformat import AUTO, clean_as, record_format, resolve_inputs, split_format
from korcpt.corpus.validation import VAL_NAME, write_val_documents
from korcpt.errors import DataError
from korcpt.files import AtomicFile, atomic_write_json
from korcpt.log import get_logger, progress

SOURCES = ("korean", "mcq", "medical_dict", "char_dict")
MEDICAL_SOURCES = ("mcq", "medical_dict", "char_dict")
OUTPUT_NAME = "raw_text_mixed.jsonl"
REPORT_NAME = "report.json"
MAX_LISTED_REJECTS = 20
MIN_EXCLUDE_CHARS = 20
_BATCH = 64  # Korean records per task sent to a worker
_CHUNK = 1 << 16  # documents or lines per numpy slice at the end (bounded temporaries)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

log = get_logger(__name__)


@dataclass
class CorpusOptions:
    """Inputs and settings of the corpus stage (the ``corpus`` flags of ``tools/build_shards.py``)."""

    korean: list[Path] = field(default_factory=list)
    """Korean text: JSON array (Namu dump), JSONL, .txt, a directory of those, or a save_to_disk dataset;
    PATH:namu, PATH:wiki or PATH:plain says which cleaner its records get (default: detected per record)."""
    mcq: Path | None = None
    """KorMedMCQA training JSONL (question, A..E, answer 1-based)."""
    medical_dict: Path | None = None
    """Medical dictionary: JSON list or JSONL of {term, definition}."""
    char_dict: Path | None = None
    """Medical symbol dictionary: JSON list of {term, definition}."""
    exclude_mcq: list[Path] = field(default_factory=list)
    """KorMedMCQA files held out for evaluation: their questions are removed from every source."""
    val_korean: list[Path] = field(default_factory=list)
    """Explicit validation text (the formats of korean, PATH:FORMAT too), cleaned into val_documents.jsonl
    for the shard stage."""
    medical_multiplier: int = 5
    """Copies of each kept medical document in the mix."""
    seed: int = 42
    """Seed of the shuffle."""
    max_samples: int = 0
    """Cap on mixed documents (0: all): the first N of the seeded shuffle are kept."""
    min_chars: int = 100
    """Korean documents shorter than this after cleaning are dropped."""
    min_hangul_ratio: float = 0.10
    """Korean documents with a smaller share of Hangul among non-space characters are dropped."""
    strict: bool = False
    """Stop at the first rejected record, naming file and line."""
    workers: int = 0
    """Processes that clean Korean text (0: all cores; 1: in this process)."""
    parallel_min_bytes: int = 8 << 20
    """Korean inputs smaller than this are cleaned in this process (a pool costs more than it saves)."""
    progress: bool = True
    """Show a progress bar while cleaning Korean text."""


def validate_options(opts: CorpusOptions) -> None:
    """Check every option at once.

    Raises:
        DataError: no input at all, or impossible numbers; every problem in one message.
    """
    problems = []
    if not (opts.korean or opts.mcq or opts.medical_dict or opts.char_dict):
        problems.append("no input: give at least one of korean, mcq, medical_dict, char_dict")
    if opts.medical_multiplier < 1:
        problems.append(f"medical_multiplier must be >= 1, found {opts.medical_multiplier}")
    if opts.max_samples < 0:
        problems.append(f"max_samples must be >= 0 (0: all), found {opts.max_samples}")
    if opts.min_chars < 0:
        problems.append(f"min_chars must be >= 0, found {opts.min_chars}")
    if not 0.0 <= opts.min_hangul_ratio <= 1.0:
        problems.append(f"min_hangul_ratio must be in [0, 1], found {opts.min_hangul_ratio}")
    if opts.workers < 0:
        problems.append(f"workers must be >= 0 (0: all cores), found {opts.workers}")
    for spec in [*opts.korean, *opts.val_korean]:
        try:
            split_format(spec)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise DataError("; ".join(problems))


# --------------------------------------------------------------------------- held-out questions


class ExcludeSet:
    """Held-out KorMedMCQA questions and the two ways a document can match them (module docstring)."""

    def __init__(self, questions: Iterable[str]):
        self.questions = frozenset(q for q in (collapse_spaces(q) for q in questions) if q)
        # Every long question is found through its first MIN_EXCLUDE_CHARS characters: one set
        # lookup per position of the document instead of one substring search per question.
        self._by_prefix: dict[str, list[str]] = {}
        for q in sorted(self.questions):
            if len(q) >= MIN_EXCLUDE_CHARS:
                self._by_prefix.setdefault(q[:MIN_EXCLUDE_CHARS], []).append(q)
        self._first_chars = frozenset(p[0] for p in self._by_prefix)

    def __len__(self) -> int:
        return len(self.questions)

    def matches_question(self, question: str) -> bool:
        """True when ``question`` is a held-out question (whitespace-insensitive)."""
        return collapse_spaces(question) in self.questions

    def matches_text(self, text: str) -> bool:
        """True when ``text`` contains a held-out question of at least MIN_EXCLUDE_CHARS characters."""
        if not self._by_prefix:
            return False
        flat = collapse_spaces(text)
        n = MIN_EXCLUDE_CHARS
        for i, ch in enumerate(flat):
            if ch in self._first_chars:
                candidates = self._by_prefix.get(flat[i:i + n])
                if candidates and any(flat.startswith(q, i) for q in candidates):
                    return True
        return False


def load_exclusions(paths: list[Path]) -> ExcludeSet:
    """The questions of the held-out KorMedMCQA files.

    A held-out line without a readable question is an error, not a skip: skipping it could let
    that question leak into training text.

    Raises:
        DataError: a file is missing or empty, or a line has no decodable ``question``.
    """
    questions: list[str] = []
    for path in paths:
        for rec in iter_records(Path(path)):
            if isinstance(rec, Rejected):
                raise DataError(f"{rec.where}: held-out MCQ line unreadable ({rec.reason}: {rec.detail})")
            q = rec.value.get("question") if isinstance(rec.value, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{rec.where}: held-out MCQ line has no 'question'")
            questions.append(q)
    return ExcludeSet(questions)


# --------------------------------------------------------------------------- per-record outcomes

# A converter's outcome for one record: ("kept", where, text) | ("dropped", where, reason) |
# ("rejected", where, reason, detail). Tuples, so that they travel cheaply between processes.
Outcome = tuple


def _korean_outcome(rec: Record, fmt: str, min_chars: int, min_hangul_ratio: float,
                    exclude: ExcludeSet | None) -> Outcome:
    raw = rec.value if rec.is_text else rec.value.get("text") if isinstance(rec.value, dict) else None
    if not isinstance(raw, str):
        return ("rejected", rec.where, "missing_field", "missing or non-string field 'text'")
    text = clean_as(raw, record_format(rec.value, rec.is_text, fmt))
    if text is None:
        return ("dropped", rec.where, REDIRECT)
    reason = drop_reason(text, min_chars, min_hangul_ratio)
    if reason is None and exclude is not None and exclude.matches_text(text):
        reason = EXCLUDED
    return ("dropped", rec.where, reason) if reason else ("kept", rec.where, text)


_worker_args: tuple = ()


def _init_worker(args: tuple) -> None:
    global _worker_args
    _worker_args = args


def _medical_outcome(source: str, rec: Record, exclude: ExcludeSet | None) -> Outcome:
    try:
        if source == "mcq":
            item = parse_mcq(rec.value)
            if exclude is not None and exclude.matches_question(item.question):
                return ("dropped", rec.where, EXCLUDED)
            text = mcq_text(item)
        else:
            text = (medical_dict_text if source == "medical_dict" else char_dict_text)(rec.value)
    except RecordError as exc:
        return ("rejected", rec.where, exc.reason, str(exc))
    if exclude is not None and source != "mcq" and exclude.matches_text(text):
        return ("dropped", rec.where, EXCLUDED)
    return ("kept", rec.where, text)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered_parallel(fn: Callable, batches: Iterable[list], workers: int, initargs: tuple) -> Iterator[Outcome]:
    """``fn`` over batches in a pool, results in input order, at most 4 batches per worker in flight."""
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(initargs,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(fn, (batch,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# --------------------------------------------------------------------------- report


@dataclass
class SourceCounts:
    """What happened to the records of one source; ``read == kept + dropped + rejected`` always."""

    files: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    rejects: list[dict[str, str]] = field(default_factory=list)

    def reject(self, where: str, reason: str, detail: str, strict: bool) -> None:
        """Count a rejected record and list the first few; with ``strict``, stop at it instead."""
        if strict:
            raise DataError(f"{where}: {reason.replace('_', ' ')}: {detail}")
        self.rejected[reason] += 1
        if len(self.rejects) < MAX_LISTED_REJECTS:
            self.rejects.append({"where": where, "reason": reason, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files, "read": self.read, "kept": self.kept,
            "dropped": sum(self.dropped.values()), "dropped_by_reason": self.dropped,
            "rejected": sum(self.rejected.values()), "rejected_by_reason": self.rejected,
            "rejects": self.rejects, "rejects_listed": f"first {MAX_LISTED_REJECTS}",
        }


class _Spool:
    """Kept documents as final JSON lines in one file; in memory 17 bytes each.

    Per document: where its line begins in the file (8 bytes; line k is bytes ``offsets[k]`` to
    ``offsets[k + 1]``, the last offset is the file's end), an 8-byte hash of (source, text) for the duplicate check and the source id
    (1 byte); copies are per source, not per document. Duplicates are found once at the end
    (:meth:`duplicates`) instead of in a Python set while reading, which would cost about 100 bytes per
    document more. Two different documents share an 8-byte hash with probability about n^2 / 2^65
    (1 in 3,000 for 10^8 documents).
    """

    def __init__(self, path: Path, copies: dict[str, int]):
        self.path = path
        self.file = open(path, "wb")
        self.offsets = array("q", [0])
        self.sources = array("b")
        self.hashes = array("Q")
        self.copies = [copies[s] for s in SOURCES]  # lines in the mix per document, by source id

    def add(self, text: str, source: str) -> None:
        line = (json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n").encode("utf-8")
        self.file.write(line)
        self.offsets.append(self.offsets[-1] + len(line))
        self.sources.append(SOURCES.index(source))
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=source.encode()[:16]).digest()
        self.hashes.append(int.from_bytes(key, "little"))

    def duplicates(self) -> np.ndarray:
        """Mask of the documents that repeat an earlier one of the same source (the first is kept).

        Frees the hashes: this is their last use. The stage's peak: 8 bytes a document of
        hashes, 8 of their sort order and up to 4 of the sort's buffer, on top of the 9 kept.
        """
        hashes = np.frombuffer(self.hashes, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in document order: the first is kept
        mask = np.zeros(hashes.size, dtype=bool)
        for lo in range(0, max(hashes.size - 1, 0), _CHUNK):  # neighbours compared a slice at a time
            run = order[lo: lo + _CHUNK + 1]
            same = hashes[run[1:]] == hashes[run[:-1]]
            mask[run[1:][same]] = True
        self.hashes = array("Q")  # its memory goes when this view of it does, on return
        return mask


def _consume(source: str, outcomes: Iterable[Outcome], counts: SourceCounts, spool: _Spool,
             strict: bool, bar=None) -> None:
    for outcome in outcomes:
        counts.read += 1
        if bar is not None:
            bar.update(1)
        kind, where = outcome[0], outcome[1]
        if kind == "rejected":
            counts.reject(where, outcome[2], outcome[3], strict)
        elif kind == "dropped":
            counts.dropped[outcome[2]] += 1
        elif _LONE_SURROGATE.search(outcome[2]):
            # valid JSON can spell a lone surrogate ("\ud800"), which no UTF-8 output can hold
            detail = "text holds a lone surrogate escape (\\ud800-\\udfff), not encodable as UTF-8"
            counts.reject(where, NON_UTF8, detail, strict)
        else:
            counts.kept += 1  # until spool.duplicates() says otherwise
            spool.add(outcome[2], source)


def _records(paths: list[Path]) -> Iterator[Record | Rejected]:
    for path in paths:
        for rec in iter_records(path):
            yield rec


def _korean_records(inputs: list[tuple[Path, str]]) -> Iterator[tuple[Record | Rejected, str]]:
    for path, fmt in inputs:
        for rec in iter_records(path):
            yield rec, fmt


def _rejected_outcome(rec: Rejected) -> Outcome:
    return ("rejected", rec.where, rec.reason, rec.detail)


def _korean_outcomes(inputs: list[tuple[Path, str]], opts: CorpusOptions,
                     exclude: ExcludeSet | None) -> Iterator[Outcome]:
    args = (opts.min_chars, opts.min_hangul_ratio, exclude)
    workers = opts.workers or os.cpu_count() or 1
    if workers > 1 and input_bytes([p for p, _ in inputs]) >= opts.parallel_min_bytes:
        log.info("cleaning Korean text with %d worker processes", workers)
        # Rejected records pass through the pool untouched, so that order is kept.
        batches = _batched(_korean_records(inputs), _BATCH)
        yield from _ordered_parallel(_korean_or_rejected_batch, batches, workers, args)
    else:
        _init_worker(args)
        for rec, fmt in _korean_records(inputs):  # one at a time: a list would hold the whole input
            yield _rejected_outcome(rec) if isinstance(rec, Rejected) else _korean_outcome(rec, fmt, *args)


def _korean_or_rejected_batch(batch: list[tuple[Record | Rejected, str]]) -> list[Outcome]:
    return [_rejected_outcome(r) if isinstance(r, Rejected) else _korean_outcome(r, fmt, *_worker_args)
            for r, fmt in batch]


def distribution(base: dict[str, int], final: dict[str, int], multiplier: int) -> list[dict[str, Any]]:
    """The distribution table of train_raw_korean_text.md: per source base, multiplier, final count, share.

    Args:
        base: kept documents per source (before multiplication).
        final: lines per source in the written output (after multiplication and the cap).
        multiplier: the medical multiplier.

    Returns:
        One row per source and a ``total`` row; ``ratio`` is the share of the output's lines.
    """
    total = sum(final.values())
    rows = []
    for source in SOURCES:
        mult = multiplier if source in MEDICAL_SOURCES else 1
        rows.append({"source": source, "base": base[source], "multiplier": mult,
                     "multiplied": base[source] * mult, "final": final[source],
                     "ratio": round(final[source] / total, 4) if total else 0.0})
    rows.append({"source": "total", "base": sum(base.values()), "multiplier": None,
                 "multiplied": sum(r["multiplied"] for r in rows), "final": total, "ratio": 1.0 if total else 0.0})
    return rows


def build_corpus(opts: CorpusOptions, out_dir: Path) -> dict[str, Any]:
    """Read, clean, convert, filter, multiply and shuffle the raw sources into one corpus.

    Args:
        opts: inputs and settings.
        out_dir: where ``raw_text_mixed.jsonl`` and ``report.json`` are written (created if needed).

    Returns:
        The report, as written to ``report.json``.

    Raises:
        DataError: a missing or empty input, a directory with nothing readable, a broken JSON
            array, a bad held-out file, impossible options, no document left, or (``strict``) the
            first rejected record, named by file and line.
    """
    validate_options(opts)
    # Resolve every input before any work, so that a typo in the last path fails at once.
    korean = resolve_inputs(list(opts.korean))
    inputs: dict[str, list[Path]] = {
        "korean": [p for p, _ in korean],
        "mcq": expand_inputs([opts.mcq]) if opts.mcq else [],
        "medical_dict": expand_inputs([opts.medical_dict]) if opts.medical_dict else [],
        "char_dict": expand_inputs([opts.char_dict]) if opts.char_dict else [],
    }
    exclude = load_exclusions(list(opts.exclude_mcq)) if opts.exclude_mcq else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if opts.val_korean:  # PATH[:FORMAT] as the training inputs: resolved where they are read
        n = write_val_documents(list(opts.val_korean), out_dir / VAL_NAME)
        log.info("validation: %d documents in %s", n, out_dir / VAL_NAME)
    counts = {s: SourceCounts(files=[str(p) for p in inputs[s]]) for s in SOURCES}
    copies = {s: opts.medical_multiplier if s in MEDICAL_SOURCES else 1 for s in SOURCES}
    spool = _Spool(out_dir / f".{OUTPUT_NAME}.spool", copies)
    try:
        with spool.file:
            for source in MEDICAL_SOURCES:
                if inputs[source]:
                    outcomes = (_rejected_outcome(r) if isinstance(r, Rejected) else _medical_outcome(source, r, exclude)
                                for r in _records(inputs[source]))
                    _consume(source, outcomes, counts[source], spool, opts.strict)
            if inputs["korean"]:
                with progress(desc="korean", unit="doc", disable=not opts.progress) as bar:
                    _consume("korean", _korean_outcomes(korean, opts, exclude), counts["korean"],
                             spool, opts.strict, bar)
        lines, final = _write_mixed(spool, out_dir / OUTPUT_NAME, opts, counts)
    finally:
        spool.path.unlink(missing_ok=True)
    base = {s: counts[s].kept for s in SOURCES}
    report = {
        "output": {"path": str(out_dir / OUTPUT_NAME), "lines": lines},
        "options": {"medical_multiplier": opts.medical_multiplier, "seed": opts.seed, "max_samples": opts.max_samples,
                    "min_chars": opts.min_chars, "min_hangul_ratio": opts.min_hangul_ratio, "strict": opts.strict,
                    "exclude_mcq": [str(p) for p in opts.exclude_mcq],
                    "excluded_questions": len(exclude) if exclude is not None else 0,
                    "korean_formats": {str(p): f for p, f in korean if f != AUTO}},
        "sources": {s: counts[s].as_dict() for s in SOURCES},
        "distribution": distribution(base, final, opts.medical_multiplier),
    }
    for s in SOURCES:
        c = report["sources"][s]
        assert c["read"] == c["kept"] + c["dropped"] + c["rejected"], (s, c)
    atomic_write_json(out_dir / REPORT_NAME, report)
    log.info("corpus: %d lines (%s)", lines, ", ".join(f"{r['source']} {r['final']}" for r in report["distribution"][:-1]))
    return report


def _permutation(n: int, seed: int) -> np.ndarray:
    """``numpy.random.default_rng(seed).permutation(n)``, in int32 when ``n`` fits: half the memory.

    ``Generator.permutation(n)`` shuffles ``arange(n)`` in place, and the shuffle's draws depend on
    ``n`` only, not on the dtype, so the values are the same (tests/test_corpus_build.py checks it).
    """
    perm = np.arange(n, dtype=np.int32 if n <= np.iinfo(np.int32).max else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    return perm


def _copy_lines(fd: int, out, starts: np.ndarray, ends: np.ndarray) -> None:
    """Copy the spool's bytes ``starts[i]:ends[i]`` to ``out``, in order."""
    # pread, not mmap: mapped pages of the spool would count in this process's RSS
    for a, b in zip(starts.tolist(), ends.tolist()):
        out.write(os.pread(fd, b - a, a))


def _write_mixed(spool: _Spool, out_path: Path, opts: CorpusOptions,
                 counts: dict[str, SourceCounts]) -> tuple[int, dict[str, int]]:
    sources = np.frombuffer(spool.sources, dtype=np.int8)
    duplicate = spool.duplicates()
    for i, n in enumerate(np.bincount(sources[duplicate], minlength=len(SOURCES)).tolist()):
        counts[SOURCES[i]].kept -= n
        counts[SOURCES[i]].dropped[DUPLICATE] += n
    copies = np.asarray(spool.copies, dtype=np.int64)[sources]
    copies[duplicate] = 0
    del duplicate
    if not copies.any():
        raise DataError("no document survived cleaning and filtering: see the drop counts in the inputs "
                        "(too short? set min_chars lower) or pass more input")
    # Document k appears copies[k] times: line p of the unshuffled mix is a copy of the first document
    # whose running total of copies exceeds p. Searched for per slice of the permutation, so that no
    # array of lines other than the permutation itself is ever built.
    ends = np.cumsum(copies, out=copies)
    order = _permutation(int(ends[-1]), opts.seed)
    if opts.max_samples:
        order = order[: opts.max_samples]
    offsets = np.frombuffer(spool.offsets, dtype=np.int64)
    per_source = np.zeros(len(SOURCES), dtype=np.int64)
    with open(spool.path, "rb") as f, AtomicFile(out_path) as out:
        for lo in range(0, order.size, _CHUNK):
            docs = np.searchsorted(ends, order[lo: lo + _CHUNK], side="right")
            per_source += np.bincount(sources[docs], minlength=len(SOURCES))
            _copy_lines(f.fileno(), out, offsets[docs], offsets[docs + 1])
    final = {s: int(per_source[i]) for i, s in enumerate(SOURCES)}
    return int(order.size), final
