"""SIGKILL ``tools/build_shards.py`` (corpus stage + shards + webdataset tars) at seeded moments.

After every kill the half-written directory is opened as training would open it: either the
manifest is absent and :func:`open_shards` raises :class:`DataError` (never anything else), or the
manifest is present and every file it names verifies (SHA-256) -- a partial shard is never taken for
a complete one. Rerunning the same command after the kills gives a directory byte-identical to an
uninterrupted build (manifest, report, corpus, every shard, index and tar).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from korcpt.errors import DataError
from korcpt.shards import open_shards
from _faults import bytes_differing
from tinyrun import ROOT, synthetic_corpus

N_KILLS = 6
TIMEOUT = 600


def _command(corpus: Path, tok: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "build_shards.py"), "--korean", str(corpus), "--min-chars", "10",
            "--tokenizer", str(tok), "--seq-len", "32", "--shard-tokens", "2048", "--val-fraction", "0.1",
            "--workers", "2", "--format", "webdataset", "--out", str(out)]


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "ab") as fh:  # a session of its own: the kill takes the worker processes down too
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.is_file())


def _trigger(rng, ref_seconds: float) -> tuple[str, float]:
    kind = rng.choice(["time", "time", "first_shard", "shard_tmp", "wds_tmp", "report"])
    if kind == "time":
        return kind, round(rng.uniform(0.5, ref_seconds), 3)
    return kind, round(rng.uniform(0.0, 0.2), 3)


def _fired(kind: str, out: Path, since: int) -> bool:
    """Whether this run (started at ``since``, ns) has reached the moment ``kind``; files left by an
    earlier killed run do not count."""

    def new(paths) -> bool:
        try:
            for p in paths:
                try:
                    if p.stat().st_mtime_ns >= since:
                        return True
                except FileNotFoundError:  # renamed meanwhile
                    pass
        except FileNotFoundError:  # the directory being listed was removed meanwhile (a build starting afresh)
            pass
        return False

    if kind == "first_shard":  # the first shard file renamed into place
        return new([out / "train" / "shard-00000.bin"])
    if kind == "shard_tmp":  # a shard being written
        return new(p for s in ("train", "val") if (out / s).is_dir() for p in (out / s).glob(".shard-*.tmp"))
    if kind == "wds_tmp":  # a webdataset tar being written
        return (out / "wds").is_dir() and new((out / "wds").rglob(".*.tmp"))
    if kind == "report":  # report.json written (by the corpus stage, or by the shard stage just before the manifest)
        return new([out / "report.json"])
    return False


def _check_killed_dir(out: Path) -> str:
    """The killed directory is either refused cleanly or complete and verified; say which."""
    if not (out / "manifest.json").exists():
        with pytest.raises(DataError, match="manifest.json"):
            open_shards(out, "train")
        return "no manifest: refused (DataError)"
    for split in ("train", "val"):
        shards = open_shards(out, split, verify=True)  # every named file exists with its size and SHA-256
        if shards.num_sequences:
            shards.sample(shards.num_sequences - 1)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest.get("webdataset", []):
        from korcpt.shards.format import file_sha256

        assert file_sha256(out / entry["path"]) == entry["sha256"], entry["path"]
    return "manifest present: every shard verified"


def test_killed_build_shards_never_looks_complete_and_a_rerun_is_identical(tmp_path, tiny_data, fault_rng, tally):
    tok, _ = tiny_data
    corpus = synthetic_corpus(tmp_path / "korean.jsonl", n_docs=2500, seed=11)
    out = tmp_path / "out"  # the reference is built at the same path (the report names it), then removed

    t0 = time.monotonic()
    proc = _spawn(_command(corpus, tok, out), tmp_path / "ref.log")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_seconds = time.monotonic() - t0
    reference = _files(out)
    shutil.rmtree(out)
    assert "manifest.json" in reference and any(k.startswith("wds/") for k in reference)

    kills, outcomes = 0, []
    for attempt in range(N_KILLS * 3):
        if kills == N_KILLS:
            break
        kind, param = _trigger(fault_rng, ref_seconds)
        since = time.time_ns()
        proc = _spawn(_command(corpus, tok, out), tmp_path / "out.log")
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < TIMEOUT:
            if (kind == "time" and time.monotonic() - start >= param) or (kind != "time" and _fired(kind, out, since)):
                if kind != "time":
                    time.sleep(param)
                break
            time.sleep(0.002)
        if proc.poll() is not None:  # finished before the trigger: not a kill, try another moment
            assert proc.returncode == 0
            print(f"[not injected] {kind} {param}: build finished first")
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        state = _check_killed_dir(out)
        left = _leftovers(out)
        outcomes.append((kind, param, state))
        shards_on_disk = len(list(out.glob("*/shard-*.bin")))
        print(f"[injected] SIGKILL #{kills} at {kind} +{param}s ({time.monotonic() - start:.2f}s after start, "
              f"{shards_on_disk} shard files on disk): {state}; temporary files left: {len(left)}")

    proc = _spawn(_command(corpus, tok, out), tmp_path / "out.log")
    code = proc.wait(timeout=TIMEOUT)
    rebuilt = _files(out)
    stray = _leftovers(out)
    complete = {k: v for k, v in rebuilt.items() if k not in stray}
    differ = sorted(k for k in reference.keys() | complete.keys() if complete.get(k) != reference.get(k))
    lost = sum(bytes_differing(reference.get(k, b""), complete.get(k, b"")) for k in differ)
    print(f"[result] {kills} kills; rerun exit {code}; {len(reference)} files, {len(differ)} differing "
          f"({lost} bytes); stray temporary files after the rerun: {stray}")
    tally.add("SIGKILL during build_shards", faults_injected=kills, runs_recovered=kills if code == 0 else 0,
              data_lost=lost)
    assert kills == N_KILLS, outcomes
    assert code == 0, (tmp_path / "out.log").read_text()[-3000:]
    assert complete.keys() == reference.keys(), sorted(set(complete) ^ set(reference))
    assert not differ and lost == 0, differ


def test_rebuild_with_new_inputs_killed_early_never_pairs_the_new_corpus_with_old_shards(tmp_path, tiny_data,
                                                                                       fault_rng, tally):
    """Rebuilding into a complete directory from changed inputs, killed once the new corpus is written:
    a manifest left in place would declare the old shards complete beside a corpus they were not built
    from. Either no manifest, or one whose corpus SHA-256 is the corpus on disk."""
    from korcpt.shards.format import file_sha256

    tok, _ = tiny_data
    out = tmp_path / "out"
    first = synthetic_corpus(tmp_path / "a.jsonl", n_docs=400, seed=1)
    proc = _spawn(_command(first, tok, out), tmp_path / "a.log")
    assert proc.wait(timeout=TIMEOUT) == 0, (tmp_path / "a.log").read_text()[-3000:]
    kills = stale = 0
    for attempt in range(3):
        changed = synthetic_corpus(tmp_path / f"b{attempt}.jsonl", n_docs=400, seed=100 + attempt)
        delay = round(fault_rng.uniform(0.0, 0.05), 3)
        since = time.time_ns()
        proc = _spawn(_command(changed, tok, out), tmp_path / "b.log")
        while proc.poll() is None and not _fired_corpus(out, since):
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is not None:
            continue
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        manifest = out / "manifest.json"
        corpus_sha = file_sha256(out / "raw_text_mixed.jsonl")
        state = "no manifest" if not manifest.exists() else (
            "manifest matches the corpus" if json.loads(manifest.read_text())["corpus"]["sha256"] == corpus_sha
            else "STALE manifest: old shards declared complete beside the new corpus")
        print(f"[injected] SIGKILL {delay}s after the new corpus was written (inputs changed): {state}")
        stale += state.startswith("STALE")
        if not manifest.exists():
            with pytest.raises(DataError):
                open_shards(out, "train")
    # no rerun here, so no run is counted as recovered; a stale manifest pairs shards with the wrong corpus
    tally.add("SIGKILL during build_shards", faults_injected=kills, data_lost=stale)
    assert kills >= 1
    assert stale == 0


def _fired_corpus(out: Path, since: int) -> bool:
    try:
        return (out / "raw_text_mixed.jsonl").stat().st_mtime_ns >= since
    except FileNotFoundError:
        return False
