"""The suite's seed, shared by conftest.py and the tests (``KORCPT_FAULT_SEED`` overrides it)."""

from __future__ import annotations

import os

DEFAULT_SEED = 20261126


def fault_seed() -> int:
    return int(os.environ.get("KORCPT_FAULT_SEED", DEFAULT_SEED))
