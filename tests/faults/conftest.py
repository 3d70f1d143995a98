"""Fault-injection suite: a seeded random source per test and a tally printed at the end of the run.

Every test draws what it injects from ``fault_rng`` (seeded by ``KORCPT_FAULT_SEED``, default below,
and the test's name), prints it, counts what happened (faults that landed, runs that completed,
sequences or bytes lost, exceptions of an unexpected type), adds those counts with ``tally.add(...)``
and only then asserts on them: the table shows what the tests measured, a failure included. The table
at the end of the session is the one ``tests/faults/README.md`` quotes:

    KORCPT_FAULT_SEED=7 .venv/bin/python -m pytest tests/faults -q -s
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from _faults import fault_seed

COLUMNS = ("faults_injected", "runs_recovered", "data_lost", "bad_inputs", "crashes")
_TALLY: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))


class Tally:
    """Counts per fault category, as the tests measured them; the tests assert ``data_lost`` and
    ``crashes`` are 0 after adding them."""

    def add(self, category: str, **counts: int) -> None:
        unknown = set(counts) - set(COLUMNS)
        assert not unknown, unknown
        row = _TALLY[category]
        for key, value in counts.items():
            row[key] += int(value)


@pytest.fixture
def tally() -> Tally:
    return Tally()


@pytest.fixture
def fault_rng(request) -> random.Random:
    """A random source seeded by the suite seed and the test's name (str seeds hash stably)."""
    seed = fault_seed()
    print(f"\n[fault seed] KORCPT_FAULT_SEED={seed} test={request.node.name}")
    return random.Random(f"{seed}:{request.node.name}")


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TALLY:
        return
    tr = terminalreporter
    tr.section(f"fault injection tally (KORCPT_FAULT_SEED={fault_seed()})")
    tr.write_line(f"{'category':<28}" + "".join(f"{c:>17}" for c in COLUMNS))
    total = dict.fromkeys(COLUMNS, 0)
    for category in sorted(_TALLY):
        row = _TALLY[category]
        tr.write_line(f"{category:<28}" + "".join(f"{row[c]:>17}" for c in COLUMNS))
        for c in COLUMNS:
            total[c] += row[c]
    tr.write_line(f"{'total':<28}" + "".join(f"{total[c]:>17}" for c in COLUMNS))
