"""Fault-injection suite: a seeded random source per test and a tally printed at the end of the run.

Every test draws what it injects from ``fault_rng`` (seeded by ``KORCPT_FAULT_SEED``, default in _faults.py,
and the test's name), prints it, counts what happened (faults that landed, runs that completed,
sequences or bytes lost, exceptions of an unexpected type), adds those counts with ``tally.add(...)``
and only then asserts on them: the table shows what the tests measured, a failure included. The table
at the end of the session (printed by ``tests/conftest.py``) is the one ``tests/faults/README.md`` quotes:

    KORCPT_FAULT_SEED=7 .venv/bin/python -m pytest tests/faults -q -s
"""

from __future__ import annotations

import random

import pytest

from _faults import add_counts, fault_seed


class Tally:
    """Counts per fault category, as the tests measured them; the tests assert ``data_lost`` and
    ``crashes`` are 0 after adding them."""

    def add(self, category: str, **counts: int) -> None:
        add_counts(category, counts)


@pytest.fixture
def tally() -> Tally:
    return Tally()


@pytest.fixture
def fault_rng(request) -> random.Random:
    """A random source seeded by the suite seed and the test's name (str seeds hash stably)."""
    seed = fault_seed()
    print(f"\n[fault seed] KORCPT_FAULT_SEED={seed} test={request.node.name}")
    return random.Random(f"{seed}:{request.node.name}")
