import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): a tiny tokenizer and shards built once per test session."""
    from tinyrun import build_tiny_data

    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory, tiny_data) -> Path:
    """A tiny Gemma 3 saved as a pretrained directory with its tokenizer, so every run (ZeRO-3 init
    included) starts from the same weights, and vocabulary extension has a base model to grow."""
    import torch
    from transformers import AutoTokenizer

    from korcpt.config import ModelConfig
    from korcpt.model.load import build_random_model

    tok = AutoTokenizer.from_pretrained(tiny_data[0])
    mcfg = ModelConfig(name=str(ROOT / "configs/models/tiny_gemma3.json"), random_init=True,
                       attn_implementation="eager")
    model = build_random_model(mcfg, len(tok), torch.float32, seed=5)
    out = tmp_path_factory.mktemp("pretrained") / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def extended_tiny(tmp_path_factory, pretrained_tiny) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): pretrained_tiny's tokenizer extended with 40 tokens learned from the
    synthetic corpus, and shards of that corpus built with it (for ``lora.embeddings: new_tokens``)."""
    import json

    from transformers import AutoTokenizer

    from korcpt.shards.writer import ShardOptions, write_shards
    from korcpt.vocab.extend import build_extended_tokenizer, learn_extension
    from tinyrun import synthetic_corpus

    root = tmp_path_factory.mktemp("extended")
    corpus = synthetic_corpus(root / "corpus.jsonl")
    base = AutoTokenizer.from_pretrained(pretrained_tiny)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tok_dir = root / "tokenizer"
    build_extended_tokenizer(base, learn_extension(base, texts, max_new_tokens=40), tok_dir)
    shards = root / "shards"
    write_shards(corpus, shards, ShardOptions(tokenizer=str(tok_dir), seq_len=64, val_fraction=0.1,
                                              shard_tokens=4096, seed=1, workers=1))
    return tok_dir, shards
