"""What the trainer reads, whatever holds the windows: a :class:`ShardSource` (the memory-mapped
:class:`~korcpt.shards.reader.ShardSet` or the webdataset :class:`~korcpt.shards.wds.TarShards`) and its
resumable :class:`SourceStream` (:class:`~korcpt.shards.reader.SequenceStream`, which reads any source
by random access, or :class:`~korcpt.shards.wds.WebDatasetStream`, which reads whole tars).

The trainer asks a source for its plan (:meth:`ShardSource.epoch_sequences`) and its training stream
(:meth:`ShardSource.training_stream`) and never which kind it has. The position, the resume checks
and ``__len__`` of a stream live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from korcpt.errors import TrainingError


class ShardSource:
    """The windows of one split, numbered ``0 .. num_sequences - 1`` in corpus order.

    Attributes:
        directory: where the split lives (a shard directory, or the configured URL), for messages.
        manifest: the parsed ``manifest.json``.
        split: ``"train"`` or ``"val"``.
        seq_len: tokens per sequence (windows hold ``seq_len + 1``).
        dtype: numpy dtype of the token ids.
        sources: source names; :meth:`source_ids` index into it.
        entries: the manifest entries of the split's files, in sequence order (:func:`data_order` hashes them).
        num_sequences: number of windows.
    """

    directory: Path | str
    manifest: dict
    split: str
    seq_len: int
    dtype: np.dtype
    sources: list[str]
    entries: list[dict]
    num_sequences: int
    _first: np.ndarray  # first global sequence of each entry, then num_sequences

    def _set_entries(self, entries: list[dict]) -> None:
        self.entries = entries
        self._first = np.concatenate(([0], np.cumsum([e["sequences"] for e in entries], dtype=np.int64)))
        self.num_sequences = int(self._first[-1])

    def __len__(self) -> int:
        return self.num_sequences

    def first_sequence(self, k: int) -> int:
        """Global number of entry ``k``'s first window."""
        return int(self._first[k])

    def locate(self, i: int) -> tuple[int, int]:
        """(entry number, window number inside that entry) of global sequence ``i``."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences}) of split {self.split!r}")
        k = int(np.searchsorted(self._first, i, side="right")) - 1
        return k, i - int(self._first[k])

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Global sequence ``i`` as a training item (:func:`korcpt.shards.reader.make_sample`)."""
        raise NotImplementedError

    def segments(self, i: int) -> np.ndarray:
        """int64 rows ``[first position in window i, source id]``, one per document segment of window ``i``."""
        raise NotImplementedError

    def source_ids(self, i: int) -> np.ndarray:
        """For each of the ``seq_len + 1`` tokens of window ``i``, the id of its document's source (``sources[id]``)."""
        segments = self.segments(i)
        return np.repeat(segments[:, 1], np.diff(np.append(segments[:, 0], self.seq_len + 1)))

    @property
    def num_documents(self) -> int:
        """Documents that begin in a window of this split."""
        raise NotImplementedError

    def sequences_for_documents(self, n: int) -> int:
        """How many leading windows hold the first ``n`` documents."""
        raise NotImplementedError

    def epoch_sequences(self, documents: int, readers: int, batch_size: int) -> int:
        """Global positions of a training epoch over the first ``documents`` documents, read by
        ``readers`` readers (ranks x DataLoader workers) in batches of ``batch_size``."""
        return self.sequences_for_documents(documents)

    def training_stream(self, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                        limit: int) -> SourceStream:
        """This rank's shuffled training stream over the first ``limit`` windows (the plan's)."""
        from korcpt.shards.reader import SequenceStream

        return SequenceStream(self, seed=seed, rank=rank, world_size=world_size, shuffle=True, limit=limit,
                              batch_size=batch_size)


class SourceStream(IterableDataset):
    """A resumable stream of one epoch of a :class:`ShardSource`, split over ``world_size`` ranks.

    Where it stands is ``epoch`` and the global positions ``consumed`` in it (all ranks together),
    bounded by :attr:`epoch_length`. Iterating does not change that (a DataLoader's workers iterate
    copies): the training loop records consumed positions with :meth:`advance` and starts the next
    epoch with :meth:`set_epoch`.
    """

    source: ShardSource
    seed: int
    rank: int
    world_size: int
    batch_size: int
    epoch: int
    consumed: int
    consumed_step = 1  # ``consumed`` of a saved state is a multiple of this
    resume_hint = ""  # said after the keys a state lacks

    def _start(self, source: ShardSource, seed: int, rank: int, world_size: int, batch_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank}, world_size {world_size}, batch_size {batch_size}: expected "
                             "0 <= rank < world_size and batch_size >= 1")
        self.source, self.seed, self.rank, self.world_size, self.batch_size = source, int(seed), rank, world_size, batch_size
        self.epoch, self.consumed = 0, 0

    @property
    def epoch_length(self) -> int:
        """Global positions in an epoch."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first position."""
        self.epoch, self.consumed = int(epoch), 0

    def advance(self, n_global: int) -> None:
        """Record that ``n_global`` more global positions were consumed (by all ranks together)."""
        if n_global < 0 or self.consumed + n_global > self.epoch_length:
            raise TrainingError(f"advance({n_global}) from {self.consumed}: expected a total within "
                                f"[0, {self.epoch_length}] positions of this epoch")
        self.consumed += n_global

    def __len__(self) -> int:
        """Sequences this rank yields in the rest of the epoch."""
        return (self.epoch_length - self.consumed) // self.world_size

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "consumed", "num_sequences"}`` (and a stream's own keys): where the next iteration starts."""
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed,
                "num_sequences": self.source.num_sequences}

    def fixed_keys(self) -> list[tuple[str, str]]:
        """(key, why) of the state that a resume must find equal, besides seed and num_sequences."""
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; raises :class:`TrainingError` (found/expected) if it does not fit this stream."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise TrainingError(f"data stream state lacks {missing}; found keys {sorted(state)}{self.resume_hint}")
        if state["seed"] != self.seed:
            raise TrainingError(f"data stream state has seed {state['seed']}, expected {self.seed} (the run's seed)")
        if state["num_sequences"] != self.source.num_sequences:
            raise TrainingError(f"data stream state counts {state['num_sequences']} sequences, expected "
                                f"{self.source.num_sequences} in {self.source.directory}; the shards changed since the checkpoint")
        for key, why in self.fixed_keys():
            if state[key] != expected[key]:
                raise TrainingError(f"data stream state has {key} {state[key]!r}, expected {expected[key]!r} ({why})")
        if not isinstance(state["epoch"], int) or state["epoch"] < 0:
            raise TrainingError(f"data stream state has epoch {state['epoch']!r}, expected an integer >= 0")
        consumed, step = state["consumed"], self.consumed_step
        if not isinstance(consumed, int) or not 0 <= consumed <= self.epoch_length or consumed % step:
            what = "an integer" if step == 1 else f"a multiple of {step}"
            raise TrainingError(f"data stream state has consumed {consumed!r}, expected {what} in [0, {self.epoch_length}]")
        self.epoch, self.consumed = state["epoch"], consumed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        raise NotImplementedError


def open_source(value: str, split: str, *, tokenizer_fingerprint: str | None = None, verify: bool = True,
                manifest: dict | None = None) -> ShardSource:
    """One split of ``data.shards``, checked against the run's tokenizer: webdataset tars when it names
    them (:func:`korcpt.config.stream_source`: a URL or a ``.tar`` pattern), else the memory-mapped
    shard directory. ``manifest``: the one already read for the other split (tars are not fetched twice)."""
    from korcpt.config import stream_source

    if stream_source(value):
        from korcpt.shards.wds import open_webdataset

        return open_webdataset(value, split, tokenizer_fingerprint=tokenizer_fingerprint, verify=verify, manifest=manifest)
    from korcpt.shards.reader import open_shards

    return open_shards(value, split, tokenizer_fingerprint=tokenizer_fingerprint, verify=verify)


__all__ = ["ShardSource", "SourceStream", "open_source"]
