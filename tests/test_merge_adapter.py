"""tools/merge_adapter.py: the merged full model gives the adapter model's logits (new rows included)."""

from __future__ import annotations

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from korcpt.config import load_config
from korcpt.eval.loading import load_for_eval
from korcpt.train.loop import train
from tinyrun import ROOT, run_config, synthetic_corpus


def test_merged_model_reproduces_the_adapter(tmp_path, pretrained_tiny, tiny_data):
    corpus = synthetic_corpus(tmp_path / "corpus.jsonl")
    ext = tmp_path / "extended"
    subprocess.run([sys.executable, "tools/extend_tokenizer.py", "--base", str(pretrained_tiny), "--corpus", str(corpus),
                    "--max-new-tokens", "20", "--out", str(ext)], cwd=ROOT, check=True, capture_output=True)
    from korcpt.shards.writer import ShardOptions, write_shards

    shards = tmp_path / "shards"
    write_shards(corpus, shards, ShardOptions(tokenizer=str(ext), seq_len=64, val_fraction=0.1, workers=1))
    out = tmp_path / "out"
    train(load_config(run_config(tmp_path / "run.yaml", ext, shards, out,
                                 model={"name": str(pretrained_tiny), "tokenizer": str(ext), "random_init": False},
                                 lora={"embeddings": "new_tokens"}, train={"max_steps": 2}, eval={"steps": 0})))
    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/merge_adapter.py", "--model", str(pretrained_tiny), "--adapter",
                           str(out), "--out", str(merged_dir)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapted, tok = load_for_eval(str(pretrained_tiny), adapter=out)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    from transformers import AutoTokenizer

    base_len = len(AutoTokenizer.from_pretrained(pretrained_tiny))
    texts = [__import__("json").loads(line)["text"] for line in corpus.read_text().splitlines()[:20]]
    ids = torch.tensor([tok(texts[0])["input_ids"][:48]])
    assert (ids >= base_len).any()  # the text uses new tokens
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
