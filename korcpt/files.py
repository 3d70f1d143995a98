"""File primitives every stage shares: atomic writes (files and directories) and the JSONL reader.

Atomic writes: a file or directory is built under a temporary sibling name and renamed onto its
final name only when complete, so a reader (or a run killed part-way) sees the old version, nothing,
or the new one, never half of one. Temporary files are ``.NAME.<hex>.tmp`` beside ``NAME``; they are
created with ``open(..., "x")`` and directories with ``mkdir`` (not ``mkstemp``/``mkdtemp``, which are
private to the user), so what is published gets the usual permissions.

JSONL: :func:`iter_jsonl` decodes a file line by line into :class:`Record` (the JSON value) or
:class:`Rejected` (a line that is not UTF-8 or not JSON, with ``file:line``), so that each caller
counts bad lines (the corpus report, MCQ and held-out skips) or refuses them (shards, vocabulary) by
its own policy; ``str(rejected)`` is the message for people.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from korcpt.errors import DataError

# ---------------------------------------------------------------- atomic writes


def _temp_file(final: Path) -> Path:
    """Create an empty, new temporary sibling of ``final`` (its directory made if missing)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    tmp.open("xb").close()
    return tmp


def _publish(built: Path, final: Path) -> None:
    """Rename ``built`` onto ``final`` in one step: a file replaces a file, a directory an empty one."""
    os.replace(built, final)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class AtomicFile:
    """A file written under a temporary sibling name, renamed onto ``path`` by :meth:`commit`.

    For a file written over a long time (a token shard) or through a file object (a tar); as a
    context manager it commits when the block ends and aborts on an exception::

        with AtomicFile(path) as fh:
            fh.write(data)

    Args:
        path: the final name.
        text: open in text mode (UTF-8) instead of binary.
    """

    def __init__(self, path: Path, text: bool = False):
        self.path = Path(path)
        self.tmp = _temp_file(self.path)
        self.fh = open(self.tmp, "w" if text else "wb", encoding="utf-8" if text else None)

    def write(self, data: bytes | str) -> int:
        return self.fh.write(data)

    def commit(self) -> None:
        """Flush, fsync and rename onto the final name (the temporary file is removed if that fails)."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            _publish(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and remove the temporary file; the final name is left as it was."""
        self.fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling name for a writer that takes a file name (safetensors, ``shutil.copyfile``);
    renamed onto ``path`` when the block ends, removed on an exception."""
    path = Path(path)
    tmp = _temp_file(path)
    try:
        yield tmp
        _fsync(tmp)
        _publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with AtomicFile(path) as fh:
        fh.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON (non-ASCII kept as is), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A new empty sibling of ``final`` to build a directory in, deleted when the block ends.

    Only what the block renames into place (:func:`replace_dir`) survives: a crash part-way leaves
    nothing under ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(built: Path, final: Path) -> None:
    """Rename the finished directory ``built`` onto ``final``, replacing an earlier ``final`` whole.

    A non-empty ``final`` is renamed aside first and deleted after, so at every moment ``final``
    names the old directory, nothing, or the new one, never a mix of both.
    """
    if final.is_dir() and any(final.iterdir()):
        old = final.with_name(f"{final.name}.old-{secrets.token_hex(6)}")
        os.rename(final, old)
        os.rename(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _publish(built, final)  # rename(2) replaces an empty directory in one step


# ---------------------------------------------------------------- JSONL

# Why a line (or a record of another reader) was rejected.
MALFORMED_JSON = "malformed_json"
NON_UTF8 = "non_utf8"


@dataclass(frozen=True)
class Record:
    """One decoded input record: a JSON value, or the text of a ``.txt`` file (``is_text``)."""

    where: str  # "file:line" (JSON/JSONL/txt) or "dir[split]:row N" (Arrow)
    value: Any
    is_text: bool = False


@dataclass(frozen=True)
class Rejected:
    """A record that could not be decoded: ``reason`` (e.g. :data:`MALFORMED_JSON`), ``detail`` for people."""

    where: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {_REASON_TEXT.get(self.reason, self.reason)} ({self.detail})"


_REASON_TEXT = {MALFORMED_JSON: "invalid JSON", NON_UTF8: "not UTF-8"}


def bad_bytes(raw: bytes, exc: UnicodeDecodeError) -> str:
    """Where a byte string stops being UTF-8, for a :class:`Rejected` detail."""
    return f"invalid UTF-8 byte 0x{raw[exc.start]:02x} at byte {exc.start} of the line"


def decode_jsonl_line(raw: bytes, where: str) -> Record | Rejected:
    """One JSONL line (without its line end) as its JSON value, or why it is not one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(where, NON_UTF8, bad_bytes(raw, exc))
    try:
        return Record(where, json.loads(line))
    except json.JSONDecodeError as exc:
        return Rejected(where, MALFORMED_JSON, f"{exc.msg} at column {exc.colno}")
    except RecursionError:  # json's decoder recurses once per level: "[[[[..." 100,000 deep
        return Rejected(where, MALFORMED_JSON, "JSON nested too deeply")


def iter_jsonl(path: Path, allow_empty: bool = False) -> Iterator[Record | Rejected]:
    """Every non-blank line of a JSONL file, decoded, with ``where`` = ``file:line`` (counted from 1).

    A UTF-8 byte order mark and CRLF line ends are accepted; blank lines hold no record.

    Args:
        path: the file.
        allow_empty: a file without a non-blank line yields nothing instead of raising.

    Raises:
        DataError: the file cannot be read, or (unless ``allow_empty``) holds no non-blank line.
    """
    any_line = False
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            any_line = True
            yield decode_jsonl_line(raw, f"{path}:{lineno}")
    if not any_line and not allow_empty:
        raise DataError(f"{path}: file holds no records")
