"""Training straight from a webdataset export: the same sequences per epoch as from the memory-mapped
directory, and a run over HTTP (a local server) killed with SIGKILL and resumed exactly."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from korcpt.config import load_config
from tinyrun import ROOT, run_config, step_ids, train_run

SLOW_LAUNCH = ROOT / "tests" / "faults" / "_slow_launch.py"
SERVER_LIFETIME = 600  # seconds: the server stops by itself even if a finalizer never runs
TRAIN_TARS = "wds/train/shard-{00000..00002}.tar"  # the tiny set's 3 train tars (64, 64, 34 windows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data) -> Path:
    """A copy of the tiny shard directory with its webdataset export, as tools/export_wds.py writes it."""
    from korcpt.shards.format import load_manifest
    from korcpt.shards.writer import add_webdataset

    out = tmp_path_factory.mktemp("wds") / "shards"
    shutil.copytree(tiny_data[1], out)
    add_webdataset(out, load_manifest(out))
    return out


def test_memmap_and_webdataset_runs_train_every_sequence_once_per_epoch(tmp_path, tiny_data, exported):
    """162 sequences, micro-batch 6 x accumulation 3: 9 steps an epoch take every sequence once, from
    the directory (a global shuffle) and from its tars (whole tars, shuffled within): nothing dropped."""
    sections = {"train": {"max_steps": 0, "epochs": 2, "micro_batch_size": 6, "grad_accum": 3}, "eval": {"steps": 0}}
    tok = tiny_data[0]
    mm_info, mm = train_run(tmp_path, (tok, tiny_data[1]), "memmap", **sections)
    wd_info, wd = train_run(tmp_path, (tok, f"file:{exported}/{TRAIN_TARS}"), "wds", **sections)
    epochs = {}
    for name, info, out in (("memmap", mm_info, mm), ("wds", wd_info, wd)):
        assert info["steps"] == 18 and info["plan"]["sequences_per_epoch"] == 162, name
        ids = [i for step in sorted(step_ids(out)) for i in step_ids(out)[step]]
        assert len(ids) == 2 * 162, name
        epochs[name] = [ids[:162], ids[162:]]
        for epoch in epochs[name]:
            assert sorted(epoch) == list(range(162)), name  # every sequence exactly once per epoch
    assert epochs["wds"][0] != epochs["wds"][1] and epochs["wds"][0] != epochs["memmap"][0]
    # validation from the val tars is the directory's: same sequences, same per-source split
    for key in ("val_loss", "val_loss_korean", "val_loss_medical_dict", "val_tokens"):
        assert wd_info["history"][0][key] == pytest.approx(mm_info["history"][0][key], rel=1e-6), key


class _Handler(SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, *args) -> None:  # quiet, and a record of what the runs fetched
        self.requested.append(self.path)


@pytest.fixture
def http_export(exported):
    """``http://127.0.0.1:PORT`` serving the export; shut down by the finalizer or after SERVER_LIFETIME."""
    requested: list[str] = []
    handler = functools.partial(type("Handler", (_Handler,), {"requested": requested}), directory=str(exported))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    timer = threading.Timer(SERVER_LIFETIME, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requested
    finally:
        timer.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_run_from_http_killed_after_a_checkpoint_resumes_exactly(tmp_path, tiny_data, http_export):
    url, requested = http_export
    shards = f"{url}/{TRAIN_TARS}"
    sections = {"train": {"max_steps": 6, "save_steps": 2, "keep_last": 3}, "eval": {"steps": 0}}
    _, whole = train_run(tmp_path, (tiny_data[0], shards), "whole", **sections)
    # the manifest first; then only the tars the run reached (24 sequences: the first tar of the order)
    assert requested[0] == "/manifest.json" and "/wds/val/shard-00000.tar" in requested
    assert len([p for p in requested if p.startswith("/wds/train/shard-0000")]) == 1

    cfg = run_config(tmp_path / "cut.yaml", tiny_data[0], shards, tmp_path / "cut", **sections)
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "KORCPT_FAULT_SAVE_DELAY": "0.5",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "cut.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(SLOW_LAUNCH), "--config", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    first = tmp_path / "cut/checkpoints/step-00000002/trainer_state.json"
    deadline = time.monotonic() + 300
    try:
        while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert first.is_file(), (tmp_path / "cut.log").read_text()[-2000:]
    assert not (tmp_path / "cut/training_info.json").exists()  # killed mid-run, not after it
    killed_at = json.loads(first.read_text())["stream"]
    assert killed_at == {"seed": 3, "epoch": 0, "consumed": 8, "num_sequences": 162, "readers": 1}

    info, cut = train_run(tmp_path, (tiny_data[0], shards), "cut", resume="auto", **sections)
    assert info["steps"] == 6
    assert step_ids(cut) == step_ids(whole) and len(step_ids(whole)) == 6
    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(cut / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # another process (thread count) wrote the checkpoint: equal up to float reassociation
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_config_accepts_a_url_source_without_a_local_manifest(tmp_path, tiny_data):
    from korcpt.config import stream_source, validate

    for value in ("https://host/x/wds/train/shard-{00000..00002}.tar", "pipe:aws s3 cp s3://b/x/wds/train/a.tar -",
                  "file:/nowhere/wds/train/shard-00000.tar"):
        assert stream_source(value)
        cfg = load_config(run_config(tmp_path / "url.yaml", tiny_data[0], value, tmp_path / "out"), check_files=False)
        assert not [p for p in validate(cfg) if p.startswith("data.shards")], value
    cfg = load_config(run_config(tmp_path / "dir.yaml", tiny_data[0], tmp_path / "missing", tmp_path / "out"),
                      check_files=False)
    assert not stream_source(str(tmp_path / "missing"))
    assert [p for p in validate(cfg) if p.startswith("data.shards")] == [
        f"data.shards: no manifest.json in {tmp_path / 'missing'} (build it with tools/build_shards.py --out "
        f"{tmp_path / 'missing'})"]
