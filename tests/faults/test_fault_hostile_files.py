"""Hostile files: nothing a file says is executed.

- webdataset members with a pickle extension are refused before any decoding (a canary that an
  unpickle would create stays absent);
- korcpt, tools/ and launch/ load tensors only with ``torch.load(..., weights_only=True)``, arrays with
  ``allow_pickle`` off, YAML only with a safe loader, and never import pickle-like loaders (AST scan);
- ``model.trust_remote_code`` is off by default and in every shipped config;
- a model or tokenizer directory whose ``auto_map`` points at custom code (a module that writes a
  marker file when imported) loads with korcpt's default config without importing it: refused with a
  ModelError, or loaded with the built-in transformers class. A positive control with
  ``trust_remote_code: true`` shows that the marker would have appeared.
- a checkpoint whose optimizer, scheduler or RNG-state file is a pickle with a payload is not executed
  on ``--resume``: Accelerate loads them with ``weights_only=True`` (the optimizer and scheduler are
  refused; the RNG states are skipped by Accelerate with a log line, see the README's gaps).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from korcpt.config import ModelConfig, RunConfig, load_config
from korcpt.errors import DataError, ModelError, TrainingError
from korcpt.model.load import load_model_and_tokenizer, run_tokenizer
from korcpt.shards.wds import PICKLE_EXTENSIONS, iter_windows
from _faults import raised
from tinyrun import ROOT, run_config

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")
"""


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"file:{path}"


@pytest.mark.parametrize("ext", sorted(PICKLE_EXTENSIONS))
def test_webdataset_pickle_members_are_refused_never_decoded(tmp_path, ext, tally):
    marker = tmp_path / "unpickled"
    tokens = io.BytesIO()
    np.save(tokens, np.arange(9, dtype=np.uint16))
    url = _tar(tmp_path / "hostile.tar", {"0000000000.tokens.npy": tokens.getvalue(),
                                          f"0000000000.starts.{ext}": pickle.dumps(_Payload(marker))})
    err = raised(lambda: list(iter_windows([url])))
    print(f"[injected] webdataset member 0000000000.starts.{ext} (pickle with a payload) -> {err!r}")
    crashes = int(err is not None and not isinstance(err, DataError))
    tally.add("hostile files", faults_injected=1, bad_inputs=1, crashes=crashes)
    assert crashes == 0 and isinstance(err, DataError) and re.search(f"starts.{ext}", str(err)), repr(err)
    assert not marker.exists()


def test_webdataset_object_array_npy_is_refused_never_unpickled(tmp_path, tally):
    marker = tmp_path / "unpickled"
    obj, starts = io.BytesIO(), io.BytesIO()
    np.save(obj, np.array([_Payload(marker)], dtype=object), allow_pickle=True)  # a .npy that holds a pickle
    np.save(starts, np.zeros(1, dtype=np.uint32))
    url = _tar(tmp_path / "object.tar", {"0000000000.tokens.npy": obj.getvalue(),
                                         "0000000000.starts.npy": starts.getvalue()})
    err = raised(lambda: list(iter_windows([url])))
    print(f"[injected] webdataset member 0000000000.tokens.npy (object array with a payload) -> {err!r}")
    crashes = int(err is not None and not isinstance(err, DataError))
    tally.add("hostile files", faults_injected=1, bad_inputs=1, crashes=crashes)
    assert crashes == 0 and isinstance(err, DataError), repr(err)
    assert re.search("0000000000.tokens.npy is not a plain .npy array", str(err)), str(err)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _kw(node: ast.Call, key: str):
    for kw in node.keywords:
        if kw.arg == key:
            return kw.value
    return None


def test_code_loads_tensors_arrays_and_yaml_safely_only():
    files = [p for d in ("korcpt", "tools", "launch") for p in sorted((ROOT / d).rglob("*.py"))]
    checked = {"torch.load": 0, "np.load": 0, "yaml.load": 0}
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "marshal") for n in names):
                    problems.append(f"{where}:{node.lineno}: imports a pickle-like loader")
        for node, owner, name in _calls(tree):
            if owner == "torch" and name == "load":
                checked["torch.load"] += 1
                value = _kw(node, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                checked["np.load"] += 1
                value = _kw(node, "allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                checked["yaml.load"] += 1
                loader = _kw(node, "Loader")
                if name != "load" or loader is None or "Safe" not in ast.unparse(loader):
                    problems.append(f"{where}:{node.lineno}: yaml.{name} without a safe loader")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):  # the builtins, not model.eval()
                problems.append(f"{where}:{node.lineno}: {name}()")
    print(f"[scanned] {len(files)} files: {checked}")
    assert not problems, problems
    assert len(files) > 30


def test_trust_remote_code_is_off_by_default_and_in_every_shipped_config():
    assert ModelConfig().trust_remote_code is False and RunConfig().model.trust_remote_code is False
    shipped = sorted((ROOT / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(path, check_files=False)
        assert cfg.model.trust_remote_code is False, path


def _evil_model_dir(root: Path, tiny_tok: Path, model_type: str) -> tuple[Path, Path]:
    """A model directory whose config.json auto_map points at evil.py; returns (dir, marker)."""
    d = root / f"model_{model_type}"
    marker = root / f"imported_{model_type}"
    if model_type == "gemma3_text":  # a real tiny model, loadable by transformers' own class
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = json.loads((ROOT / "configs/models/tiny_gemma3.json").read_text())
        config = AutoConfig.for_model(**{**arch, "vocab_size": 576})
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
        data = json.loads((d / "config.json").read_text())
    else:
        d.mkdir(parents=True)
        data = {"model_type": model_type, "hidden_size": 8}
    data["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(data))
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return d, marker


def _evil_tokenizer_dir(root: Path, tiny_tok: Path) -> tuple[Path, Path]:
    d = root / "tokenizer_evil"
    marker = root / "imported_tokenizer"
    shutil.copytree(tiny_tok, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "evil_tok.py").write_text(EVIL.format(marker=str(marker)))
    return d, marker


@pytest.mark.parametrize("what", ["unknown model_type + auto_map", "gemma3_text + auto_map", "tokenizer auto_map"])
def test_custom_code_in_a_model_or_tokenizer_dir_is_not_imported_by_default(tmp_path, tiny_data, what, tally):
    tok, _ = tiny_data
    if what.startswith("tokenizer"):
        d, marker = _evil_tokenizer_dir(tmp_path, tok)
        mcfg = ModelConfig(name="unused", tokenizer=str(d))
        load = lambda: run_tokenizer(mcfg)  # noqa: E731
    else:
        d, marker = _evil_model_dir(tmp_path, tok, "korcpt_evil" if what.startswith("unknown") else "gemma3_text")
        mcfg = ModelConfig(name=str(d), tokenizer=str(tok), dtype="float32", attn_implementation="eager")
        load = lambda: load_model_and_tokenizer(mcfg, torch.device("cpu"))  # noqa: E731
    assert mcfg.trust_remote_code is False  # korcpt's default
    loaded = []
    err = raised(lambda: loaded.append(load()))
    if isinstance(err, ModelError):
        outcome = f"refused: ModelError: {err}"
    elif err is None:
        obj = loaded[0][0] if isinstance(loaded[0], tuple) else loaded[0]
        outcome = f"loaded with the built-in class {type(obj).__module__}.{type(obj).__name__}"
    else:
        outcome = f"crashed: {err!r}"
    print(f"[injected] {what}: {d.name} -> {outcome}")
    crashes = int(err is not None and not isinstance(err, ModelError))
    tally.add("hostile files", faults_injected=1, bad_inputs=1, crashes=crashes)
    assert crashes == 0, outcome
    if err is None:
        assert type(obj).__module__.startswith("transformers."), outcome
    else:
        assert "\n" not in str(err)
    assert not marker.exists(), f"custom code was imported: {outcome}"
    assert not any("evil" in m for m in sys.modules), [m for m in sys.modules if "evil" in m]


def test_positive_control_trust_remote_code_true_would_import_it(tmp_path, tiny_data):
    """The marker mechanism works: with trust_remote_code on, transformers imports the custom module."""
    tok, _ = tiny_data
    d, marker = _evil_tokenizer_dir(tmp_path, tok)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": str(ROOT)}
    code = ("from korcpt.config import ModelConfig\nfrom korcpt.model.load import run_tokenizer\n"
            f"try:\n    run_tokenizer(ModelConfig(name='x', tokenizer={str(d)!r}, trust_remote_code=True))\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, timeout=300, capture_output=True)
    assert marker.exists()


def test_resume_from_a_checkpoint_with_a_pickle_payload_does_not_execute_it(tmp_path, tiny_data, tally):
    from korcpt.train.loop import train

    tok, shards = tiny_data
    out = tmp_path / "run"
    cfg = load_config(run_config(tmp_path / "run.yaml", tok, shards, out,
                                 train={"max_steps": 2, "save_steps": 1, "keep_last": 2}, eval={"steps": 0}))
    train(cfg)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "unpickled"
    for name in ("random_states_0.pkl", "scheduler.bin", "optimizer.bin"):  # all read by Accelerate's load_state
        good = (newest / name).read_bytes()
        (newest / name).write_bytes(pickle.dumps(_Payload(marker)))
        # refused in one line naming the checkpoint, never run; the RNG file too, which Accelerate itself
        # would skip with an info log (the resume would silently stop being exact)
        err = raised(lambda: train(cfg, resume="auto"))
        print(f"[injected] pickle payload in {newest.name}/{name} -> {type(err).__name__}: {str(err)[:160]}")
        crashes = int(err is not None and not isinstance(err, TrainingError))
        tally.add("hostile files", faults_injected=1, bad_inputs=1, crashes=crashes)
        assert crashes == 0 and isinstance(err, TrainingError), repr(err)
        assert re.search(rf"checkpoint .*{newest.name}.* cannot be restored", str(err)), str(err)
        assert "\n" not in str(err) and "Unpickl" in str(err), str(err)
        assert not marker.exists(), name
        (newest / name).write_bytes(good)
    # not hostile, only damaged: a truncated optimizer state is a one-line error too, not torch's traceback
    good = (newest / "optimizer.bin").read_bytes()
    (newest / "optimizer.bin").write_bytes(good[: len(good) // 2])
    with pytest.raises(TrainingError, match=rf"checkpoint .*{newest.name} cannot be restored"):
        train(cfg, resume="auto")
