"""Would a maintained library replace korcpt's YAML/override/coercion code (korcpt/config.py) with less?

    .venv/bin/python bench/bench_config_libs.py        # needs: pip install omegaconf jsonargparse

Each contender loads the real :class:`~korcpt.config.RunConfig` from a YAML file plus ``section.key=value``
overrides and hands the result to korcpt's :func:`~korcpt.config.validate` (the ranges and cross-field
rules stay korcpt's whichever parser reads the file):

* **korcpt**: :func:`korcpt.config.load_config`.
* **OmegaConf** structured config: ``OmegaConf.merge(structured(RunConfig), load(path), from_dotlist(...))``.
* **jsonargparse**: ``add_class_arguments(RunConfig)`` with an ``ActionConfigFile``; overrides as ``--train.lr=...``.

tyro is left out: it builds dataclasses from command lines but reads no YAML file, so the file would still
go through code like korcpt's.

Measured per contender: the lines of code that load, override and type-check (non-blank source lines of
the functions listed in ``KORCPT_CODE`` for korcpt, of the adapter below for a library), and, for each
bad value of the parametrised cases of ``tests/test_config.py``, whether the error is one line and names
the key, the file and the value found; how many of three wrong types in one file the error reports; and
whether a YAML syntax error is one line naming the file and the line. The "one line" variants wrap the
library in the cheapest fix: its message flattened onto one line after the file.
"""

from __future__ import annotations

import inspect
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from korcpt import config as kc  # noqa: E402
from korcpt.config import RunConfig, validate  # noqa: E402
from korcpt.errors import ConfigError  # noqa: E402

# (values written into the YAML file, key the error must name, value it must show): tests/test_config.py's
# parametrised cases of test_bad_values_name_the_key_and_the_file
CASES = [
    ({"train": {"lrr": 1}}, "train.lrr", "lrr"),
    ({"trian": {"lr": 1}}, "trian", "trian"),
    ({"train": {"lr": "fast"}}, "train.lr", "fast"),
    ({"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size", "2.5"),
    ({"model": {"gradient_checkpointing": "yes"}}, "model.gradient_checkpointing", "yes"),
    ({"train": {"lr": -1}}, "train.lr", "-1"),
    ({"lora": {"embeddings": "some"}}, "lora.embeddings", "some"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum", "0"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout", "1.5"),
    ({"eval": {"mcq_file": "nope.jsonl"}}, "eval.mcq_file", "nope.jsonl"),
    ({"eval": {"heldout_file": "nope.txt"}}, "eval.heldout_file", "nope.txt"),
    ({"train": {"lr": math.nan}}, "train.lr", "nan"),
]
THREE_WRONG = {"train": {"lr": "fast", "micro_batch_size": 2.5}, "lora": {"embeddings": "some"}}
KORCPT_CODE = ("load_config", "_SafeLoader", "_yaml_problem", "_build", "_build_section", "_coerce")


def _validated(cfg: RunConfig, path: Path) -> RunConfig:
    """korcpt's ranges and rules, kept with any parser; raised the way load_config raises them."""
    problems = validate(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {path}: " + "; ".join(problems))
    return cfg


def load_omegaconf(path: Path, overrides: list[str]) -> RunConfig:
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    return _validated(OmegaConf.to_object(merged), path)


def load_jsonargparse(path: Path, overrides: list[str]) -> RunConfig:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(RunConfig, skip={"source"})
    parsed = parser.instantiate(parser.parse_args(["--config", str(path)] + [f"--{o}" for o in overrides]))
    return _validated(RunConfig(**{name: parsed[name] for name in kc._SECTION_TYPES}), path)


def load_omegaconf_one_line(path: Path, overrides: list[str]) -> RunConfig:
    try:
        return load_omegaconf(path, overrides)
    except Exception as exc:  # the library's message on one line, after the file
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}") from None


def load_jsonargparse_one_line(path: Path, overrides: list[str]) -> RunConfig:
    try:
        return load_jsonargparse(path, overrides)
    except Exception as exc:
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}") from None


def load_korcpt(path: Path, overrides: list[str]) -> RunConfig:
    return kc.load_config(path, overrides)


def _lines(*objects: Any) -> int:
    return sum(1 for obj in objects for line in inspect.getsource(obj).splitlines() if line.strip())


def _message(load: Callable[[Path, list[str]], RunConfig], path: Path) -> str | None:
    try:
        load(path, [])
    except BaseException as exc:  # a library may raise its own error types, or exit
        return str(exc)
    return None


def measure(name: str, load: Callable[[Path, list[str]], RunConfig], lines: int, tmp: Path) -> dict[str, Any]:
    shards = tmp / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "manifest.json").write_text("{}")
    row: dict[str, Any] = {"name": name, "lines": lines, "refused": 0, "one_line": 0, "key": 0, "file": 0,
                           "value": 0, "all_four": 0, "accepted": []}
    for i, (values, key, found) in enumerate(CASES):
        path = tmp / f"{name}-{i}.yaml"
        path.write_text(yaml.safe_dump({**values, "data": {"shards": str(shards)}}))
        message = _message(load, path)
        if message is None:
            row["accepted"].append(f"{key}={found}")
            continue
        checks = ("\n" not in message.strip(), key in message, str(path) in message, found in message)
        row["refused"] += 1
        for column, ok in zip(("one_line", "key", "file", "value"), checks):
            row[column] += ok
        row["all_four"] += all(checks)
    path = tmp / f"{name}-three.yaml"
    path.write_text(yaml.safe_dump({**THREE_WRONG, "data": {"shards": str(shards)}}))
    message = _message(load, path) or ""
    row["of_three"] = sum(k in message for k in ("train.lr", "train.micro_batch_size", "lora.embeddings"))
    path = tmp / f"{name}-syntax.yaml"
    path.write_text(f"data:\n  shards: {shards}\ntrain: [unclosed\n")
    message = _message(load, path) or ""
    row["syntax"] = "\n" not in message.strip() and str(path) in message and "line 3" in message
    return row


def main() -> int:
    import jsonargparse
    import omegaconf

    contenders = [
        ("korcpt", load_korcpt, _lines(*(getattr(kc, n) for n in KORCPT_CODE))),
        (f"OmegaConf {omegaconf.__version__}", load_omegaconf, _lines(load_omegaconf)),
        (f"jsonargparse {jsonargparse.__version__}", load_jsonargparse, _lines(load_jsonargparse)),
        ("OmegaConf, one line", load_omegaconf_one_line, _lines(load_omegaconf, load_omegaconf_one_line)),
        ("jsonargparse, one line", load_jsonargparse_one_line, _lines(load_jsonargparse, load_jsonargparse_one_line)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(f"c{i}", load, lines, Path(tmp)) for i, (_, load, lines) in enumerate(contenders)]
    for row, (name, _, _) in zip(rows, contenders):
        row["name"] = name
    print(f"{len(CASES)} bad values of tests/test_config.py; columns count the errors that are one line / name the "
          "key / the file / the value found")
    print(f"{'parser':<23} {'lines':>5} {'refused':>7} {'one line':>8} {'key':>4} {'file':>4} {'value':>5} "
          f"{'all 4':>5} {'of 3 at once':>12} {'YAML line':>9}  accepted")
    for r in rows:
        print(f"{r['name']:<23} {r['lines']:>5} {r['refused']:>7} {r['one_line']:>8} {r['key']:>4} {r['file']:>4} "
              f"{r['value']:>5} {r['all_four']:>5} {r['of_three']:>12} {'yes' if r['syntax'] else 'no':>9}  "
              f"{', '.join(r['accepted']) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
