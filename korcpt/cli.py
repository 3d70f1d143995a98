"""Conventions shared by every command-line tool: one-line errors, exit codes, and options built from
the config and options dataclasses (:func:`add_options`, :func:`from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from korcpt.config import ModelConfig, field_docs
from korcpt.errors import KorcptError

T = TypeVar("T")

EXIT_USER_ERROR = 2


def run_tool(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a tool's ``main``; turn a :class:`KorcptError` into ``error: ...`` on stderr and exit 2."""
    try:
        return int(main(argv) or 0)
    except KorcptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def add_options(ap: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *names: str,
                **custom: dict[str, Any]) -> None:
    """Add one option for each field ``names`` of dataclass ``cls``, its ``dest`` the field's name.

    Taken from the field: the flag (``--field-name``), the default (a field without one is required),
    the help (its attribute docstring, :func:`korcpt.config.field_docs`, then the default), the type
    (int, float, Path; a list or tuple of Paths takes one or more), the choices of a ``Literal``, and for a
    bool a switch away from the default (``--name`` when it is False, ``--no-name`` when True).
    ``custom[name]`` holds ``add_argument`` keywords that replace the derived ones for that field, and
    ``flag``, the option string when it is not ``--field-name``.
    """
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        field, hint = fields[name], hints[name]
        kw: dict[str, Any] = {"dest": name}
        if field.default is not dataclasses.MISSING:
            kw["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kw["default"] = field.default_factory()
        else:
            kw["required"] = True
        flag = f"--{name.replace('_', '-')}"
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            kw["action"] = "store_false" if kw.get("default") else "store_true"
            flag = f"--no-{name.replace('_', '-')}" if kw.get("default") else flag
        elif origin is Literal:
            kw["choices"] = list(args)
        elif origin in (list, tuple):
            kw.update(nargs="+", type=args[0], metavar="PATH" if args[0] is Path else None)
        else:
            arms = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
            if len(arms) == 1 and arms[0] in (int, float, Path):
                kw["type"] = arms[0]
        kw.update(custom.get(name, {}))
        help_text = kw.get("help") or docs.get(name, "").replace("%", "%%")
        if kw.get("action") == "store_false" and "help" not in custom.get(name, {}):
            help_text = f"turn off: {help_text}"
        if kw.get("default") not in (None, (), []) and kw.get("action") not in ("store_true", "store_false") \
                and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        kw["help"] = help_text
        ap.add_argument(kw.pop("flag", flag), **kw)


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """An instance of dataclass ``cls`` from the parsed options named like its fields (lists become
    tuples where the field is a tuple), and ``given``."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            tuple_field = typing.get_origin(hints[f.name]) is tuple
            values[f.name] = tuple(value) if tuple_field and isinstance(value, list) else value
    return cls(**{**values, **given})


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the model an evaluation tool scores: --model, --adapter, --tokenizer, --new-rows, --dtype, --device."""
    ap.add_argument("--model", required=True, help="preset (gemma3-270m, medgemma-4b, ...), model directory, .gguf or hub id")
    ap.add_argument("--adapter", type=Path, help="trained adapter directory (its tokenizer/ is used when present)")
    ap.add_argument("--tokenizer", help="tokenizer directory or preset (default: ADAPTER/tokenizer, else the model's)")
    ap.add_argument("--new-rows", help="distilled rows of the tokenizer's new tokens (tools/distill_rows.py), "
                                       "for an untrained extended model")
    add_options(ap, ModelConfig, "dtype")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda if available)")


def emit_report(report: dict, out: Path | None, summary: str) -> None:
    """A tool's result: ``summary`` on stderr; the JSON report to ``out``, or to stdout without one."""
    text = json.dumps(report, ensure_ascii=False, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(summary, file=sys.stderr)
    if not out:
        print(text)


def _close_process_group() -> None:
    """Destroy a process group the run left open (an error path, or a tool that never ends one).

    A process that exits with its gloo/NCCL group alive can abort during interpreter shutdown
    ('terminate called without an active exception', pytorch/pytorch#190489) and turn exit 2 into SIGABRT.
    """
    if "torch" not in sys.modules:  # never import torch just to find nothing to close
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
