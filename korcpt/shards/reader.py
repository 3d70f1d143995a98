"""Shards -> training sequences: checked on open, memory-mapped lazily, streamed in a resumable order.

Mental model::

    open_shards(DIR, "train")        manifest checked against the run (version, dtype, seq_len, tokenizer),
         │                           every shard's size (and SHA-256) checked, paths kept inside DIR
         v
    ShardSet.window(i)               the seq_len + 1 tokens of global sequence i (np.memmap, opened on use;
         │                           the document indexes are memory-mapped too)
         │
    SequenceStream(seed, rank, world_size)
         epoch order  = permute(position p) for p in range(n)   (pure function of seed, epoch, n)
         rank r reads = positions consumed + r, consumed + r + world_size, ...
         worker w     = every num_workers-th batch of those, so a DataLoader returns the rank's order
         item         = {input_ids, labels, position_ids, sample_id}

The order of an epoch does not depend on the number of ranks or workers: they only decide who reads
which global position. Resume state is ``{"seed", "epoch", "consumed", "num_sequences"}`` with
``consumed`` counted in global positions, so a run stopped at world size 8 continues at world size 2
without repeating or skipping a sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from korcpt.errors import DataError
from korcpt.labels import IGNORE_INDEX
from korcpt.shards.format import (
    DTYPES,
    IDX_IS_START,
    IDX_OFFSET,
    IDX_SOURCE,
    SPLITS,
    file_sha256,
    load_manifest,
    safe_member,
)
from korcpt.shards.order import permute
from korcpt.shards.source import ShardSource, SourceStream


def make_sample(window: np.ndarray, starts: np.ndarray, sample_id: int) -> dict[str, torch.Tensor]:
    """Turn a window of ``seq_len + 1`` tokens into one training item.

    Args:
        window: token ids of the window.
        starts: positions in ``[0, seq_len]`` of the window where a document begins (its ``<bos>``).
        sample_id: the global sequence index, returned as ``sample_id``.

    Returns:
        ``input_ids = window[:-1]``; ``labels = window[1:]`` except that a target which is the first token
        of a document is ``-100`` (a document is not predicted from the one before it); ``position_ids``
        count from 0 at the window start and again at every document start.

    Example (seq_len = 6; documents A = a1 a2 and B = b1, ``B`` = its bos, ``E`` = eos)::

        window        a2  E   B   b1  E   B   c1        starts = [2, 5]
        input_ids     a2  E   B   b1  E   B
        labels        E  -100 b1  E  -100 c1           (targets at 1 and 4 are the <bos> at 2 and 5)
        position_ids  0   1   0   1   2   0
    """
    seq_len = window.shape[0] - 1
    ids = torch.from_numpy(window.astype(np.int64))
    labels = ids[1:].clone()
    starts = np.asarray(starts, dtype=np.int64)
    labels[torch.from_numpy(starts[starts >= 1] - 1)] = IGNORE_INDEX
    index = np.arange(seq_len, dtype=np.int64)
    reset = np.zeros(seq_len, dtype=np.int64)
    inside = starts[starts < seq_len]
    reset[inside] = inside
    positions = index - np.maximum.accumulate(reset)
    return {
        "input_ids": ids[:-1],
        "labels": labels,
        "position_ids": torch.from_numpy(positions),
        "sample_id": torch.tensor(sample_id, dtype=torch.int64),
    }


class ShardSet(ShardSource):
    """The sequences of one split of a shard directory (use :func:`open_shards` to build one); the
    attributes are :class:`~korcpt.shards.source.ShardSource`'s, ``directory`` the shard directory."""

    def __init__(self, directory: Path, manifest: dict, split: str):
        self.directory = Path(directory)
        self.manifest = manifest
        self.split = split
        self.seq_len: int = manifest["seq_len"]
        self.dtype: np.dtype = DTYPES[manifest["dtype"]]
        self.bos_id = manifest["bos_id"]
        self.eos_id = manifest["eos_id"]
        self.sources: list[str] = list(manifest.get("sources", []))
        self._set_entries([s for s in manifest["shards"] if s["split"] == split])
        self._paths = [safe_member(self.directory, s["path"], "shard") for s in self.entries]
        self._index_paths = [safe_member(self.directory, s["index"], "index") for s in self.entries]
        self._maps: dict[int, np.memmap] = {}
        self._indexes: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:  # DataLoader workers get the paths, never a copy of mapped data
        state = dict(self.__dict__)
        state["_maps"], state["_indexes"] = {}, {}
        return state

    def check(self, verify: bool = True) -> None:
        """Check that every shard and index exists with the size (and, if ``verify``, SHA-256) the manifest records."""
        for entry, path, index_path in zip(self.entries, self._paths, self._index_paths):
            for p in (path, index_path):
                if not p.is_file():
                    raise DataError(f"{p}: missing (named by {self.directory / 'manifest.json'})")
            expected = entry["tokens"] * self.dtype.itemsize
            found = path.stat().st_size
            if found != expected:
                raise DataError(
                    f"{path}: {found} bytes, expected {expected} ({entry['tokens']} {self.manifest['dtype']} tokens); "
                    "the shard is truncated or was replaced"
                )
            if verify:
                for p, key in ((path, "sha256"), (index_path, "index_sha256")):
                    if key in entry and (digest := file_sha256(p)) != entry[key]:
                        raise DataError(f"{p}: SHA-256 {digest}, expected {entry[key]} from the manifest; the file is corrupt")

    def _map(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self._paths[k], dtype=self.dtype, mode="r", shape=(self.entries[k]["tokens"],))
        return self._maps[k]

    def _index(self, k: int) -> np.ndarray:
        if k not in self._indexes:
            path = self._index_paths[k]
            try:
                # mapped, not loaded: the pages are the file's, shared by every DataLoader worker and
                # reclaimable, rather than a private copy (32 bytes a document) in each worker
                index = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: unreadable document index ({exc})") from None
            tokens = self.entries[k]["tokens"]
            if (index.ndim != 2 or index.shape[1] != 4 or index.shape[0] < 1 or index[0, IDX_OFFSET] != 0
                    or np.any(np.diff(index[:, IDX_OFFSET]) <= 0) or index[-1, IDX_OFFSET] >= tokens):
                raise DataError(f"{path}: malformed document index (expected int64 rows [offset, line, source, "
                                f"is_start] with increasing offsets from 0 below {tokens})")
            self._indexes[k] = index
        return self._indexes[k]

    def window(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of global sequence ``i`` (a copy, in the shards' dtype)."""
        k, j = self.locate(i)
        start = j * self.seq_len
        return np.array(self._map(k)[start: start + self.seq_len + 1])

    def _index_rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The index rows of the segments window ``i`` holds, and their offsets relative to the window
        start (the first is <= 0: the segment running at the start)."""
        k, j = self.locate(i)
        index = self._index(k)
        lo = j * self.seq_len
        offsets = index[:, IDX_OFFSET]
        a = int(np.searchsorted(offsets, lo, side="right")) - 1  # segment running at the window start
        b = int(np.searchsorted(offsets, lo + self.seq_len, side="right"))
        return index[a:b], offsets[a:b] - lo

    def document_starts(self, i: int) -> np.ndarray:
        """Positions in ``[0, seq_len]`` of window ``i`` where a document begins (its ``<bos>``)."""
        rows, rel = self._index_rows(i)
        return rel[(rel >= 0) & (rows[:, IDX_IS_START] == 1)]

    def segments(self, i: int) -> np.ndarray:
        rows, rel = self._index_rows(i)
        return np.stack([np.maximum(rel, 0), rows[:, IDX_SOURCE]], axis=1).astype(np.int64)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Global sequence ``i`` as a training item (see :func:`make_sample`)."""
        return make_sample(self.window(i), self.document_starts(i), i)

    def _starts(self, k: int) -> np.ndarray:
        index = self._index(k)
        return index[index[:, IDX_IS_START] == 1, IDX_OFFSET]

    @property
    def num_documents(self) -> int:
        """Documents that begin in a sequence of this split (its shards hold them in corpus order); one
        beginning in a shard's dropped tail, which no sequence holds, is not counted."""
        return sum(int(self._starts(k).size) for k in range(len(self.entries)))

    def sequences_for_documents(self, n: int) -> int:
        """How many leading sequences hold the first ``n`` documents: the windows that start before the
        ``n + 1``-th document does (all of them when the split has ``n`` documents or fewer).

        Worked example, seq_len 4, one shard, documents starting at tokens 0, 3 and 9: ``n = 2`` ends at
        token 9, windows start at 0, 4 and 8 (< 9), so 3 sequences; ``n = 1`` ends at 3: 1 sequence.
        """
        seen = 0
        for k in range(len(self.entries)):
            starts = self._starts(k)
            if seen + starts.size > n:  # the (n + 1)-th document starts in shard k
                end = int(starts[n - seen])
                return self.first_sequence(k) + min(-(-end // self.seq_len), self.entries[k]["sequences"])
            seen += starts.size
        return self.num_sequences


def open_shards(
    directory: str | Path,
    split: str,
    *,
    tokenizer_fingerprint: str | None = None,
    seq_len: int | None = None,
    verify: bool = True,
) -> ShardSet:
    """Open one split of a shard directory, checking it against the run before anything is read.

    Args:
        directory: a directory written by ``tools/build_shards.py`` (holding ``manifest.json``).
        split: ``"train"`` or ``"val"``.
        tokenizer_fingerprint: the run's :func:`korcpt.shards.tokenizer_fingerprint`; ``None`` skips the check.
        seq_len: the run's sequence length; ``None`` accepts the manifest's.
        verify: also check every shard's SHA-256 (reads every byte once; sizes are always checked).

    Returns:
        A :class:`ShardSet`; shards are memory-mapped on first use. A split with no shards has
        ``num_sequences == 0``.

    Raises:
        DataError: a missing or unreadable manifest, another format version, dtype, sequence length or
            tokenizer than the run's, a shard path leaving the directory, or a missing, truncated or
            corrupt shard; the message names the file, what was found and what was expected.
    """
    directory = Path(directory)
    if split not in SPLITS:
        raise DataError(f"split {split!r} unknown, expected one of {list(SPLITS)}")
    manifest = load_manifest(directory)
    check_run(manifest, directory / "manifest.json", tokenizer_fingerprint, seq_len)
    shards = ShardSet(directory, manifest, split)
    shards.check(verify=verify)
    return shards


def check_run(manifest: dict, where: Path | str, tokenizer_fingerprint: str | None, seq_len: int | None) -> None:
    """Refuse a manifest built for another sequence length or tokenizer than the run's (None: not checked)."""
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise DataError(f"{where}: seq_len {manifest['seq_len']}, expected {seq_len} (the run's); rebuild the shards "
                        "or set the run's sequence length to match")
    found = (manifest.get("tokenizer") or {}).get("fingerprint")
    if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
        raise DataError(f"{where}: tokenizer fingerprint {found} ({manifest['tokenizer'].get('name')}), expected "
                        f"{tokenizer_fingerprint} (the run's tokenizer); these shards were built with another tokenizer")


class SequenceStream(SourceStream):
    """A resumable, rank- and worker-sharded stream of one epoch of a source, read by random access
    (a :class:`ShardSet`; the validation split of :class:`~korcpt.shards.wds.TarShards` too).

    Args:
        shards: the sequences.
        seed: seed of the order.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks reading the same epoch.
        shuffle: permute the sequences (``False``: sequence order).
        limit: use only sequences ``0 .. limit - 1``, in a new order each epoch (0: all); with shards
            in corpus order that is the first documents (:meth:`ShardSet.sequences_for_documents`).
        batch_size: the DataLoader's batch size; DataLoader workers take whole batches in turn, so that
            the loader returns this rank's order exactly (only matters with ``num_workers > 0``).

    Order and sharding, with a worked example (n = 10 sequences, world_size = 3, consumed = 0)::

        order  = permute(p, seed=0, epoch=0, n=10) for p in 0..9  = [0 9 5 7 1 2 4 3 6 8]
        usable = 10 // 3 * 3 = 9 positions; position 9 (the tail) is dropped so ranks stay equal
        rank 0 reads positions 0 3 6 -> sequences 0 7 4;  rank 1: 1 4 7 -> 9 1 3;  rank 2: 2 5 8 -> 5 2 6
        resumed with consumed = 6 at world_size = 2: rank 0 reads positions 6 8 (4 6), rank 1 reads 7 9 (3 8)

    In general rank ``r`` reads positions ``consumed + r + k * world_size`` for
    ``k < (L - consumed) // world_size``, where ``L`` is ``n`` or ``limit``; from the start of an epoch that is
    every position ``p`` with ``p % world_size == r``. Each micro-step of ``b`` items per rank therefore
    consumes the next ``b * world_size`` global positions, whatever the world size.

    State: ``state_dict()`` says where the next ``iter()`` starts. Iterating does not change it (a
    DataLoader's workers iterate copies): the training loop counts consumed sequences
    (``micro_batch * world_size`` per micro-step) and records them with :meth:`advance` or
    :meth:`load_state_dict`; :meth:`set_epoch` starts the next epoch at position 0. Do not use
    ``persistent_workers=True``: workers must see the state at the moment ``iter()`` is called.
    """

    def __init__(self, shards: ShardSource, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 limit: int = 0, batch_size: int = 1):
        if limit < 0:
            raise ValueError(f"limit {limit}: expected >= 0 (0: all sequences)")
        self._start(shards, seed, rank, world_size, batch_size)
        self.shuffle, self.limit = shuffle, limit

    @property
    def epoch_length(self) -> int:
        """Global positions in an epoch: ``num_sequences``, or ``limit`` when smaller."""
        n = self.source.num_sequences
        return min(self.limit, n) if self.limit else n

    def rank_positions(self) -> np.ndarray:
        """Global positions this rank reads in the rest of the epoch, in order."""
        count = (self.epoch_length - self.consumed) // self.world_size
        return self.consumed + self.rank + self.world_size * np.arange(count, dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        positions = self.rank_positions()
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            batch = np.arange(positions.size) // self.batch_size
            positions = positions[batch % info.num_workers == info.id]
        n = self.epoch_length  # with a limit, every epoch permutes the same leading sequences
        for lo in range(0, positions.size, 4096):  # map positions to sequences a block at a time
            block = positions[lo: lo + 4096]
            ids = permute(block, self.seed, self.epoch, n) if self.shuffle else block
            for i in ids.tolist():
                yield self.source.sample(i)


__all__ = ["IGNORE_INDEX", "ShardSet", "SequenceStream", "make_sample", "open_shards"]
