"""Extend a byte-fallback BPE tokenizer with Korean tokens learned from a corpus (continued BPE).

Mental model::

    corpus lines ──base tokenizer──> token runs ──continued BPE──> new merges (+ new syllables)
         (JSONL, term lists)        (Hangul only)   (greedy by tokens saved)       │
                                                                                   v
        tokenizer.json: vocab += new tokens (ids after every base id), merges += new merges (lowest rank)

How the tokens are added, and why:

* New tokens are entries of the BPE model itself, not HuggingFace "added tokens". Each new token is
  built by one merge ``A B`` of two tokens that are already reachable, appended *after* every base
  merge (lowest priority). BPE applies merges by rank, so on any text the extended tokenizer first
  reaches exactly the base segmentation, then applies the new merges: base tokens keep their ids,
  no text gets more tokens than before, and a new word is found inside running text, before a
  particle or after a space, like any other BPE token. Hangul syllables the base vocabulary lacks
  (Gemma 3 has 1,733 of the 11,172; the rest fall back to three byte tokens) can be added as single
  characters: BPE looks characters up in the vocabulary before falling back to bytes, so they need
  no merge.
* The training is an exact simulation of that tokenization: the corpus is segmented with the base
  tokenizer, Hangul runs (an optional leading ``▁`` then Hangul tokens, never crossing a space or a
  pre-tokenizer boundary) are counted, and at each step the pair that saves the most tokens on the
  corpus becomes a merge (or the missing syllable that saves most becomes a token); after each merge
  every earlier merge that became applicable is applied again in rank order, as the BPE model does.
* HuggingFace added tokens are matched on the raw text before the model runs: the word is cut at
  every occurrence, also inside longer words that merely contain it, and the ``▁`` of the preceding
  space is left as a token of its own (`` 간염은`` -> ``▁ 간염 은``; the BPE extension gives
  ``▁간염 은``). So added tokens cost most in running text, where every word after a space pays for
  a lone ``▁``, and can make a word *longer* than the base does (``그리고`` -> ``그리 고``: a word cut
  at a token it merely contains); the BPE extension cannot make any text longer. The measurements
  (``bench/bench_vocab.py``) are in bench/README.md, "Vocabulary extension".

The output directory holds the extended ``tokenizer.json`` (plus the base's tokenizer config), so
``AutoTokenizer.from_pretrained(out)`` loads it, and ``report.json``. It is written beside ``out``
and renamed into place when complete: a crash never leaves the base tokenizer, or half of the new
one, under the extended name.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from korcpt.assets import load_tokenizer
from korcpt.corpus.text import HANGUL_CLASS, hangul_syllables, is_hangul_syllable
from korcpt.errors import DataError, ModelError
from korcpt.files import Record, iter_jsonl, replace_dir, staging_dir
from korcpt.log import get_logger

log = get_logger(__name__)

SPACE = "▁"
_HANGUL_START = re.compile(f"▁?[{HANGUL_CLASS}]*")  # a run may open with the space marker
_HANGUL = re.compile(f"[{HANGUL_CLASS}]+")
_BYTE = re.compile(r"<0x([0-9A-F]{2})>")


@dataclass
class Extension:
    """What continued BPE learned: new vocabulary entries and the merges that build them."""

    new_tokens: list[str] = field(default_factory=list)
    """New vocabulary strings in id order (ids follow the base vocabulary)."""
    merges: list[tuple[str, str]] = field(default_factory=list)
    """New merges in rank order (all after the base merges); single syllables need none."""
    saved: list[int] = field(default_factory=list)
    """Tokens each new token saved on the training corpus when it was chosen."""
    corpus_tokens_before: int = 0
    corpus_tokens_after: int = 0


@dataclass
class ExtendOptions:
    """Options of the vocabulary stage; ``tools/extend_tokenizer.py`` takes its flag defaults from here."""

    base: str
    """Base tokenizer: a directory, hub id or preset name (see korcpt.assets)."""
    out_dir: Path
    """Output directory, loadable with AutoTokenizer.from_pretrained; built beside it and renamed into place."""
    max_new_tokens: int
    """Cap on new vocabulary entries (merged tokens plus added syllables)."""
    corpus: Path | None = None
    """raw_text_mixed.jsonl ({"text"} lines), or None to learn from the term files alone."""
    terms: tuple[Path, ...] = ()
    """Term files, one term a line, learned from as more corpus lines."""
    min_frequency: int = 2
    """A new token must save at least this many tokens on the training text."""
    add_syllables: bool = True
    """Also add Hangul syllables missing from the base vocabulary (else they take three byte tokens)."""
    max_corpus_chars: int = 0
    """Read at most this many corpus characters (0: all)."""
    eval_files: tuple[Path, ...] = ()
    """Text files measured before/after in report.json (tokens per 100 syllables, chars/s, round trip)."""


# --------------------------------------------------------------------------------------------- input


def read_texts(corpus: Path | None, terms: Iterable[Path] = (), max_chars: int = 0) -> Iterator[str]:
    """Lines of a ``{"text"}`` JSONL corpus, then every non-empty line of each term file.

    Raises:
        DataError: a file is missing or a corpus line is not a JSON object with a string ``text``.
    """
    seen = 0
    for path in ([corpus] if corpus else []):
        if not path.is_file():
            raise DataError(f"corpus {path} not found (expected a raw_text_mixed.jsonl of {{\"text\": ...}} lines)")
        for rec in iter_jsonl(path, allow_empty=True):
            obj = rec.value if isinstance(rec, Record) else None
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f"{rec.where}: expected a JSON object with a \"text\" string")
            text = obj["text"]
            if not isinstance(text, str):
                raise DataError(f"{rec.where}: \"text\" is {type(text).__name__}, expected a string")
            yield text
            seen += len(text)
            if max_chars and seen >= max_chars:
                return
    for path in terms:
        if not path.is_file():
            raise DataError(f"term file {path} not found (expected one term a line)")
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line


# ------------------------------------------------------------------------------------------ learning


def _runs(tokens: list[str], word_ids: list[int | None]) -> Iterator[tuple[str, ...]]:
    """Hangul runs of one encoding: ``▁``? then Hangul tokens, bytes of a syllable joined to it.

    Example: ``['▁간', '염', '은', '.', '▁', '<0xED>', '<0x9E>', '<0xA3>', '이']`` gives
    ``('▁간', '염', '은')`` and ``('▁', '힣', '이')`` (the three byte tokens become the syllable ``힣``,
    which the base vocabulary lacks). A run never crosses a space or a pre-tokenizer boundary.
    """
    run: list[str] = []
    prev_word: object = object()
    i = 0
    while i < len(tokens):
        tok, step = tokens[i], 1
        if _BYTE.fullmatch(tok) and i + 2 < len(tokens):  # a Hangul syllable is three UTF-8 bytes
            try:
                ch = bytes(int(_BYTE.fullmatch(t).group(1), 16) for t in tokens[i : i + 3]).decode("utf-8")
            except (AttributeError, UnicodeDecodeError):
                ch = ""
            if is_hangul_syllable(ch):
                tok, step = ch, 3
        if word_ids[i] != prev_word and run:
            yield tuple(run)
            run = []
        prev_word = word_ids[i]
        if _HANGUL.fullmatch(tok):
            run.append(tok)
        else:
            if run:
                yield tuple(run)
            run = [tok] if tok.startswith(SPACE) and _HANGUL_START.fullmatch(tok) else []
        i += step
    if run:
        yield tuple(run)


def count_runs(tokenizer, texts: Iterable[str], batch_size: int = 512) -> tuple[Counter, int]:
    """Base-tokenize ``texts`` and count their Hangul runs; also return the total token count."""
    backend = tokenizer.backend_tokenizer
    runs: Counter = Counter()
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            total += len(enc.ids)
            runs.update(_runs(enc.tokens, enc.word_ids))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return runs, total


class _ContinuedBPE:
    """Greedy continued BPE over counted runs; see the module docstring for why it is exact."""

    def __init__(self, runs: Counter, vocab: set[str]):
        self.words = [list(run) for run in runs]
        self.counts = list(runs.values())
        self.vocab = set(vocab)
        self.ranks: dict[tuple[str, str], int] = {}
        self.pairs: Counter = Counter()  # mergeable adjacent pair -> occurrences (weighted by run count)
        self.where: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.chars: Counter = Counter()  # syllable missing from the vocabulary -> occurrences
        self.char_where: dict[str, set[int]] = defaultdict(set)
        self.touched: set = set()  # pairs and chars whose count grew since the caller last looked
        for i in range(len(self.words)):
            self._count(i, +1)

    def _count(self, i: int, sign: int) -> None:
        word, n = self.words[i], self.counts[i] * sign
        for a, b in zip(word, word[1:]):
            if a in self.vocab and b in self.vocab and not b.startswith(SPACE):
                self.pairs[(a, b)] += n
                if sign > 0:
                    self.where[(a, b)].add(i)
                    self.touched.add((a, b))
        for sym in word:
            if sym not in self.vocab:
                self.chars[sym] += n
                if sign > 0:
                    self.char_where[sym].add(i)

    def _apply_known(self, word: list[str]) -> list[str]:
        """Apply learned merges by rank, leftmost first, until none applies (what BPE does)."""
        while True:
            best = None
            for pos, pair in enumerate(zip(word, word[1:])):
                rank = self.ranks.get(pair)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, pos)
            if best is None:
                return word
            pos = best[1]
            word = word[:pos] + [word[pos] + word[pos + 1]] + word[pos + 2 :]

    def merge(self, pair: tuple[str, str]) -> None:
        self.ranks[pair] = len(self.ranks)
        self.vocab.add(pair[0] + pair[1])
        for i in sorted(self.where.pop(pair, ())):
            if pair in zip(self.words[i], self.words[i][1:]):
                self._count(i, -1)
                self.words[i] = self._apply_known(self.words[i])
                self._count(i, +1)

    def add_char(self, ch: str) -> None:
        for i in sorted(self.char_where.pop(ch, ())):
            self._count(i, -1)  # counted while ch was missing ...
            self.vocab.add(ch)
            self._count(i, +1)  # ... and now with the pairs ch takes part in
            self.vocab.discard(ch)
        self.vocab.add(ch)
        self.chars.pop(ch, None)

    def cost(self) -> int:
        """Tokens the runs take now (a syllable missing from the vocabulary takes three bytes)."""
        return sum(n * sum(1 if s in self.vocab else 3 for s in w) for w, n in zip(self.words, self.counts))


def learn_extension(
    tokenizer,
    texts: Iterable[str],
    max_new_tokens: int,
    min_frequency: int = 2,
    add_syllables: bool = True,
) -> Extension:
    """Learn up to ``max_new_tokens`` Korean tokens for ``tokenizer`` (a fast BPE tokenizer) from ``texts``.

    Greedy: at each step the merge of two adjacent tokens, or the missing Hangul syllable, that saves
    the most tokens on ``texts`` (given everything learned so far) becomes the next new token.

    Args:
        tokenizer: the base tokenizer (``PreTrainedTokenizerFast`` with a BPE model).
        texts: training text; term lists are simply more lines.
        max_new_tokens: cap on new vocabulary entries (merged tokens plus added syllables).
        min_frequency: a new token must save at least this many tokens on ``texts``.
        add_syllables: also add Hangul syllables the base vocabulary lacks (each occurrence saves 2).

    Returns:
        The :class:`Extension`: tokens in id order and merges in rank order, all after the base's.

    Raises:
        ModelError: the tokenizer's model is not BPE.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"tokenizer model is {model.get('type')!r}, expected 'BPE' (continued BPE needs merges)")
    runs, total = count_runs(tokenizer, texts)
    taken = set(model["vocab"]) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    bpe = _ContinuedBPE(runs, set(model["vocab"]))
    ext = Extension(corpus_tokens_before=total)
    cost_before = bpe.cost()

    def saving(kind: int, item) -> int:
        return bpe.pairs.get(item, 0) if kind == 0 else 2 * bpe.chars.get(item, 0)

    # (-saving, kind, item): ties go to merges (kind 0), then to the smaller string, so runs repeat
    heap = [(-n, 0, pair) for pair, n in bpe.pairs.items() if n >= min_frequency]
    if add_syllables:
        heap += [(-2 * n, 1, ch) for ch, n in bpe.chars.items() if 2 * n >= min_frequency]
    heapq.heapify(heap)
    bpe.touched.clear()
    while heap and len(ext.new_tokens) < max_new_tokens:
        neg, kind, item = heapq.heappop(heap)
        current = saving(kind, item)
        if current != -neg:  # stale: counts changed since it was queued
            if current >= min_frequency and -neg > current:
                heapq.heappush(heap, (-current, kind, item))
            continue
        token = item if kind == 1 else item[0] + item[1]
        if token in taken:  # an existing string the base cannot reach this way: leave it alone
            bpe.pairs.pop(item, None) if kind == 0 else bpe.chars.pop(item, None)
            continue
        if kind == 0:
            bpe.merge(item)
            ext.merges.append(item)
        else:
            bpe.add_char(item)
        ext.new_tokens.append(token)
        ext.saved.append(current)
        taken.add(token)
        for pair in bpe.touched:  # counts that grew are queued again at their new value
            if bpe.pairs.get(pair, 0) >= min_frequency:
                heapq.heappush(heap, (-bpe.pairs[pair], 0, pair))
        bpe.touched.clear()
    ext.corpus_tokens_after = total - cost_before + bpe.cost()
    return ext


# ------------------------------------------------------------------------------------------ building


def extended_tokenizer_json(base_json: dict, ext: Extension) -> dict:
    """A copy of the base ``tokenizer.json`` dict with ``ext`` appended to its BPE model.

    New ids start after the largest id of the base (vocabulary and added tokens), so no base id moves.
    """
    out = json.loads(json.dumps(base_json))
    model = out["model"]
    vocab: dict[str, int] = model["vocab"]
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in out.get("added_tokens", []))])
    for token in ext.new_tokens:
        if token in vocab:
            raise ModelError(f"new token {token!r} is already in the base vocabulary (id {vocab[token]})")
        vocab[token] = next_id
        next_id += 1
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for a, b in ext.merges:
        model["merges"].append(f"{a} {b}" if as_strings else [a, b])
    return out


def _write_extended_tokenizer(base_tokenizer, ext: Extension, directory: Path):
    """Write the base tokenizer's files with ``ext`` appended into ``directory``; return it loaded from there."""
    from transformers import AutoTokenizer

    base_tokenizer.save_pretrained(directory)
    data = extended_tokenizer_json(json.loads(base_tokenizer.backend_tokenizer.to_str()), ext)
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(directory)
    expected = len(base_tokenizer) + len(ext.new_tokens)
    if len(tok) != expected:
        raise ModelError(f"the extended tokenizer has {len(tok)} tokens once saved, expected {expected}")
    return tok


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output path whose replacement would lose something: a file, or a non-empty
    directory that is not a tokenizer (an earlier output, holding ``tokenizer.json``, is replaced).

    Raises:
        DataError: ``out_dir`` is such a path.
    """
    if not out_dir.exists():
        return
    if out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "tokenizer.json").is_file()):
        return
    raise DataError(f"output {out_dir} exists and is not a tokenizer directory; expected a new or empty "
                    "directory, or an earlier extended tokenizer (it is replaced whole)")


def build_extended_tokenizer(base_tokenizer, ext: Extension, out_dir: Path):
    """Save the base tokenizer with ``ext`` appended as ``out_dir``; return it loaded from there.

    The files are written into a sibling directory that is renamed to ``out_dir`` once the saved
    tokenizer has loaded with the expected size, so ``out_dir`` never holds the base tokenizer or a
    half-written one; an earlier ``out_dir`` is replaced whole.

    Raises:
        DataError: ``out_dir`` is a file or a non-empty directory that is not a tokenizer.
        ModelError: a new token is already in the base vocabulary, or the saved tokenizer has the wrong size.
    """
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    with staging_dir(out_dir) as tmp:
        _write_extended_tokenizer(base_tokenizer, ext, tmp)
        replace_dir(tmp, out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# --------------------------------------------------------------------------------------- measurement


def count_tokens(tokenizer, lines: list[str]) -> int:
    """Tokens of ``lines`` encoded one by one, without special tokens."""
    return sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False))


def tokens_per_100_syllables(tokenizer, lines: list[str]) -> float:
    """Tokens per 100 Hangul syllables over ``lines`` (each line encoded alone, no special tokens)."""
    syllables = sum(hangul_syllables(line) for line in lines)
    return 100.0 * count_tokens(tokenizer, lines) / max(syllables, 1)


def throughputs(tokenizers: list, lines: list[str], repeats: int = 5) -> list[float]:
    """Characters per second of ``encode_batch`` over ``lines`` for each tokenizer: passes interleaved
    and the best of ``repeats`` kept, so that load from other processes hits all of them alike."""
    chars = sum(len(line) for line in lines)
    best = [float("inf")] * len(tokenizers)
    for tok in tokenizers:
        tok.backend_tokenizer.encode_batch(lines[:64], add_special_tokens=False)  # warm-up
    for _ in range(repeats):
        for i, tok in enumerate(tokenizers):
            start = time.perf_counter()
            tok.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
            best[i] = min(best[i], time.perf_counter() - start)
    return [chars / t for t in best]


def round_trip_failures(tokenizer, lines: list[str]) -> list[str]:
    """Lines for which ``decode(encode(line)) != line`` (special tokens skipped)."""
    encs = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    decoded = tokenizer.backend_tokenizer.decode_batch([e.ids for e in encs], skip_special_tokens=True)
    return [line for line, back in zip(lines, decoded) if back != line]


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, line endings removed (a ``\\r`` of CRLF files is kept)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def compare(base_tokenizer, new_tokenizer, named_lines: dict[str, list[str]], repeats: int = 5) -> dict:
    """Before/after figures per named text: tokens per 100 Hangul syllables, chars/s, round trip."""
    out = {}
    for name, lines in named_lines.items():
        before = tokens_per_100_syllables(base_tokenizer, lines)
        after = tokens_per_100_syllables(new_tokenizer, lines)
        tput_before, tput_after = throughputs([base_tokenizer, new_tokenizer], lines, repeats)
        out[name] = {
            "lines": len(lines),
            "hangul_syllables": sum(hangul_syllables(line) for line in lines),
            "tokens_per_100_syllables_before": round(before, 2),
            "tokens_per_100_syllables_after": round(after, 2),
            "token_change_pct": round(100.0 * (after - before) / before, 2) if before else 0.0,
            "chars_per_s_before": round(tput_before),
            "chars_per_s_after": round(tput_after),
            "throughput_ratio": round(tput_after / tput_before, 3),
            "round_trip_failures": len(round_trip_failures(new_tokenizer, lines)),
        }
    return out


def new_token_share(tokenizer, base_vocab_size: int, lines: list[str]) -> float:
    """Share of the tokens of ``lines`` whose id is a new one (>= ``base_vocab_size``)."""
    encs = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    total = sum(len(e.ids) for e in encs)
    return sum(1 for e in encs for i in e.ids if i >= base_vocab_size) / max(total, 1)


def extend_tokenizer(opts: ExtendOptions) -> dict:
    """Learn Korean tokens for the tokenizer ``opts.base``; save the extended tokenizer and ``report.json``.

    Both are written into a sibling of ``opts.out_dir`` that is renamed into place when complete.

    Args:
        opts: the stage's options (see :class:`ExtendOptions`).

    Returns:
        The report (also written to ``out_dir/report.json``).

    Raises:
        DataError: nothing to learn from, an unreadable input, no token worth adding, or an
            ``out_dir`` that is not a tokenizer directory.
        ModelError: a bad ``max_new_tokens``, or a base tokenizer that is not a fast BPE tokenizer.
    """
    _check_options(opts)
    base_tok = _load_base_tokenizer(opts.base)
    start = time.perf_counter()
    texts = read_texts(opts.corpus, opts.terms, opts.max_corpus_chars)
    ext = learn_extension(base_tok, texts, opts.max_new_tokens, opts.min_frequency, opts.add_syllables)
    learn_s = time.perf_counter() - start
    if not ext.new_tokens:
        raise DataError(f"no token saves {opts.min_frequency} or more tokens on the given text: nothing to add")
    log.info("learned %d new tokens in %.1f s; corpus tokens %d -> %d", len(ext.new_tokens), learn_s,
             ext.corpus_tokens_before, ext.corpus_tokens_after)
    out_dir = Path(opts.out_dir)
    with staging_dir(out_dir) as tmp:
        new_tok = _write_extended_tokenizer(base_tok, ext, tmp)
        report = _report(opts, base_tok, new_tok, ext, learn_s)
        (tmp / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        replace_dir(tmp, out_dir)
    return report


def _check_options(opts: ExtendOptions) -> None:
    """Refuse options that cannot give a tokenizer before anything is loaded or learned."""
    if opts.max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens is {opts.max_new_tokens}, expected at least 1")
    if opts.corpus is None and not opts.terms:
        raise DataError("nothing to learn from: give a corpus, term files, or both")
    check_out_dir(Path(opts.out_dir))


def _load_base_tokenizer(base: str):
    tok = load_tokenizer(base)
    if not tok.is_fast:
        raise ModelError(f"tokenizer {base!r} is not a fast (tokenizers) tokenizer; expected a tokenizer.json")
    return tok


def _report(opts: ExtendOptions, base_tok, new_tok, ext: Extension, learn_s: float) -> dict:
    """The contents of ``report.json``: settings, sizes, training-text savings and the eval figures."""
    base_size = len(base_tok)
    eval_lines = {p.name: read_lines(p) for p in opts.eval_files}
    return {
        "base": opts.base,
        "corpus": str(opts.corpus) if opts.corpus else None,
        "terms": [str(p) for p in opts.terms],
        "max_new_tokens": opts.max_new_tokens,
        "min_frequency": opts.min_frequency,
        "method": "continued BPE: new vocab entries and merges appended after the base's (lowest priority)",
        "base_vocab_size": base_size,
        "new_vocab_size": len(new_tok),
        "new_tokens": len(ext.new_tokens),
        "new_merges": len(ext.merges),
        "new_syllables": len(ext.new_tokens) - len(ext.merges),
        "new_token_ids": [base_size, len(new_tok) - 1],
        "training_tokens_before": ext.corpus_tokens_before,
        "training_tokens_after": ext.corpus_tokens_after,
        "learn_seconds": round(learn_s, 2),
        "top_new_tokens": [{"token": t, "saved": s} for t, s in zip(ext.new_tokens[:50], ext.saved[:50])],
        "eval": compare(base_tok, new_tok, eval_lines) if eval_lines else {},
    }
