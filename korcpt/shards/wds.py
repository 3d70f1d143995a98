"""The packed windows as webdataset tar shards (for object storage), and the training stream over them.

Layout of an export (the shard directory's own ``manifest.json`` lists the tars)::

    DIR/manifest.json                  "webdataset": [{split, path, first_sequence, sequences, sha256}]
    DIR/wds/train/shard-00000.tar      one tar per token shard; per window, keyed by its sequence index:
        0000000000.tokens.npy          the seq_len + 1 token ids (np.save, the shards' dtype)
        0000000000.starts.npy          int64 positions of document starts in the window
        0000000000.segments.npy        int64 rows [first position in the window, source id], one per
                                       document segment (validation's per-source losses)
        0000000001.tokens.npy ...

Members are ``.npy`` files read with ``np.load(allow_pickle=False)``; nothing is ever unpickled, and a
member with a pickle extension (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) is refused.

Mental model of training from tars (:func:`open_webdataset` -> :class:`TarShards` -> :class:`WebDatasetStream`)::

    data.shards = https://host/x/wds/train/shard-{00000..00009}.tar   (or https://host/x, file:, pipe:CMD ... -)
         │        manifest = https://host/x/manifest.json: everything before "/wds/" is the export's root
         v
    epoch e:   tar order = a permutation of the T train tars, pure function of (seed, e, T)
               reader j  = (rank, worker) = rank * W + worker, R = world_size * W readers
               reader j reads the tars at positions j, j + R, j + 2R, ... of that order: no tar twice
               inside a tar: its windows in a permutation of (seed, e, tar); the whole tar is read
               into memory, its SHA-256 checked against the manifest before any member is decoded
               every reader yields exactly Q windows per epoch (the rule below), then stops

Equal readers (ranks must take equal numbers of micro-batches or distributed training hangs): with
``k = T // R``, every reader gets at least ``k`` tars in every epoch, so it holds at least the windows
of the ``k`` smallest tars. ``Q`` is that sum, rounded down to whole micro-batches; the rest of the
epoch (``n - R * Q`` windows) is dropped, and logged. Worked example: tars of 64, 64 and 34 windows
(n = 162), micro-batch 2. One rank, no workers: R = 1, k = 3, Q = 162, nothing dropped. Two ranks:
R = 2, k = 1, Q = 34: each rank reads one tar's first 34 windows (in the shuffled order) per epoch
and 94 are dropped; export more, smaller tars (``shard_tokens``) so that T is many times R. Q does not
depend on the epoch, so every epoch has the same number of steps.

Resume: the state is ``{"seed", "epoch", "consumed", "num_sequences", "readers"}``, ``consumed`` in
global positions as for :class:`~korcpt.shards.reader.SequenceStream` (a micro-step consumes
``batch_size * world_size``). A reader skips the tars it had finished without fetching them. Unlike
the memory-mapped stream the order depends on the number of readers, so a resume needs the same
world size and ``data.num_workers``.

What is ours and what is webdataset's: ``webdataset.gopen`` opens every URL (file:, pipe:, http(s)
through curl) and its tar iterators split a tar into samples. The checksum check, the assignment of
tars to readers and the resumable position are written here: webdataset's own shard splitting and
shuffle buffers are neither checksummed nor resumable.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from korcpt.errors import DataError, TrainingError
from korcpt.files import AtomicFile
from korcpt.log import get_logger
from korcpt.shards.format import DTYPES, SPLITS, parse_manifest
from korcpt.shards.order import permute
from korcpt.shards.reader import ShardSet, check_run, make_sample
from korcpt.shards.source import ShardSource, SourceStream

log = get_logger(__name__)

PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "joblib"})
KEY_DIGITS = 10
MEMBERS = ("tokens.npy", "starts.npy", "segments.npy")


# ---------------------------------------------------------------- export


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
        to ``directory``; ``sha256`` is the tar's, which the trainer checks before decoding a member.
    """
    directory = Path(directory)
    entries = []
    for split in SPLITS:
        shards = ShardSet(directory, manifest, split)
        out = directory / "wds" / split
        out.mkdir(parents=True, exist_ok=True)
        for k, entry in enumerate(shards.entries):
            first, count = shards.first_sequence(k), entry["sequences"]
            final = out / Path(entry["path"]).name.replace(".bin", ".tar")
            with AtomicFile(final) as fh:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for i in range(first, first + count):
                        key = f"{i:0{KEY_DIGITS}d}"
                        _add(tar, f"{key}.tokens.npy", _npy_bytes(shards.window(i)))
                        _add(tar, f"{key}.starts.npy", _npy_bytes(shards.document_starts(i).astype(np.int64)))
                        _add(tar, f"{key}.segments.npy", _npy_bytes(shards.segments(i)))
            digest = hashlib.sha256(final.read_bytes()).hexdigest()
            entries.append({"split": split, "path": final.relative_to(directory).as_posix(),
                            "first_sequence": first, "sequences": count, "sha256": digest})
    return entries


def webdataset_urls(directory: str | Path, split: str, manifest: dict | None = None) -> list[str]:
    """``file:`` URLs of a split's tars in a local shard directory, as the manifest lists them."""
    from korcpt.shards.format import load_manifest, safe_member

    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    entries = [e for e in manifest.get("webdataset", []) if e["split"] == split]
    if not entries and manifest.get("counts", {}).get(split, {}).get("sequences"):
        raise DataError(f"{directory / 'manifest.json'}: no webdataset shards for split {split!r}; "
                        "build with --format webdataset or run tools/export_wds.py")
    return [f"file:{safe_member(directory, e['path'], 'webdataset').resolve()}" for e in entries]


# ---------------------------------------------------------------- sources and tars


@dataclass(frozen=True)
class TarSource:
    """Where an export lives: ``url(path)`` is the URL of a path relative to the export's root.

    ``data.shards`` takes two forms:

    - a tar pattern with ``/wds/`` in it: everything before ``/wds/`` is the root and whatever follows
      ``.tar`` is kept after every path (a ``pipe:`` command's arguments)::

          pipe:aws s3 cp s3://b/x/wds/train/shard-{00000..00003}.tar -
              root "pipe:aws s3 cp s3://b/x", suffix " -"
              manifest "pipe:aws s3 cp s3://b/x/manifest.json -"

      The pattern must name exactly the manifest's train tars (it is checked, not used as a filter).
    - the root itself, for schemes that take a plain path (``https://host/x``, ``file:/data/x``).
    """

    root: str
    suffix: str = ""
    pattern: str = ""

    def url(self, path: str) -> str:
        return f"{self.root}/{path}{self.suffix}"

    @property
    def manifest_url(self) -> str:
        return self.url("manifest.json")


def parse_source(value: str) -> TarSource:
    """The :class:`TarSource` of a ``data.shards`` value (see there); one-line :class:`DataError` if it is neither form."""
    if "/wds/" in value:
        root, rest = value[:value.rindex("/wds/")], value[value.rindex("/wds/") + 1:]
        end = rest.rfind(".tar")
        if end < 0:
            raise DataError(f"data.shards {value!r}: a webdataset pattern must name .tar files, e.g. "
                            ".../wds/train/shard-{00000..00009}.tar")
        return TarSource(root, rest[end + len(".tar"):], value)
    if value.startswith("pipe:") or ".tar" in value:
        raise DataError(f"data.shards {value!r}: expected the export's tars as .../wds/train/shard-{{00000..00009}}.tar "
                        "(the manifest.json beside wds/ is found from it)")
    return TarSource(value.rstrip("/"))


def read_url(url: str) -> bytes:
    """All bytes at ``url`` through ``webdataset.gopen``; a failed open, read or command is one :class:`DataError`."""
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as stream:
            return stream.read()
    except (OSError, ValueError) as exc:  # a pipe's or curl's non-zero exit arrives as OSError on close
        raise DataError(f"{url}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _decode(url: str, key: str, members: dict[str, bytes], required=MEMBERS[:2]) -> list[np.ndarray]:
    for suffix in members:
        if suffix.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS:
            raise DataError(f"{url}: member {key}.{suffix} is a pickle; refused (korcpt never unpickles data)")
    arrays = []
    for suffix in MEMBERS:
        if suffix not in members:
            if suffix in required:
                raise DataError(f"{url}: sample {key} lacks {key}.{suffix}; found {sorted(members)}")
            arrays.append(None)
            continue
        try:
            arrays.append(np.load(io.BytesIO(members[suffix]), allow_pickle=False))
        except ValueError as exc:
            raise DataError(f"{url}: {key}.{suffix} is not a plain .npy array ({exc})") from None
    return arrays


def _samples(url: str, stream) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(sequence index, [tokens, starts, segments]) of each sample of a tar stream (webdataset's iterators)."""
    import webdataset as wds

    try:
        for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])):
            key = sample["__key__"]
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            try:
                index = int(Path(key).name)
            except ValueError:
                raise DataError(f"{url}: sample key {key!r} is not a sequence index") from None
            yield index, _decode(url, key, members)
    except (tarfile.TarError, ValueError) as exc:  # ValueError: webdataset's duplicate member names
        raise DataError(f"{url}: not a readable tar ({str(exc).splitlines()[0]})") from None


def iter_windows(urls: list[str]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(sequence index, window, document starts) of every sample in ``urls``, in stored order, unchecked
    against a manifest (a look at a tar; training goes through :class:`WebDatasetStream`)."""
    import webdataset as wds

    for url in urls:
        stream = wds.gopen(url, "rb")
        try:
            for index, (tokens, starts, _) in _samples(url, stream):
                yield index, tokens, starts
        finally:
            stream.close()


class TarShards(ShardSource):
    """The tars of one split of an export, as its manifest lists them (build with :func:`open_webdataset`).

    Attributes are :class:`~korcpt.shards.source.ShardSource`'s (``entries``: the webdataset entries,
    checked when the manifest was parsed); ``directory`` is the source as configured (for messages),
    ``urls`` the tars' URLs.
    """

    def __init__(self, source: TarSource, manifest: dict, split: str, verify: bool = True, where: str = ""):
        self.source, self.manifest, self.split, self.verify = source, manifest, split, verify
        self.directory = source.pattern or source.root
        where = where or source.manifest_url
        self.seq_len: int = manifest["seq_len"]
        self.dtype = DTYPES[manifest["dtype"]]
        self.sources: list[str] = list(manifest.get("sources", []))
        self._set_entries([e for e in manifest.get("webdataset", []) if e["split"] == split])
        if not self.entries and any(s["split"] == split for s in manifest["shards"]):
            raise DataError(f"{where}: no webdataset tars for split {split!r}; run tools/export_wds.py on the shard directory")
        self.urls = [source.url(e["path"]) for e in self.entries]
        self._cache: dict[int, list] = {}

    def __getstate__(self) -> dict:  # DataLoader workers get the URLs, never the tars read so far
        return {**self.__dict__, "_cache": {}}

    @property
    def counts(self) -> list[int]:
        return [e["sequences"] for e in self.entries]

    def read(self, k: int) -> list[list[np.ndarray]]:
        """Tar ``k``'s windows as ``[tokens, starts, segments]`` by position in the tar, checked: its
        SHA-256 (if ``verify``) before anything is decoded, then exactly its sequence indices, each once."""
        url, entry = self.urls[k], self.entries[k]
        data = read_url(url)
        if self.verify and (digest := hashlib.sha256(data).hexdigest()) != entry["sha256"]:
            raise DataError(f"{url}: SHA-256 {digest}, expected {entry['sha256']} from the manifest; the tar is corrupt or was replaced")
        first, count = entry["first_sequence"], entry["sequences"]
        windows: list = [None] * count
        for index, arrays in _samples(url, io.BytesIO(data)):
            if not first <= index < first + count or windows[index - first] is not None:
                raise DataError(f"{url}: sample {index} repeated or outside [{first}, {first + count}) named by the manifest")
            tokens = arrays[0]
            if tokens.shape != (self.seq_len + 1,) or tokens.dtype != self.dtype:
                raise DataError(f"{url}: sample {index} holds {tokens.dtype}{list(tokens.shape)} tokens, expected "
                                f"{self.dtype}[{self.seq_len + 1}]")
            windows[index - first] = arrays
        if (missing := windows.count(None)):
            raise DataError(f"{url}: {missing} of the {count} samples the manifest names are missing")
        return windows

    def _window(self, i: int) -> list[np.ndarray]:
        k, j = self.locate(i)
        if k not in self._cache:  # validation reads the same few tars at every evaluation: keep them
            self._cache[k] = self.read(k)
        return self._cache[k][j]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sequence ``i`` as a training item (random access: its tar is read once and kept)."""
        tokens, starts, _ = self._window(i)
        return make_sample(tokens, starts, i)

    def segments(self, i: int) -> np.ndarray:
        segments = self._window(i)[2]
        if segments is None:
            raise DataError(f"{self.directory}: sample {i} lacks segments.npy (exported by an older korcpt); "
                            "run tools/export_wds.py again")
        return segments

    @property
    def num_documents(self) -> int:
        """Documents the manifest counts in this split's shards."""
        return sum(s.get("documents", 0) for s in self.manifest["shards"] if s["split"] == self.split)

    def sequences_for_documents(self, n: int) -> int:
        """All sequences when ``n`` covers every document; a prefix needs the memory-mapped shards' index."""
        if n < self.num_documents:
            raise DataError(f"train.max_samples {n} of {self.num_documents} documents needs the document index of the "
                            "shard directory; from webdataset tars train on all documents (train.max_samples: 0)")
        return self.num_sequences

    def quota(self, readers: int, batch_size: int) -> int:
        """Windows each of ``readers`` readers yields per epoch: the ``T // readers`` smallest tars, in
        whole batches (the rule and a worked example are in the module docstring)."""
        per_reader = len(self.entries) // readers
        if per_reader < 1:
            raise DataError(f"{self.directory}: {len(self.entries)} {self.split} tars cannot feed {readers} readers "
                            "(ranks x DataLoader workers) without sharing one; export smaller tars (shard_tokens) or use "
                            "fewer data.num_workers")
        smallest = sum(sorted(self.counts)[:per_reader])
        return smallest // batch_size * batch_size

    def epoch_sequences(self, documents: int, readers: int, batch_size: int) -> int:
        """Global positions of an epoch with ``readers`` readers: whole tars per reader, so what every
        reader can yield times the readers (``readers * quota``); logs the dropped rest. ``documents``
        must be all of them (:meth:`sequences_for_documents`)."""
        self.sequences_for_documents(documents)
        used = readers * self.quota(readers, batch_size)
        if used < self.num_sequences:
            log.info("webdataset: %d readers (ranks x workers) over %d tars read %d of %d sequences per epoch "
                     "(%d dropped so that every reader yields as many)", readers, len(self.entries), used,
                     self.num_sequences, self.num_sequences - used)
        return used

    def training_stream(self, *, seed: int, rank: int, world_size: int, num_workers: int, batch_size: int,
                        limit: int) -> WebDatasetStream:
        """The tars this rank's readers are assigned (``limit``: the plan's sequences, all of an epoch)."""
        return WebDatasetStream(self, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                                batch_size=batch_size)


def open_webdataset(value: str, split: str, *, tokenizer_fingerprint: str | None = None, seq_len: int | None = None,
                    verify: bool = True, manifest: dict | None = None) -> TarShards:
    """Open one split of a webdataset export named by ``data.shards`` (see :class:`TarSource`).

    Args:
        value: the ``data.shards`` string.
        split: ``"train"`` or ``"val"``.
        tokenizer_fingerprint, seq_len: checked against the manifest as :func:`~korcpt.shards.reader.open_shards` does.
        verify: check each tar's SHA-256 when it is read (``data.verify_checksums``).
        manifest: the manifest if already fetched (the train split's, for the val split).

    Raises:
        DataError: an unreadable source or manifest, a pattern naming other tars than the manifest's
            train tars, or a manifest that does not fit the run; one line naming the URL.
    """
    source = parse_source(value)
    if manifest is None:
        manifest = parse_manifest(read_url(source.manifest_url), source.manifest_url)
        check_run(manifest, source.manifest_url, tokenizer_fingerprint, seq_len)
    tars = TarShards(source, manifest, split, verify)
    if source.pattern and split == "train":
        from braceexpand import braceexpand

        named, expected = sorted(braceexpand(source.pattern)), sorted(tars.urls)
        if named != expected:
            raise DataError(f"data.shards {value!r} names {len(named)} tars ({named[0]} ...), expected the manifest's "
                            f"{len(expected)} train tars ({expected[0] if expected else 'none'} ...)")
    return tars


# ---------------------------------------------------------------- the stream


def _key(seed: int, *parts: Any) -> int:
    """A seed for :func:`permute` derived from the run's seed and a label (tar order, one tar's windows)."""
    return int.from_bytes(hashlib.blake2b(json.dumps([seed, *parts]).encode(), digest_size=8).digest(), "little")


class WebDatasetStream(SourceStream):
    """A resumable stream of one epoch of :class:`TarShards`, each tar read by one (rank, worker) only.

    Args:
        tars: the train tars.
        seed: seed of the order.
        rank, world_size: this process and the number of ranks.
        num_workers: the DataLoader's ``num_workers`` (0 reads in the process, as 1 worker).
        batch_size: the DataLoader's batch size (readers yield whole batches).

    The order, the rule that keeps readers equal and the resume state are in the module docstring;
    the position and its checks are :class:`~korcpt.shards.source.SourceStream`'s. A saved ``consumed``
    is whole micro-steps, and the state also holds ``readers``.
    """

    resume_hint = " (a memory-mapped run's checkpoint cannot resume from webdataset tars)"

    def __init__(self, tars: TarShards, *, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 batch_size: int = 1):
        if num_workers < 0:
            raise ValueError(f"num_workers {num_workers}: expected >= 0")
        self._start(tars, seed, rank, world_size, batch_size)
        self.tars, self.workers = tars, max(1, num_workers)
        self.readers = world_size * self.workers
        self.quota = tars.quota(self.readers, batch_size)
        self.consumed_step = batch_size * world_size

    @property
    def epoch_length(self) -> int:
        """Global positions in an epoch: ``readers * quota``."""
        return self.readers * self.quota

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch", "consumed", "num_sequences", "readers"}``: where the next iteration starts."""
        return {**super().state_dict(), "readers": self.readers}

    def fixed_keys(self) -> list[tuple[str, str]]:
        return [("readers", "ranks x DataLoader workers: resume with the same world size and data.num_workers")]

    def reader_tars(self, epoch: int, reader: int) -> list[int]:
        """Tar numbers reader ``reader`` reads in ``epoch``, in order."""
        n = len(self.tars.entries)
        return permute(np.arange(n), _key(self.seed, "tars"), epoch, n)[reader::self.readers].tolist()

    def _reader(self, reader: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Reader ``reader``'s windows from its position ``skip`` to the quota."""
        position = 0
        for k in self.reader_tars(self.epoch, reader):
            count = self.tars.entries[k]["sequences"]
            if position >= self.quota:
                return
            if position + count > skip:  # a tar consumed before the checkpoint is not fetched again
                windows = self.tars.read(k)
                order = permute(np.arange(count), _key(self.seed, "tar", k), self.epoch, count)
                first = self.tars.entries[k]["first_sequence"]
                for j in range(max(0, skip - position), min(count, self.quota - position)):
                    tokens, starts, _ = windows[order[j]]
                    yield make_sample(tokens, starts, first + int(order[j]))
            position += count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if workers != self.workers:
            raise TrainingError(f"WebDatasetStream built for {self.workers} DataLoader worker(s), iterated by {workers}")
        # The DataLoader takes one batch from each worker in turn, starting at worker 0: after M batches
        # of this rank, the next one is role M % W's, so worker w plays role (w + M) % W. Role r has
        # produced the batches m < M with m % W == r.
        done = self.consumed // self.world_size // self.batch_size
        role = (worker + done) % workers
        skip = max(0, -(-(done - role) // workers)) * self.batch_size
        yield from self._reader(self.rank * workers + role, skip)


__all__: list[Any] = ["PICKLE_EXTENSIONS", "TarShards", "TarSource", "WebDatasetStream", "export_webdataset",
                      "iter_windows", "open_webdataset", "parse_source", "read_url", "webdataset_urls"]
