"""The data-source protocol: a manifest's webdataset entries are checked where the manifest is parsed,
with the one relative-path check; both sources and both streams share the protocol's position checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from korcpt.errors import DataError, TrainingError
from korcpt.shards.format import parse_manifest


def manifest(**extra) -> dict:
    shard = {"split": "train", "path": "train/shard-00000.bin", "index": "train/shard-00000.idx.npy",
             "tokens": 3 * 4 + 1, "sequences": 3, "sha256": "0" * 64}
    return {"format_version": 1, "tokenizer": {}, "dtype": "uint16", "seq_len": 4, "bos_id": 2, "eos_id": 1,
            "shards": [shard, {**shard, "path": "train/shard-00001.bin", "sequences": 2, "tokens": 2 * 4 + 1}], **extra}


def tar(path: str, first: int, sequences: int, split: str = "train") -> dict:
    return {"split": split, "path": path, "first_sequence": first, "sequences": sequences, "sha256": "0" * 64}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_data) -> Path:
    """The tiny corpus's shards with their webdataset export (3 train tars)."""
    from korcpt.shards.writer import ShardOptions, write_shards
    from tinyrun import synthetic_corpus

    root = tmp_path_factory.mktemp("source")
    write_shards(synthetic_corpus(root / "corpus.jsonl"), root / "out",
                 ShardOptions(tokenizer=str(tiny_data[0]), seq_len=64, val_fraction=0.1, shard_tokens=4096, seed=1,
                              workers=1, webdataset=True))
    return root / "out"


def parse(m: dict) -> dict:
    return parse_manifest(json.dumps(m).encode(), "m.json")


def test_webdataset_entries_are_checked_when_the_manifest_is_parsed():
    good = [tar("wds/train/shard-00000.tar", 0, 3), tar("wds/train/shard-00001.tar", 3, 2)]
    assert parse(manifest(webdataset=good))["webdataset"] == good
    assert "webdataset" not in parse(manifest())  # an export is optional
    bad = [
        ([tar("../x.tar", 0, 3), good[1]], "m.json: webdataset path '../x.tar' leaves the shard directory"),
        ([tar("/abs/x.tar", 0, 3), good[1]], "m.json: webdataset path '/abs/x.tar' leaves the shard directory"),
        ([tar("https://host/x.tar", 0, 3), good[1]], "leaves the shard directory"),
        ([good[0], tar("wds/train/shard-00001.tar", 4, 1)], "webdataset[1] (wds/train/shard-00001.tar) has first_sequence=4"),
        ([good[0]], "m.json: the train tars hold 3 sequences, expected 5 (the token shards'); re-export"),
        ([{"split": "train", "path": "x.tar"}], "webdataset[0] must be an object with keys"),
        ([tar("x.tar", 0, 5, split="test")], "webdataset[0] must be an object with keys"),
        ({"train": []}, "webdataset must be a list"),
    ]
    for entries, needle in bad:
        with pytest.raises(DataError) as err:
            parse(manifest(webdataset=entries))
        assert needle in str(err.value), (entries, str(err.value))
    assert len(bad) == 8


def test_both_sources_and_streams_implement_the_protocol(built):
    """ShardSet/TarShards are ShardSources, their streams SourceStreams with the same position checks;
    the training stream and the epoch's size come from the source, whichever open_source opened."""
    from korcpt.shards.reader import SequenceStream, ShardSet
    from korcpt.shards.source import ShardSource, SourceStream, open_source
    from korcpt.shards.wds import TarShards, WebDatasetStream

    directory = built
    mm, tars = open_source(str(directory), "train", verify=False), open_source(f"file:{directory}", "train")
    assert [type(mm), type(tars)] == [ShardSet, TarShards]
    assert isinstance(mm, ShardSource) and isinstance(tars, ShardSource)
    assert len(mm) == len(tars) == mm.num_sequences == tars.num_sequences > 0
    assert [mm.first_sequence(k) for k in range(len(mm.entries))] == [e["first_sequence"] for e in tars.entries]
    kwargs = dict(seed=3, rank=1, world_size=2, num_workers=0, batch_size=2, limit=mm.num_sequences)
    streams = [mm.training_stream(**kwargs), tars.training_stream(**kwargs)]
    assert [type(s) for s in streams] == [SequenceStream, WebDatasetStream]
    assert mm.epoch_sequences(mm.num_documents, 2, 2) == mm.num_sequences
    assert tars.epoch_sequences(tars.num_documents, 2, 2) == streams[1].epoch_length
    for stream in streams:
        assert isinstance(stream, SourceStream)
        good = stream.state_dict()
        assert len(stream) == stream.epoch_length // 2
        for bad, needle in [({**good, "seed": 4}, "has seed 4, expected 3 (the run's seed)"),
                            ({**good, "num_sequences": 1}, f"counts 1 sequences, expected {mm.num_sequences}"),
                            ({**good, "epoch": -1}, "has epoch -1, expected an integer >= 0"),
                            ({**good, "consumed": stream.epoch_length + 4}, f"in [0, {stream.epoch_length}]"),
                            ({"seed": 3}, "lacks")]:
            with pytest.raises(TrainingError) as err:
                stream.load_state_dict(bad)
            assert needle in str(err.value), (type(stream).__name__, str(err.value))
        stream.load_state_dict({**good, "consumed": 4, "epoch": 2})
        assert (stream.epoch, stream.consumed, len(stream)) == (2, 4, (stream.epoch_length - 4) // 2)
        with pytest.raises(TrainingError, match="advance"):
            stream.advance(stream.epoch_length)
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size"):
        SequenceStream(mm, seed=0, rank=2, world_size=2)


def test_a_split_without_shards_opens_empty(tmp_path, tiny_data):
    """A directory built without validation: its val split opens with no sequences (the trainer then
    has no validation source), from the directory and from its tars alike."""
    from korcpt.shards.source import open_source
    from korcpt.shards.writer import ShardOptions, write_shards
    from tinyrun import synthetic_corpus

    write_shards(synthetic_corpus(tmp_path / "corpus.jsonl", n_docs=40), tmp_path / "out",
                 ShardOptions(tokenizer=str(tiny_data[0]), seq_len=64, val_fraction=0.0, shard_tokens=4096, seed=1,
                              workers=1, webdataset=True))
    for value in (str(tmp_path / "out"), f"file:{tmp_path / 'out'}"):
        train, val = open_source(value, "train"), open_source(value, "val")
        assert (train.num_sequences > 0, val.num_sequences, len(val), val.entries) == (True, 0, 0, []), value
