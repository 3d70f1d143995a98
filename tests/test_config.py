"""The config system rejects unknown keys, wrong types and bad values by name, and applies overrides."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from korcpt.config import RunConfig, apply_shorthands, load_config, save_config
from korcpt.errors import ConfigError


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format_version": 1}))
    return d


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_valid_config_loads_with_defaults(tmp_path, shards):
    cfg = load_config(write(tmp_path, {"data": {"shards": str(shards)}, "train": {"lr": 1e-4}}))
    assert cfg.train.lr == 1e-4
    assert cfg.train.micro_batch_size == 2 and cfg.train.grad_accum == 16  # the defaults of train_raw_korean_text.md
    assert cfg.lora.use_rslora is True and cfg.lora.r == 16 and cfg.lora.alpha == 32


def test_overrides_apply_after_the_file_and_parse_types(tmp_path, shards):
    path = write(tmp_path, {"data": {"shards": str(shards)}, "train": {"lr": 1e-4}})
    cfg = load_config(path, ["train.lr=3e-4", "lora.embeddings=new_tokens", "train.max_steps=7",
                             "lora.target_modules=[q_proj, v_proj]"])
    assert (cfg.train.lr, cfg.lora.embeddings, cfg.train.max_steps) == (3e-4, "new_tokens", 7)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_shorthand_flags_are_overrides_and_set_wins(tmp_path, shards):
    path = write(tmp_path, {"data": {"shards": str(shards)}})
    overrides = apply_shorthands(["train.epochs=3"], model="medgemma-4b", tokenizer_path="tok", max_samples=5000,
                                 epochs=1, device="cuda:0")
    cfg = load_config(path, overrides)
    assert cfg.model.name == "medgemma-4b" and cfg.model.tokenizer == "tok"
    assert cfg.train.max_samples == 5000 and cfg.model.device == "cuda:0"
    assert cfg.train.epochs == 3


@pytest.mark.parametrize("data, needle", [
    ({"train": {"lrr": 1}}, "unknown key train.lrr (did you mean lr?)"),
    ({"trian": {"lr": 1}}, "unknown section 'trian'"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number, found str 'fast'"),
    ({"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size: expected an integer"),
    ({"model": {"gradient_checkpointing": "yes"}}, "model.gradient_checkpointing: expected true or false"),
    ({"train": {"lr": -1}}, "train.lr must be > 0, found -1"),
    ({"lora": {"embeddings": "some"}}, "lora.embeddings: must be one of frozen, new_tokens, full, found 'some'"),
    ({"train": {"grad_accum": 0}}, "train.grad_accum must be >= 1, found 0"),
    ({"lora": {"dropout": 1.5}}, "lora.dropout must be in [0, 1), found 1.5"),
    ({"eval": {"mcq_file": "nope.jsonl"}}, "eval.mcq_file: file not found: nope.jsonl"),
    ({"eval": {"heldout_file": "nope.txt"}}, "eval.heldout_file: file not found: nope.txt"),
    ({"train": {"lr": float("nan")}}, "train.lr: must be finite"),
])
def test_bad_values_name_the_key_and_the_file(tmp_path, shards, data, needle):
    data = {**data, "data": {"shards": str(shards)}}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, {"train": {"lr": 0, "grad_accum": 0}, "lora": {"r": 0}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    for needle in ("train.lr", "train.grad_accum", "lora.r", "data.shards"):
        assert needle in message
    assert message.startswith("4 problem(s)")


def test_missing_shards_directory_is_named(tmp_path):
    path = write(tmp_path, {"data": {"shards": str(tmp_path / "nowhere")}})
    with pytest.raises(ConfigError, match="no manifest.json in .*nowhere"):
        load_config(path)
    cfg = load_config(path, check_files=False)
    assert cfg.data.shards.endswith("nowhere")


def test_bad_override_syntax_and_missing_file(tmp_path, shards):
    path = write(tmp_path, {"data": {"shards": str(shards)}})
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["lr=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path, shards):
    cfg = load_config(write(tmp_path, {"data": {"shards": str(shards)}}), ["train.lr=5e-5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, RunConfig)


def test_every_field_is_documented_and_every_declared_range_is_checked():
    from korcpt.config import _SECTION_TYPES, field_docs, validate

    checked = 0
    for section, cls in _SECTION_TYPES.items():
        fields = dataclasses.fields(cls)
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in fields} and all(docs.values()), section  # the tools' --help
        for f in fields:
            bounds = f.metadata.get("bounds")
            if bounds is None:
                continue
            cfg = RunConfig()
            cfg.data.shards = "x"
            # just outside the range: below ge, or at gt (1 for eval.target_ppl, which allows 0 or > 1)
            setattr(getattr(cfg, section), f.name, bounds.ge - 1 if bounds.ge is not None else bounds.gt)
            assert [m for m in validate(cfg, check_files=False) if m.startswith(f"{section}.{f.name} must be ")]
            checked += 1
    assert checked == 33
