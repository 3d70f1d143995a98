import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "faults"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `make test` runs the files on one pytest-xdist worker per core: each worker's torch (and each process
    # it starts) gets its share of the cores; more threads than cores make every step several times slower
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_sessionfinish(session) -> None:
    from _faults import TALLY
    from tinyrun import LAUNCHES

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: hand what its tests counted to the controller
        workeroutput["launches"] = dict(LAUNCHES)
        workeroutput["tally"] = {category: dict(row) for category, row in TALLY.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's controller: add a finished worker's counts to this process's."""
    from _faults import add_counts
    from tinyrun import LAUNCHES

    for mode, n in node.workeroutput.get("launches", {}).items():
        LAUNCHES[mode] = LAUNCHES.get(mode, 0) + n
    for category, counts in node.workeroutput.get("tally", {}).items():
        add_counts(category, counts)


def pytest_terminal_summary(terminalreporter) -> None:
    from _faults import fault_seed, tally_lines
    from tinyrun import LAUNCHES

    if LAUNCHES:  # what the launched-run helper started: the figure issue 24 reduces
        terminalreporter.write_line("launched training processes: " + ", ".join(f"{m} {n}" for m, n in LAUNCHES.items()))
    lines = tally_lines()
    if lines:
        terminalreporter.section(f"fault injection tally (KORCPT_FAULT_SEED={fault_seed()})")
        for line in lines:
            terminalreporter.write_line(line)


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
