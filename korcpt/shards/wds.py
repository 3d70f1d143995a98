"""The packed windows as webdataset tar shards (for object storage), and a stream that reads them back.

Each tar member group is one window, keyed by its global sequence index within the split::

    wds/train/shard-00000.tar
        0000000000.tokens.npy    the seq_len + 1 token ids (np.save, the shards' dtype)
        0000000000.starts.npy    int64 positions of document starts in the window
        0000000001.tokens.npy ...

Members are ``.npy`` files read with ``np.load(allow_pickle=False)``; nothing is ever unpickled, and a
member with a pickle extension (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) is refused.

:class:`WebDatasetStream` yields the same items as :class:`~korcpt.shards.reader.SequenceStream` with
``shuffle=False`` (the stored order, which is sequence order), split across ranks and DataLoader
workers the same way, and resumable by ``consumed``. A global shuffle needs random access: use the
memory-mapped shards for that. Tars are streamed, so every rank and worker reads every tar and keeps
its own positions.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from korcpt.errors import DataError
from korcpt.shards.format import SPLITS
from korcpt.shards.reader import ShardSet, make_sample

PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "joblib"})
KEY_DIGITS = 10


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same shards give the same tar bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def export_webdataset(directory: Path, manifest: dict) -> list[dict]:
    """Write every split's windows as tars under ``directory/wds/<split>/``, one tar per token shard.

    Args:
        directory: the shard directory.
        manifest: its manifest (the shards must already be on disk).

    Returns:
        Manifest entries ``{"split", "path", "first_sequence", "sequences", "sha256"}``, paths relative
        to ``directory``.
    """
    directory = Path(directory)
    entries = []
    for split in SPLITS:
        shards = ShardSet(directory, manifest, split)
        out = directory / "wds" / split
        out.mkdir(parents=True, exist_ok=True)
        for k, entry in enumerate(shards.entries):
            first, count = int(shards._first[k]), entry["sequences"]
            final = out / Path(entry["path"]).name.replace(".bin", ".tar")
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=out)
            try:
                with os.fdopen(fd, "wb") as fh:
                    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                        for i in range(first, first + count):
                            key = f"{i:0{KEY_DIGITS}d}"
                            _add(tar, f"{key}.tokens.npy", _npy_bytes(shards.window(i)))
                            _add(tar, f"{key}.starts.npy", _npy_bytes(shards.document_starts(i).astype(np.int64)))
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            digest = hashlib.sha256(final.read_bytes()).hexdigest()
            entries.append({"split": split, "path": final.relative_to(directory).as_posix(),
                            "first_sequence": first, "sequences": count, "sha256": digest})
    return entries


def webdataset_urls(directory: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    """``file:`` URLs of a split's tars as the manifest lists them (others, ``pipe:``/``http:``, work the same)."""
    from korcpt.shards.format import load_manifest, safe_member

    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    entries = [e for e in manifest.get("webdataset", []) if e["split"] == split]
    if not entries and manifest.get("counts", {}).get(split, {}).get("sequences"):
        raise DataError(f"{directory / 'manifest.json'}: no webdataset shards for split {split!r}; "
                        "build with --format webdataset or run tools/export_wds.py")
    return [f"file:{safe_member(directory, e['path'], 'webdataset').resolve()}" for e in entries]


def _decode(url: str, key: str, members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    for suffix in members:
        if suffix.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
            raise DataError(f"{url}: member {key}.{suffix} is a pickle; refused (korcpt never unpickles data)")
    arrays = []
    for suffix in ("tokens.npy", "starts.npy"):
        if suffix not in members:
            raise DataError(f"{url}: sample {key} lacks {key}.{suffix}; found {sorted(members)}")
        try:
            arrays.append(np.load(io.BytesIO(members[suffix]), allow_pickle=False))
        except ValueError as exc:
            raise DataError(f"{url}: {key}.{suffix} is not a plain .npy array ({exc})") from None
    return arrays[0], arrays[1]


def iter_windows(urls: list[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(sequence index, window, document starts) of every sample in ``urls``, in stored order."""
    import webdataset as wds

    for url in urls:
        stream = wds.gopen(url, "rb")
        try:
            samples = wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))
            for sample in samples:
                key = sample["__key__"]
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                try:
                    index = int(Path(key).name)
                except ValueError:
                    raise DataError(f"{url}: sample key {key!r} is not a sequence index") from None
                tokens, starts = _decode(url, key, members)
                yield index, tokens, starts
        finally:
            stream.close()


class WebDatasetStream(IterableDataset):
    """Sequence-order items from webdataset tars, sharded and resumable like ``SequenceStream(shuffle=False)``.

    Args:
        urls: tar URLs in order (``file:``, plain paths, ``pipe:cmd``, ``http(s):``), e.g. from :func:`webdataset_urls`.
        num_sequences: windows in all ``urls`` together (the manifest's count), to drop the same tail.
        rank, world_size, batch_size: as for :class:`~korcpt.shards.reader.SequenceStream`.
        consumed: global positions already consumed in this pass.
    """

    def __init__(self, urls: list[str], *, num_sequences: int, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, consumed: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} and world_size {world_size}: expected 0 <= rank < world_size")
        self.urls, self.num_sequences = list(urls), num_sequences
        self.rank, self.world_size, self.batch_size, self.consumed = rank, world_size, batch_size, consumed

    def __len__(self) -> int:
        return (self.num_sequences - self.consumed) // self.world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = len(self)
        end = self.consumed + count * self.world_size
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for position, (index, tokens, starts) in enumerate(iter_windows(self.urls)):
            if position >= end:
                break
            offset = position - self.consumed
            if offset < 0 or offset % self.world_size != self.rank:
                continue
            if (offset // self.world_size // self.batch_size) % workers != worker:
                continue
            yield make_sample(tokens, starts, index)


__all__: list[Any] = ["WebDatasetStream", "export_webdataset", "iter_windows", "webdataset_urls", "PICKLE_EXTENSIONS"]
