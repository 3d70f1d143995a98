"""Shards that must not be trusted fail on open with the file named; the tools turn that into one line + exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from korcpt.errors import DataError
from korcpt.shards import ShardOptions, open_shards, write_shards
from test_shards import make_corpus, make_tokenizer

from tinyrun import ROOT


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    records = make_corpus(root / "corpus.jsonl", n=60)
    make_tokenizer(root / "tok", [r["text"] for r in records])
    write_shards(root / "corpus.jsonl", root / "out",
                 ShardOptions(tokenizer=str(root / "tok"), seq_len=8, val_fraction=0.2, shard_tokens=200, workers=1,
                              webdataset=True))
    return root


@pytest.fixture
def copy(pristine, tmp_path):
    """A fresh copy of the shard directory to damage, and its manifest."""
    shutil.copytree(pristine / "out", tmp_path / "out")
    return tmp_path / "out", json.loads((tmp_path / "out" / "manifest.json").read_text())


def rewrite(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def expect_error(directory: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        open_shards(directory, kwargs.pop("split", "train"), **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_pristine_set_opens(copy):
    directory, manifest = copy
    shards = open_shards(directory, "train", tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"], seq_len=8)
    assert shards.num_sequences == manifest["counts"]["train"]["sequences"] > 10


def test_truncated_shard_names_the_file(copy):
    directory, manifest = copy
    path = directory / manifest["shards"][1]["path"]
    os.truncate(path, path.stat().st_size - 2)
    expect_error(directory, str(path), "truncated", verify=False)


def test_flipped_byte_fails_the_checksum_naming_the_file(copy):
    directory, manifest = copy
    path = directory / manifest["shards"][0]["path"]
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    expect_error(directory, str(path), "SHA-256", manifest["shards"][0]["sha256"])
    open_shards(directory, "train", verify=False)  # sizes alone cannot see it: that is what verify is for


def test_flipped_byte_in_an_index_fails_too(copy):
    directory, manifest = copy
    path = directory / manifest["shards"][0]["index"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    expect_error(directory, str(path), "SHA-256")


def test_missing_shard_and_missing_manifest(copy):
    directory, manifest = copy
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    (directory / val["path"]).unlink()
    expect_error(directory, str(directory / val["path"]), "missing", split="val")
    (directory / "manifest.json").unlink()
    expect_error(directory, "manifest.json", "not a complete shard directory")


def test_manifest_from_another_tokenizer_dtype_or_length(copy):
    directory, manifest = copy
    expect_error(directory, "manifest.json", "fingerprint", "sha256:0000", tokenizer_fingerprint="sha256:0000")
    expect_error(directory, "manifest.json", "seq_len 8, expected 16", seq_len=16)
    rewrite(directory, {**manifest, "dtype": "uint32"})  # same files read as uint32: every size is wrong
    expect_error(directory, manifest["shards"][0]["path"], "expected", "uint32", verify=False)
    rewrite(directory, {**manifest, "dtype": "int8"})
    expect_error(directory, "manifest.json", "dtype 'int8'")
    rewrite(directory, {**manifest, "format_version": 99})
    expect_error(directory, "manifest.json", "format_version 99, expected 1")


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "train/../../outside.bin"])
def test_paths_that_leave_the_directory_are_refused(copy, bad):
    directory, manifest = copy
    shards = [dict(s) for s in manifest["shards"]]
    shards[0]["path"] = bad
    rewrite(directory, {**manifest, "shards": shards})
    expect_error(directory, "manifest.json", bad, verify=False)


def test_symlink_out_of_the_directory_is_refused(copy, tmp_path):
    directory, manifest = copy
    target = directory / manifest["shards"][0]["path"]
    outside = tmp_path / "elsewhere.bin"
    shutil.move(target, outside)
    target.symlink_to(outside)
    expect_error(directory, "outside the shard directory", verify=False)


def test_webdataset_pipe_url(pristine):
    """The same tars through ``pipe:cat`` as through ``file:`` (the manifest fetched by the pipe too)."""
    from korcpt.shards.wds import open_webdataset

    out = pristine / "out"
    n = sum(1 for e in json.loads((out / "manifest.json").read_text())["webdataset"] if e["split"] == "train")
    pattern = f"wds/train/shard-{{00000..{n - 1:05d}}}.tar"
    plain, piped = (open_webdataset(f"file:{out}/{pattern}", "val"), open_webdataset(f"pipe:cat {out}/{pattern}", "val"))
    assert piped.urls[0] == f"pipe:cat {out}/wds/val/shard-00000.tar"
    a = [d["input_ids"].tolist() for d in map(plain.sample, range(plain.num_sequences))]
    b = [d["input_ids"].tolist() for d in map(piped.sample, range(piped.num_sequences))]
    assert a == b and len(a) == open_shards(out, "val", verify=False).num_sequences > 0
    with pytest.raises(DataError, match="cannot read"):
        open_webdataset(f"pipe:cat {out}/missing/{pattern}", "train")


# ---------------------------------------------------------------- the tools


def tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_build_and_inspect_tools(pristine, tmp_path):
    out = tmp_path / "cli"
    proc = tool("tools/build_shards.py", "--from-jsonl", str(pristine / "corpus.jsonl"), "--tokenizer",
                str(pristine / "tok"), "--out", str(out), "--seq-len", "8", "--shard-tokens", "200",
                "--val-fraction", "0.2", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    built, reference = (json.loads((d / "manifest.json").read_text()) for d in (out, pristine / "out"))
    assert built["shards"] == reference["shards"] and "webdataset" not in built  # same bytes as the library call
    proc = tool("tools/export_wds.py", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["webdataset"] == reference["webdataset"]
    report = json.loads((out / "report.json").read_text())["tokens"]
    assert report["documents"] == sum(report["by_source"][s]["documents"] for s in report["by_source"]) > 0
    proc = tool("tools/inspect_shards.py", str(out), "--sample", "0", "--sample", "3")
    assert proc.returncode == 0, proc.stderr
    assert "SHA-256 OK" in proc.stdout and "== train sample 3" in proc.stdout and "<bos>" in proc.stdout


def test_tools_fail_with_one_line(pristine, tmp_path):
    one_line_error(tool("tools/build_shards.py", "--from-jsonl", str(tmp_path / "none.jsonl"), "--tokenizer",
                        str(pristine / "tok"), "--out", str(tmp_path / "o")), "none.jsonl", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "좋은 문서"}\n{"title": "no text"}\n', encoding="utf-8")
    one_line_error(tool("tools/build_shards.py", "--from-jsonl", str(bad), "--tokenizer", str(pristine / "tok"),
                        "--out", str(tmp_path / "o"), "--workers", "2"), f"{bad}:2", '"text"')
    assert not (tmp_path / "o" / "manifest.json").exists()
    one_line_error(tool("tools/build_shards.py", "--from-jsonl", str(pristine / "corpus.jsonl"), "--tokenizer",
                        str(pristine / "tok"), "--out", str(tmp_path / "o"), "--seq-len", "100000"),
                   "fewer than one window")
    one_line_error(tool("tools/build_shards.py", "--from-jsonl", str(pristine / "corpus.jsonl"), "--tokenizer",
                        str(pristine / "tok"), "--out", str(tmp_path / "o"), "--val-fraction", "1.5"), "val_fraction")
    damaged = tmp_path / "damaged"
    shutil.copytree(pristine / "out", damaged)
    shard = damaged / "train" / "shard-00001.bin"
    os.truncate(shard, 3)
    one_line_error(tool("tools/inspect_shards.py", str(damaged)), str(shard))
    one_line_error(tool("tools/inspect_shards.py", str(pristine / "out"), "--sample", "99999"), "--sample 99999")


# ---------------------------------------------------------------- the writer object and the stage's imports


def test_an_exception_inside_the_writer_leaves_no_manifest_and_no_shard(pristine, tmp_path):
    from korcpt.shards.documents import LineChunks
    from korcpt.shards.encode import Encoder, load_pack_tokenizer
    from korcpt.shards.writer import ShardWriter

    out = tmp_path / "out"
    shutil.copytree(pristine / "out", out)  # a complete earlier set: opening the writer replaces it
    tokenizer = load_pack_tokenizer(str(pristine / "tok"))
    with pytest.raises(RuntimeError, match="stop"):
        with ShardWriter(out, tokenizer.dtype, seq_len=8, shard_tokens=200) as writer:
            assert not (out / "manifest.json").exists()
            Encoder(tokenizer, seed=0, val_fraction=0.2, workers=1).encode(LineChunks(pristine / "corpus.jsonl"),
                                                                           writer.add)
            assert len(list(out.glob("*/shard-*.bin"))) > 4  # shards were written before the failure
            raise RuntimeError("stop")
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*/shard-*")) and not list(out.glob("*/.shard-*.tmp")) and not (out / "wds").exists()
