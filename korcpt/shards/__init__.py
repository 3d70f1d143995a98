"""Documents -> packed token shards (writer, manifest) and shards -> training sequences (reader, state).

Read in this order::

    format.py   the directory layout, the manifest, tokenizer_fingerprint, path and checksum checks
    writer.py   write_shards: tokenize in parallel, split by document hash, pack <bos> doc <eos> into
                seq_len + 1 windows overlapping by one token (worked example there), write atomically
    order.py    permute: an epoch's order as a pure function of (seed, epoch, n)
    reader.py   open_shards -> ShardSet (memmap, checked) -> SequenceStream (ranks, workers, resume)
    wds.py      the same windows as webdataset tars, and a stream over tar URLs

Exports are loaded on first use, so that tokenizer worker processes never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "format",
    "choose_dtype": "format",
    "load_manifest": "format",
    "tokenizer_fingerprint": "format",
    "ShardOptions": "writer",
    "write_shards": "writer",
    "permute": "order",
    "epoch_order": "order",
    "IGNORE_INDEX": "reader",
    "ShardSet": "reader",
    "SequenceStream": "reader",
    "make_sample": "reader",
    "open_shards": "reader",
    "WebDatasetStream": "wds",
    "export_webdataset": "wds",
    "webdataset_urls": "wds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
