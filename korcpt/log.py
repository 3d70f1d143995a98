"""The one logger and the one progress bar of korcpt.

Under distributed runs only rank 0 logs at INFO and shows progress; other ranks log warnings only,
so that eight GPUs do not print eight copies of every line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_LOGGER_NAME = "korcpt"


def rank() -> int:
    """This process's global rank as set by the launcher (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def get_logger(name: str | None = None) -> logging.Logger:
    """The korcpt logger (or a child of it); configured once, on first use."""
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
    return root if name is None else root.getChild(name.removeprefix(f"{_LOGGER_NAME}."))


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 of an interactive run; silent elsewhere (other ranks, CI logs)."""
    disable = kwargs.pop("disable", False) or not is_main_process() or os.environ.get("KORCPT_NO_PROGRESS") == "1"
    return tqdm(iterable, disable=disable, dynamic_ncols=True, mininterval=1.0, **kwargs)
