import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter) -> None:
    from tinyrun import LAUNCHES

    if LAUNCHES:  # what the launched-run helper started: the figure issue 24 reduces
        terminalreporter.write_line("launched training processes: " + ", ".join(f"{m} {n}" for m, n in LAUNCHES.items()))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): a tiny tokenizer and shards built once per test session."""
    from tinyrun import build_tiny_data

    return build_tiny_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory, tiny_data) -> Path:
    """A tiny Gemma 3 saved as a pretrained directory with its tokenizer, so every run (ZeRO-3 init
    included) starts from the same weights, and vocabulary extension has a base model to grow."""
    from tinyrun import build_pretrained_tiny

    return build_pretrained_tiny(tmp_path_factory.mktemp("pretrained"), tiny_data[0])


@pytest.fixture(scope="session")
def pretrained_tiny_mm(tmp_path_factory, tiny_data) -> Path:
    """The same as a tiny Gemma3ForConditionalGeneration (MedGemma 4B's class: vision tower included)."""
    from tinyrun import build_pretrained_tiny

    return build_pretrained_tiny(tmp_path_factory.mktemp("pretrained_mm"), tiny_data[0], multimodal=True)


@pytest.fixture(scope="session")
def extended_tiny(tmp_path_factory, pretrained_tiny) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): pretrained_tiny's tokenizer extended with 40 tokens learned from the
    synthetic corpus, and shards of that corpus built with it (for ``lora.embeddings: new_tokens``)."""
    from tinyrun import build_extended_tiny

    return build_extended_tiny(tmp_path_factory.mktemp("extended"), pretrained_tiny)


@pytest.fixture(scope="session")
def distilled_tiny(tmp_path_factory, pretrained_tiny, extended_tiny) -> Path:
    """Rows of extended_tiny's new tokens distilled from pretrained_tiny (tools/distill_rows.py's stage):
    distinct input and output rows, so a run started from them has an untied new-token head."""
    from korcpt.model.distill import DistillOptions, distill_rows

    tok = extended_tiny[0]
    out = tmp_path_factory.mktemp("distilled_tiny") / "rows"
    distill_rows(DistillOptions(model=str(pretrained_tiny), tokenizer=tok, corpus=tok.parent / "corpus.jsonl",
                                out_dir=out, contexts_per_token=4, context_tokens=24, epochs=3, lr=0.002, depth=1.0,
                                output="ntp", output_steps=20, attn_implementation="eager"))
    return out
