"""An extended tokenizer flows through build_shards.py and a tiny training run with
`lora.embeddings: new_tokens`: afterwards only the new rows (and LoRA weights) differ from the base."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from korcpt.config import load_config
from korcpt.train.loop import train
from tinyrun import ROOT, run_config, synthetic_corpus


def test_extended_vocabulary_trains_only_new_rows(tmp_path, pretrained_tiny):
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    ext = tmp_path / "extended"
    subprocess.run([sys.executable, "tools/extend_tokenizer.py", "--base", str(pretrained_tiny), "--corpus",
                    str(corpus), "--max-new-tokens", "40", "--out", str(ext)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    base_tok, new_tok = AutoTokenizer.from_pretrained(pretrained_tiny), AutoTokenizer.from_pretrained(ext)
    assert len(new_tok) > len(base_tok)
    shards = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "tools/build_shards.py", "--from-jsonl", str(corpus), "--tokenizer", str(ext),
                           "--seq-len", "64", "--val-fraction", "0.1", "--workers", "1", "--out", str(shards)],
                          cwd=ROOT, capture_output=True, text=True, env={"KORCPT_NO_PROGRESS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = [t for p in sorted((shards / "train").glob("*.bin")) for t in
              __import__("numpy").fromfile(p, dtype=json.loads((shards / "manifest.json").read_text())["dtype"])]
    new_share = sum(t >= len(base_tok) for t in tokens) / len(tokens)
    assert new_share > 0.05  # the new tokens are really used in the packed data

    out = tmp_path / "out"
    cfg = load_config(run_config(tmp_path / "run.yaml", ext, shards, out,
                                 model={"name": str(pretrained_tiny), "tokenizer": str(ext), "random_init": False},
                                 lora={"embeddings": "new_tokens", "embedding_lr": 0.01},
                                 train={"max_steps": 3, "loss_chunk_tokens": 32}, eval={"steps": 0}))
    info = train(cfg)
    assert info["new_tokens"] == len(new_tok) - len(base_tok)
    saved = load_file(str(out / "adapter_model.safetensors"))
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    config = json.loads((out / "adapter_config.json").read_text())
    ids = config["trainable_token_indices"]["embed_tokens"]
    assert ids == list(range(len(base_tok), len(new_tok))) and rows.shape[0] == len(ids)

    # the base model grown for the extended tokenizer (what training started from): new rows moved, no other row did
    from korcpt.model.embeddings import resize_and_init_embeddings

    grown = AutoModelForCausalLM.from_pretrained(pretrained_tiny)
    original = grown.get_input_embeddings().weight.detach().clone()
    resize_and_init_embeddings(grown, base_tok, new_tok, pad_to_multiple_of=64)
    start = grown.get_input_embeddings().weight.detach()[ids]
    assert not torch.equal(rows, start)
    assert torch.equal(grown.get_input_embeddings().weight.detach()[: len(base_tok)], original[: len(base_tok)])
    lora = [k for k in saved if "lora_B" in k]
    assert lora and all(saved[k].abs().sum() > 0 for k in lora)
