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
