"""What a run hands on: the adapter directory loads with PEFT alone; the installed package reads every corpus input."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- packaging

def _unconditional(requirements: list[str]) -> set[str]:
    """Names of the requirements without an environment marker (no ``extra == ...``)."""
    return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requirements if ";" not in r}


def test_pyproject_declares_datasets_as_a_dependency():
    # The corpus readers open save_to_disk arrow folders with `datasets`: a test-only extra left plain installs short.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "datasets" in _unconditional(project["dependencies"])


def test_installed_korcpt_requires_datasets_without_an_extra():
    requires = importlib.metadata.requires("korcpt") or []
    assert "datasets" in _unconditional(requires), f"found {requires} (reinstall: pip install -e .)"
