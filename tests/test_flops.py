"""One FLOPs-per-token count: training_info.json's MFU is bench/gpu.py's for the same configuration
(model, sequence length, vocabulary, LoRA, peak), compared number for number on a tiny CPU run."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import AutoTokenizer

from korcpt.model.load import padded_vocab
from tinyrun import ROOT, train_run

PEAK_TFLOPS = 0.05


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_flops", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_info_mfu_is_the_gpu_bench_mfu(tmp_path, pretrained_tiny, extended_tiny):
    tok, shards = extended_tiny
    seq_len, micro, accum, r = 64, 2, 2, 4
    info, out = train_run(tmp_path, (tok, shards), "mfu", model={"name": str(pretrained_tiny), "random_init": False},
                          lora={"r": r, "embeddings": "new_tokens"}, eval={"steps": 0},
                          train={"max_steps": 3, "micro_batch_size": micro, "grad_accum": accum,
                                 "peak_tflops": PEAK_TFLOPS})
    on_disk = json.loads((out / "training_info.json").read_text())
    assert on_disk["mfu"] == info["mfu"] and on_disk["flops_per_token"] == info["flops_per_token"]

    # bench/gpu.py's inputs for the same run: the architecture file, padded rows, new rows, r, S
    gpu = _gpu_bench()
    base, extended = len(AutoTokenizer.from_pretrained(pretrained_tiny)), len(AutoTokenizer.from_pretrained(tok))
    arch = gpu.arch_with_vocab(ROOT / "configs/models/tiny_gemma3.json", None)
    flops = gpu.flops_per_token(arch, padded_vocab(extended), seq_len, r, new_rows=extended - base)
    assert extended - base == info["new_tokens"] > 0
    assert info["flops_per_token"] == flops["total"] > 0

    # the bench's MFU of a side: processed tokens (steps x micro x accumulation x S) over the train seconds
    processed = info["steps"] * micro * accum * seq_len
    seconds = info["tokens_seen"] / info["tokens_per_sec"]  # unrounded (training_info rounds train_seconds)
    bench_mfu = gpu.side_mfu(flops, processed, seconds, gpu.peak_flops(None, PEAK_TFLOPS))
    assert info["steps"] == 3 and info["peak_tflops"] == PEAK_TFLOPS
    assert info["mfu"] == pytest.approx(bench_mfu, rel=1e-12) and 0 < info["mfu"]
    print(f"flops_per_token {info['flops_per_token']:.6g}; MFU training_info {info['mfu']:.6%}, bench {bench_mfu:.6%}")


def test_flops_follow_the_convention_of_bench_readme(pretrained_tiny):
    """The count on the loaded model equals the one on the meta model of its architecture, and its
    parts follow bench/README.md's formula (sliding windows and LoRA counted)."""
    import torch

    from korcpt.config import LoraConfig
    from korcpt.model.flops import arch_flops_per_token, lora_flops_per_token, trained_head_rows
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained_tiny, dtype=torch.float32)
    rows, seq = model.get_input_embeddings().weight.shape[0], 128  # beyond the window of 64
    lcfg = LoraConfig(r=4, embeddings="full")
    live = lora_flops_per_token(model, lcfg, seq, trained_head_rows(model, lcfg, []))
    arch = json.loads((ROOT / "configs/models/tiny_gemma3.json").read_text())
    assert live == arch_flops_per_token(arch, rows, seq, 4, new_rows=rows)
    text = model.config.get_text_config()
    window = min(text.sliding_window, seq)
    contexts = [(window * (window + 1) / 2 + (seq - window) * window) / seq if t == "sliding_attention" else (seq + 1) / 2
                for t in text.layer_types[: text.num_hidden_layers]]
    attention = sum(4 * text.num_attention_heads * text.head_dim * c for c in contexts)
    assert live["attention_fwd"] == pytest.approx(attention, rel=1e-12)
    assert live["total"] == pytest.approx(4 * live["n_frozen"] + 6 * live["n_lora"] + 2 * rows * text.hidden_size
                                          + 3 * attention, rel=1e-12)
