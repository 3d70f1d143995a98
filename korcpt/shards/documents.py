"""The shard stage's input: documents JSONL written by the corpus stage, already clean text.

One JSON object per line: ``{"text": str, "source"?: str, "raw"?: str}``. ``text`` is the document as
it will be tokenized; ``source`` names where it came from (per-source statistics and the index's
source ids); ``raw``, written for validation documents only, is the text before the corpus stage
cleaned it (a training document equal to either form is kept out of train). Nothing here cleans or
converts text: that is the corpus stage's work (:mod:`korcpt.corpus`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Iterator, NamedTuple

from korcpt.errors import DataError
from korcpt.files import Record, Rejected, decode_jsonl_line, iter_jsonl

CHUNK_BYTES = 1 << 20  # lines handed to a tokenizer worker at a time


class Document(NamedTuple):
    """One line of a documents file (a tuple: workers parse one per line, so it must be cheap)."""

    text: str
    source: str | None = None
    raw: str | None = None


def parse_document(line: bytes, path: str, lineno: int) -> Document:
    """Decode line ``lineno`` of ``path`` into a :class:`Document` (a tokenizer worker's one line).

    Raises:
        DataError: see :func:`document`.
    """
    raw = line.removeprefix(codecs.BOM_UTF8) if lineno == 1 else line
    return document(decode_jsonl_line(raw.rstrip(b"\r\n"), f"{path}:{lineno}"))


def document(rec: Record | Rejected) -> Document:
    """A decoded documents line as a :class:`Document`.

    Raises:
        DataError: the line is not JSON, or not an object with a string ``text``; names file and line.
    """
    if isinstance(rec, Rejected):
        raise DataError(f"{rec.where}: not valid JSON ({rec.detail})")
    obj = rec.value
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        found = json.dumps(obj, ensure_ascii=False)[:80]
        raise DataError(f"{rec.where}: expected an object with a string \"text\", found {found}")
    source, raw = obj.get("source"), obj.get("raw")
    return Document(text, str(source) if source else None, raw if isinstance(raw, str) else None)


def read_documents(path: Path) -> Iterator[Document]:
    """Every document of a documents file, in order (blank lines are skipped).

    Raises:
        DataError: a line that :func:`document` refuses.
    """
    for rec in iter_jsonl(path, allow_empty=True):
        yield document(rec)


class LineChunks:
    """Consecutive chunks of a file's lines, ``(first line number, lines, bytes)``, numbered from 1.

    Iterating also hashes the file: :meth:`sha256` is its digest once every chunk has been read, so
    that the manifest can name the exact corpus without a second pass over it.
    """

    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        self._digest = hashlib.sha256()

    def size(self) -> int:
        return self.path.stat().st_size

    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __iter__(self) -> Iterator[tuple[int, list[bytes], int]]:
        lines: list[bytes] = []
        size, first = 0, 1
        with open(self.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                self._digest.update(line)
                lines.append(line)
                size += len(line)
                if size >= self.chunk_bytes:
                    yield first, lines, size
                    lines, size, first = [], 0, lineno + 1
        if lines:
            yield first, lines, size
