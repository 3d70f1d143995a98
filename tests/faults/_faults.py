"""The suite's seed, shared by conftest.py and the tests (``KORCPT_FAULT_SEED`` overrides it), and the
tally the tests fill (``tests/conftest.py`` prints it, merged from every pytest-xdist worker)."""

from __future__ import annotations

import os
from collections import defaultdict

DEFAULT_SEED = 20261126
COLUMNS = ("faults_injected", "runs_recovered", "data_lost", "bad_inputs", "crashes")
# category -> column -> count, as this process's tests measured them
TALLY: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COLUMNS, 0))


def add_counts(category: str, counts: dict[str, int]) -> None:
    unknown = set(counts) - set(COLUMNS)
    assert not unknown, unknown
    row = TALLY[category]
    for key, value in counts.items():
        row[key] += int(value)


def tally_lines() -> list[str]:
    """The tally as the table ``tests/faults/README.md`` quotes (no lines when nothing was counted)."""
    if not TALLY:
        return []
    lines = [f"{'category':<28}" + "".join(f"{c:>17}" for c in COLUMNS)]
    total = dict.fromkeys(COLUMNS, 0)
    for category in sorted(TALLY):
        row = TALLY[category]
        lines.append(f"{category:<28}" + "".join(f"{row[c]:>17}" for c in COLUMNS))
        for c in COLUMNS:
            total[c] += row[c]
    return lines + [f"{'total':<28}" + "".join(f"{total[c]:>17}" for c in COLUMNS)]


def fault_seed() -> int:
    return int(os.environ.get("KORCPT_FAULT_SEED", DEFAULT_SEED))


def sequences_lost(reference: dict[int, list[int]], got: dict[int, list[int]]) -> int:
    """Sequences the uninterrupted run trained that ``got`` skipped, plus those ``got`` trained more
    often (both map step -> sequence ids, deduplicated by step)."""
    from collections import Counter

    want = Counter(i for ids in reference.values() for i in ids)
    seen = Counter(i for ids in got.values() for i in ids)
    return sum((want - seen).values()) + sum((seen - want).values())


def entries_differing(reference: dict, got: dict) -> int:
    """Tensor entries of ``got`` that differ from ``reference`` (a missing, extra or reshaped tensor
    counts whole)."""
    n = 0
    for key in reference.keys() | got.keys():
        a, b = reference.get(key), got.get(key)
        if a is None or b is None or a.shape != b.shape:
            n += (a if b is None or a is not None else b).numel()
        else:
            n += int((a != b).sum())
    return n


def raised(fn) -> Exception | None:
    """Call ``fn``; the exception it raised, or None. A test counts the outcome (an unexpected type is a
    crash) and adds it to the tally before asserting on it."""
    try:
        fn()
    except Exception as exc:  # any type: the caller tells the expected one from a crash
        return exc
    return None


def bytes_differing(a: bytes, b: bytes) -> int:
    """Bytes at which two contents differ, a difference in length counted in full."""
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
