"""Explicit validation files -> ``val_documents.jsonl``, the validation set the shard stage reads.

The files come in the formats of the Korean input (JSON array, JSONL, ``.txt`` = one document, a
``save_to_disk`` directory, ``PATH:FORMAT`` too) and are cleaned as Korean records are: a ``{"text"}``
record (or a bare JSON string) by the cleaner :mod:`~korcpt.corpus.textformat` picks, a ``.txt``
document normalised; redirects are left out. No length or Hangul filter applies: the user chose
these documents.

Each line written is ``{"text": cleaned, "source": ..., "raw": as given}`` (``raw`` only where cleaning
changed the text), in input order. The shard stage packs ``text`` as the validation split and keeps
every corpus document equal to ``text`` or ``raw`` out of training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from korcpt.corpus.readers import Record, Rejected, iter_records
from korcpt.corpus.textformat import AUTO, clean_as, record_format, resolve_inputs
from korcpt.errors import DataError
from korcpt.files import AtomicFile

VAL_NAME = "val_documents.jsonl"
VAL_SOURCE = "val_korean"  # the source of a validation document whose record names none


def val_document(rec: Record | Rejected, fmt: str = AUTO) -> dict[str, str] | None:
    """One validation record as a document line's object, cleaned as ``fmt``; ``None`` for a redirect.

    Raises:
        DataError: a record that cannot be decoded, or that is neither a string nor a ``{"text"}`` object.
    """
    if isinstance(rec, Rejected):
        raise DataError(f"{rec.where}: validation record rejected ({rec.reason}: {rec.detail})")
    raw = rec.value if rec.is_text else rec.value.get("text") if isinstance(rec.value, dict) else rec.value
    if not isinstance(raw, str):
        raise DataError(f"{rec.where}: expected a string or an object with a string \"text\"")
    text = clean_as(raw, record_format(rec.value, rec.is_text, fmt))
    if text is None:
        return None
    source = rec.value.get("source") if isinstance(rec.value, dict) else None
    return _document(text, str(source or VAL_SOURCE), raw)


def _document(text: str, source: str, raw: str) -> dict[str, str]:
    return {"text": text, "source": source} if raw == text else {"text": text, "source": source, "raw": raw}


def val_documents(paths: list[Path]) -> Iterator[dict[str, str]]:
    """The validation documents of ``paths``, in input order (see :func:`val_document`).

    Raises:
        DataError: a missing or empty input, or a record :func:`val_document` refuses.
    """
    for path, fmt in resolve_inputs(paths):
        for rec in iter_records(path):
            doc = val_document(rec, fmt)
            if doc is not None:
                yield doc


def write_val_documents(paths: list[Path], out_path: Path) -> int:
    """Clean the validation files ``paths`` into ``out_path`` (JSONL), which appears only when complete.

    Returns:
        The number of documents written.

    Raises:
        DataError: see :func:`val_documents`; nothing is written then.
    """
    n = 0
    with AtomicFile(Path(out_path)) as out:
        for doc in val_documents(paths):
            out.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
            n += 1
    return n
