"""Damaged or hostile shard directories: ``train()`` refuses before the first step, naming the file.

Each case damages a fresh copy of the tiny shard set in one way (the byte, the cut and the shard hit
are seeded), then runs the real ``train()`` on it. It must raise a korcpt error (DataError, or
ConfigError for a missing manifest, which the config check already sees) whose message names the
damaged file, and nothing of a training run may exist yet (no sample log, no checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from korcpt.config import load_config
from korcpt.errors import ConfigError, DataError, KorcptError
from korcpt.train.loop import train
from tinyrun import run_config

CASES = ["truncated shard", "flipped byte in shard", "flipped byte in index", "missing shard", "missing index",
         "missing manifest", "manifest from another tokenizer", "manifest says uint32", "manifest dtype int8",
         "path ../", "absolute path", "symlink shard out", "symlink split dir out", "garbage manifest"]


@pytest.fixture(scope="module")
def other_tokenizer_shards(tmp_path_factory, tiny_data):
    """The same corpus packed with another tokenizer (a different vocabulary size)."""
    from korcpt.shards.writer import ShardOptions, write_shards
    from korcpt.assets import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("other_tok")
    corpus = Path(tiny_data[1]).parent / "corpus.jsonl"
    tok = train_tiny_tokenizer([corpus], root / "tokenizer", vocab_size=384)
    write_shards(corpus, root / "shards", ShardOptions(tokenizer=str(tok), seq_len=64, val_fraction=0.1,
                                                       shard_tokens=4096, seed=1, workers=1))
    return root / "shards"


def _damage(case: str, d: Path, rng, outside: Path, other: Path) -> Path:
    """Apply ``case`` to shard directory ``d``; return the path the error must name."""
    manifest_path = d / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    k = rng.randrange(len(train))
    shard, index = d / train[k]["path"], d / train[k]["index"]

    def rewrite(m):
        manifest_path.write_text(json.dumps(m))

    if case == "truncated shard":
        cut = rng.randint(1, shard.stat().st_size - 1)
        os.truncate(shard, shard.stat().st_size - cut)
        print(f"[injected] {shard.name}: cut {cut} bytes off")
        return shard
    if case.startswith("flipped byte"):
        target = shard if case.endswith("shard") else index
        data = bytearray(target.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        print(f"[injected] {target.name}: flipped a bit of byte {at}")
        return target
    if case in ("missing shard", "missing index"):
        target = shard if case == "missing shard" else index
        target.unlink()
        print(f"[injected] deleted {target.name}")
        return target
    if case == "missing manifest":  # seen by the config check: "data.shards: no manifest.json in DIR"
        manifest_path.unlink()
        return d
    if case == "manifest from another tokenizer":
        shutil.rmtree(d)
        shutil.copytree(other, d)
        return manifest_path
    if case == "manifest says uint32":
        rewrite({**manifest, "dtype": "uint32"})  # every file is now half the expected size
        return d / manifest["shards"][0]["path"]
    if case == "manifest dtype int8":
        rewrite({**manifest, "dtype": "int8"})
        return manifest_path
    if case == "garbage manifest":
        raw = manifest_path.read_bytes()
        manifest_path.write_bytes(raw[: rng.randrange(1, len(raw) - 1)])
        return manifest_path
    if case in ("path ../", "absolute path"):
        victim = outside / "victim.bin"
        shutil.copy(shard, victim)
        bad = f"../{outside.name}/victim.bin" if case == "path ../" else str(victim)
        entries = [dict(s) for s in manifest["shards"]]
        entries[manifest["shards"].index(train[k])]["path"] = bad
        rewrite({**manifest, "shards": entries})
        print(f"[injected] shard path {bad!r}")
        return manifest_path
    if case == "symlink shard out":
        victim = outside / shard.name
        shutil.move(shard, victim)
        shard.symlink_to(victim)
        return manifest_path
    if case == "symlink split dir out":
        shutil.move(d / "train", outside / "train")
        (d / "train").symlink_to(outside / "train", target_is_directory=True)
        return manifest_path
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
def test_damaged_shards_are_refused_before_training_naming_the_file(tmp_path, tiny_data, other_tokenizer_shards,
                                                                    fault_rng, tally, case):
    tok, pristine = tiny_data
    d = tmp_path / "shards"
    shutil.copytree(pristine, d)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    named = _damage(case, d, fault_rng, outside, other_tokenizer_shards)
    out = tmp_path / "out"
    cfg_path = run_config(tmp_path / "run.yaml", tok, d, out, train={"max_steps": 2})
    err: BaseException | None = None
    try:
        train(load_config(cfg_path))
    except Exception as exc:  # the expected korcpt error, or a crash: counted first, asserted below
        err = exc
    print(f"[refused] {case}: {type(err).__name__}: {err}")
    crashes = int(err is not None and not isinstance(err, KorcptError))
    tally.add("damaged/hostile shards", faults_injected=1, bad_inputs=1, crashes=crashes)
    assert crashes == 0 and err is not None, repr(err)
    assert isinstance(err, ConfigError if case == "missing manifest" else DataError)
    assert str(named) in str(err) and ("manifest.json" in str(err) or named != d), (str(named), str(err))
    assert "\n" not in str(err)
    assert not (out / "samples").exists() and not (out / "checkpoints").exists()  # no step was taken
