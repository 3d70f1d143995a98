"""Streaming readers: every raw input becomes a sequence of :class:`Record` or :class:`Rejected`.

Nothing here loads a whole input into memory: a JSON array (the Namu dump form, gigabytes) is
decoded one element at a time, JSONL one line at a time, and a ``datasets`` directory saved with
``save_to_disk`` is memory-mapped by Arrow and read in batches. A ``.txt`` file is one document
(the real plain inputs are one bill or statute per file and are double-spaced, so blank-line
blocks would cut them into fragments).

Problems a user must fix before anything can run (a missing path, an empty input, a directory with
nothing readable, a JSON array that stops parsing) raise :class:`~korcpt.errors.DataError` naming
the file. Problems of one record (a malformed JSONL line, bytes that are not UTF-8) come back as
:class:`Rejected` with ``file:line`` so that the builder counts them and goes on.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Iterator

from korcpt.errors import DataError
from korcpt.files import MALFORMED_JSON, NON_UTF8, Record, Rejected, iter_jsonl

# Why a record was rejected (counted per source in report.json).
MISSING_FIELD = "missing_field"
BAD_ANSWER = "bad_answer"
REJECT_REASONS = (MALFORMED_JSON, MISSING_FIELD, BAD_ANSWER, NON_UTF8)

_READ_BYTES = 1 << 20
_MAX_ELEMENT_CHARS = 256 << 20  # a JSON array element larger than this is treated as malformed
_SURROGATE = re.compile(r"[\udc80-\udcff]")  # bytes that were not UTF-8, kept by surrogateescape
_ARROW_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_TEXT_SUFFIXES = (".json", ".jsonl", ".txt")


def _is_arrow_dir(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _ARROW_MARKERS)


def expand_inputs(paths: list[Path]) -> list[Path]:
    """The files and Arrow dataset directories behind ``paths``, in a stable (sorted) order.

    Args:
        paths: files or directories as given on the command line.

    Returns:
        Input files (``.json``, ``.jsonl``, ``.txt``, any name if given explicitly) and Arrow dataset
        directories; a directory is searched recursively, hidden entries skipped.

    Raises:
        DataError: a path does not exist, or a directory holds nothing readable.
    """
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if path.is_file() or _is_arrow_dir(path):
            out.append(path)
            continue
        found: list[Path] = []
        try:
            for root, dirs, files in os.walk(path, onerror=_raise):
                root_path = Path(root)
                if _is_arrow_dir(root_path):
                    found.append(root_path)
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [root_path / f for f in files if not f.startswith(".") and f.endswith(_TEXT_SUFFIXES)]
        except OSError as exc:
            raise DataError(f"{path}: cannot read directory: {exc.strerror or exc}") from None
        if not found:
            raise DataError(f"{path}: directory holds no readable input (.json, .jsonl, .txt or a save_to_disk dataset)")
        out += sorted(found)
    return out


def _raise(exc: OSError) -> None:
    raise exc


def input_bytes(paths: list[Path]) -> int:
    """Total size in bytes of the given files and dataset directories (to decide on parallel work)."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        else:
            total += path.stat().st_size
    return total


def iter_records(path: Path) -> Iterator[Record | Rejected]:
    """Stream the records of one input file or Arrow dataset directory.

    The format follows the name and the first byte: a dataset directory is Arrow, ``.txt`` is one
    text document, ``.jsonl`` is JSON Lines, and ``.json`` is a JSON array when its first character is
    ``[`` and JSON Lines otherwise. A UTF-8 byte order mark and CRLF line ends are accepted.

    Args:
        path: one entry of :func:`expand_inputs`.

    Yields:
        A :class:`Record` per record, or a :class:`Rejected` for one that cannot be decoded.

    Raises:
        DataError: the input is missing, empty, or (for a JSON array) stops being valid JSON.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        yield from _iter_arrow(path)
        return
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".txt":
        yield from _iter_txt(path)
    elif path.suffix == ".jsonl" or _first_char(path) != "[":
        yield from iter_jsonl(path)
    else:
        yield from _iter_json_array(path)


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8)
    stripped = head.lstrip()
    if not stripped:
        raise DataError(f"{path}: file holds only whitespace")
    return chr(stripped[0])


def _iter_txt(path: Path) -> Iterator[Record | Rejected]:
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        yield Rejected(f"{path}:{line}", NON_UTF8, f"invalid UTF-8 byte 0x{raw[exc.start]:02x}")
        return
    if not text.strip():
        raise DataError(f"{path}: file holds only whitespace")
    yield Record(f"{path}:1", text, is_text=True)


def _iter_json_array(path: Path) -> Iterator[Record | Rejected]:
    """Decode ``[v1, v2, ...]`` element by element, reading 1 MiB at a time.

    ``buf[i:]`` is the unparsed text; ``line`` is the line number of ``buf[i]``. Bytes that are not
    UTF-8 are kept as lone surrogates (``surrogateescape``) so that only the element holding them is
    rejected, not the whole file.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        first = f.read(_READ_BYTES)
        buf = utf8.decode(first.removeprefix(codecs.BOM_UTF8), final=not first)
        eof = not first
        i, line, count = 0, 1, 0

        def fill() -> bool:
            nonlocal buf, i, eof
            if eof:
                return False
            chunk = f.read(_READ_BYTES)
            eof = not chunk
            buf = buf[i:] + utf8.decode(chunk, final=eof)
            i = 0
            return True

        def skip_ws() -> str:
            nonlocal i, line
            while True:
                while i < len(buf) and buf[i] in " \t\r\n":
                    line += buf[i] == "\n"
                    i += 1
                if i < len(buf) or not fill():
                    return buf[i] if i < len(buf) else ""

        def fail(msg: str) -> DataError:
            return DataError(f"{path}:{line}: not a valid JSON array: {msg}")

        if skip_ws() != "[":
            raise fail("expected '['")
        i += 1
        expect_value = True
        while True:
            ch = skip_ws()
            if ch == "]" and (count == 0 or not expect_value):
                i += 1
                break
            if not expect_value:
                if ch != ",":
                    raise fail(f"expected ',' or ']' between elements, found {ch!r}" if ch else "unexpected end of file")
                i += 1
                expect_value = True
                continue
            if not ch:
                raise fail("unexpected end of file")
            while True:
                try:
                    value, end = decoder.raw_decode(buf, i)
                    break
                except json.JSONDecodeError as exc:
                    # an element cut by the read boundary looks malformed too: read on, up to a cap
                    if len(buf) - i > _MAX_ELEMENT_CHARS or not fill():
                        raise fail(exc.msg) from None
                except RecursionError:  # the element's end is unknown, so the array cannot go on
                    raise fail("an element is nested too deeply") from None
            where, segment = f"{path}:{line}", buf[i:end]
            line += segment.count("\n")
            i, count, expect_value = end, count + 1, False
            if _SURROGATE.search(segment):
                yield Rejected(where, NON_UTF8, "element holds bytes that are not UTF-8")
            else:
                yield Record(where, value)
        if skip_ws():
            raise fail("text after the closing ']'")
    if count == 0:
        raise DataError(f"{path}: JSON array holds no records")


def _iter_arrow(path: Path) -> Iterator[Record | Rejected]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a test/extra dependency
        raise DataError(f"{path}: reading a save_to_disk dataset needs the 'datasets' package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid...
        raise DataError(f"{path}: cannot open as a datasets directory: {exc}") from None
    splits = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    if sum(len(ds) for _, ds in splits) == 0:
        raise DataError(f"{path}: dataset holds no rows")
    for name, ds in splits:
        if "text" not in ds.column_names:
            raise DataError(f"{path}: dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
        label = f"{path}[{name}]" if name else str(path)
        row = 0
        for batch in ds.iter(batch_size=1000):  # memory-mapped: only one batch is materialised
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield Record(f"{label}:row {row}", dict(zip(keys, values)))
                row += 1
