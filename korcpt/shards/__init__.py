"""Documents -> packed token shards (writer, manifest) and shards -> training sequences (reader, state).

Read in this order::

    format.py     the directory layout, the manifest, tokenizer_fingerprint, path and checksum checks
    documents.py  the input: documents JSONL (clean text, written by the corpus stage), read in chunks
    encode.py     Encoder: worker processes parse, split by document hash, tokenize to <bos> doc <eos>
    writer.py     ShardWriter (add / finish, manifest last; aborts on error) packs seq_len + 1 windows
                  overlapping by one token (worked example there); write_shards = encode into a writer
    order.py      permute: an epoch's order as a pure function of (seed, epoch, n)
    source.py     the protocol both sources (ShardSource) and their streams (SourceStream) implement
    reader.py     open_shards -> ShardSet (memmap, checked) -> SequenceStream (ranks, workers, resume)
    wds.py        the same windows as webdataset tars (export), and the training stream over tar URLs

Nothing here imports korcpt.corpus or korcpt.model: documents arrive as files, tokenizers through
korcpt.assets.

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
    "ShardWriter": "writer",
    "write_shards": "writer",
    "add_webdataset": "writer",
    "permute": "order",
    "epoch_order": "order",
    "IGNORE_INDEX": "reader",
    "ShardSet": "reader",
    "SequenceStream": "reader",
    "make_sample": "reader",
    "open_shards": "reader",
    "ShardSource": "source",
    "SourceStream": "source",
    "WebDatasetStream": "wds",
    "export_webdataset": "wds",
    "webdataset_urls": "wds",
    "TarShards": "wds",
    "open_webdataset": "wds",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
