"""bench/gpu.py: the CPU smoke run prints its table last, and the FLOP count matches the architecture;
bench/bench_scale.py: its smoke run prints its table last, the epoch a permutation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tinyrun import ROOT


def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_smoke_prints_the_table_last(tmp_path):
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--work", str(tmp_path),
                           "--peak-tflops", "0.05"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("side ") and "tokens/s" in line)
    rows = {line.split()[0]: line.split() for line in lines[header + 1:] if line.split()[0] in ("korcpt", "HF")}
    assert set(rows) == {"korcpt", "HF"}, lines[header:]
    for name, cols in rows.items():
        assert float(cols[1]) > 0, (name, cols)  # tokens/s
        assert cols[3].endswith("%") and float(cols[3][:-1]) > 0, (name, cols)  # MFU
        assert float(cols[4]) > 0, (name, cols)  # peak memory
    # both sides train the same parameters: LoRA plus the 64 new rows
    assert rows["korcpt"][5] == rows["HF"][5]
    assert lines[-1].startswith("peak mem:") and lines[-2].startswith("ratio korcpt / HF: tokens/s")
    assert all(line.startswith(("side", "korcpt", "HF", "ratio", "peak mem")) for line in lines[header:])


def test_flops_per_token_of_medgemma_4b_by_hand():
    gpu = _gpu_module()
    arch = gpu.arch_with_vocab(ROOT / "configs/models/medgemma-4b.json", None)
    rows, seq = 282_752, 2048
    f = gpu.flops_per_token(arch, rows, seq, r=16, new_rows=20_594)
    h, q, kv, inter, layers = 2560, 8 * 256, 4 * 256, 10240, 34
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    assert f["n_frozen"] == layers * per_layer + rows * h
    assert f["n_lora"] == layers * 16 * ((h + q) * 2 + 2 * (h + kv) + 3 * (h + inter)) == 29_802_496
    # 29 sliding layers (window 1024) and 5 full ones, 8 heads of 256
    sliding = (1024 * 1025 / 2 + (seq - 1024) * 1024) / seq
    attn = 4 * 8 * 256 * (29 * sliding + 5 * (seq + 1) / 2)
    assert abs(f["attention_fwd"] - attn) < 1e-6 * attn
    expected = 4 * f["n_frozen"] + 6 * f["n_lora"] + 2 * 20_594 * h + 3 * attn
    assert abs(f["total"] - expected) < 1e-9 * expected


def test_scale_bench_smoke_prints_the_table_last(tmp_path):
    if not (ROOT.parent / "shared" / "data" / "plain").is_dir():
        pytest.skip("the real sample data ../shared/data is absent (it lives beside the checkout)")
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--smoke", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scale ") and "permutation ok" in line)
    rows = [line.split() for line in lines[header + 1:]]
    assert [r[0] for r in rows] == ["1x", "2x"], lines[header:]
    for cols in rows:
        assert int(cols[1].replace(",", "")) == {"1x": 300, "2x": 600}[cols[0]], cols  # corpus documents
        assert int(cols[2].replace(",", "")) > 0 and float(cols[9]) > 0 and float(cols[10]) > 0, cols
        assert cols[-1] == "yes", cols  # the epoch was read as a permutation, each sequence once
    assert "(equal to the shards' count)" in proc.stdout  # bare tokenizer and shards counted the same tokens
    # each scale's files are deleted once measured; every stage's figures stay in results.jsonl
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
    stages = [json.loads(line)["stage"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert stages == ["corpus", "shards", "bare", "reader"] * 2, stages
