"""Every shipped config loads: run YAMLs validate, accelerate YAMLs name existing DeepSpeed files,
DeepSpeed JSON is valid and leaves batch, accumulation and clipping to the run config."""

from __future__ import annotations

import json

import pytest
import yaml

from korcpt.config import load_config
from korcpt.assets import ROOT

CONFIGS = ROOT / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.json"))
MODELS = sorted((CONFIGS / "models").glob("*.json"))


def test_the_expected_configs_are_shipped():
    names = {p.name for p in RUN_CONFIGS}
    assert {"4b.yaml", "4b_zero2.yaml", "27b_zero3.yaml"} <= names
    assert {p.stem for p in ACCELERATE} >= {"single_gpu", "multi_gpu_ddp", "zero2", "zero3", "zero3_2nodes",
                                            "cpu_ddp", "cpu_zero2", "cpu_zero3"}
    assert {p.stem for p in DEEPSPEED} >= {"zero2", "zero3"}
    assert {p.stem for p in MODELS} >= {"medgemma-4b", "medgemma-27b"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_loads(path):
    cfg = load_config(path, check_files=False)
    assert cfg.source == str(path)


def test_large_model_configs_match_their_purpose():
    c4 = load_config(CONFIGS / "4b.yaml", check_files=False)
    c27 = load_config(CONFIGS / "27b_zero3.yaml", check_files=False)
    assert c4.model.name == "medgemma-4b" and c27.model.name == "medgemma-27b"
    assert (c4.lora.r, c4.lora.alpha, c4.lora.use_rslora, c4.train.lr) == (16, 32.0, True, 2e-5)
    assert (c4.train.micro_batch_size, c4.train.grad_accum) == (2, 16)
    assert c27.model.gradient_checkpointing and c27.model.dtype == "bfloat16"
    assert c4.train.loss_chunk_tokens > 0 and c27.train.loss_chunk_tokens > 0
    # the same global batch (sequences per optimizer step) on 1 GPU and on 8
    c2 = load_config(CONFIGS / "4b_zero2.yaml", check_files=False)
    for c, gpus in ((c4, 1), (c2, 8), (c27, 8)):
        assert c.train.micro_batch_size * c.train.grad_accum * gpus == 32


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data["distributed_type"] in {"NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED"}
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1
    if path.stem.startswith("cpu_"):
        # DeepSpeed configs run on CPU with use_cpu; DDP must use the torchrun launcher (use_cpu false)
        assert data["use_cpu"] is (data["distributed_type"] == "DEEPSPEED")
        assert data["num_processes"] == 2 and data.get("mixed_precision", "no") == "no"
    if data["distributed_type"] == "DEEPSPEED":
        ds_file = ROOT / data["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file(), ds_file
        # accelerate refuses DeepSpeed settings in both places when a config file is given (the launcher
        # of a multi-node run is not one of them)
        assert set(data["deepspeed_config"]) <= {"deepspeed_config_file", "zero3_init_flag",
                                                 "deepspeed_multinode_launcher"}
        ds = json.loads(ds_file.read_text())
        assert data["deepspeed_config"]["zero3_init_flag"] == (ds["zero_optimization"]["stage"] == 3)
        # precision follows the run's model.dtype (korcpt.train.distributed.deepspeed_precision), not the file
        assert ds["bf16"]["enabled"] == "auto"
        assert "mixed_precision" not in data or data["mixed_precision"] == ("no" if data["use_cpu"] else "bf16")


def test_the_two_node_accelerate_config_is_2_x_8_gpus_with_torchrun_on_each_node():
    """As Accelerate reads it: num_processes counts every rank (Accelerate starts num_processes //
    num_machines a node); the standard launcher is torchrun on each node (pdsh, the default, needs
    ssh between nodes); the rendezvous host is the cluster's, given at launch (launch/slurm.sh)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / "accelerate/zero3_2nodes.yaml"))
    assert (cfg.num_machines, cfg.num_processes, cfg.num_processes // cfg.num_machines) == (2, 16, 8)
    assert cfg.distributed_type == "DEEPSPEED" and cfg.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    assert cfg.deepspeed_config["deepspeed_config_file"] == "configs/deepspeed/zero3.json"
    assert cfg.main_process_ip is None and cfg.main_process_port and not cfg.use_cpu
    # the 27B config's global batch of 32 on 16 GPUs: grad_accum 1 (README, "Multi-node")
    c27 = load_config(CONFIGS / "27b_zero3.yaml", check_files=False)
    assert c27.train.micro_batch_size * 1 * cfg.num_processes == 32


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_config(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["zero_optimization"]["stage"] in (1, 2, 3)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert data[key] == "auto", key  # one source of truth: the run config
    assert data["bf16"]["enabled"] in (True, False, "auto")
    assert "optimizer" not in data and "scheduler" not in data  # the loop builds AdamW and the schedule (train.lr)


def test_deepspeed_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    for path in DEEPSPEED:
        data = json.loads(path.read_text(encoding="utf-8"))
        resolved = {k: v for k, v in data.items() if v != "auto"}
        resolved.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=16, train_batch_size=32,
                        gradient_clipping=1.0, bf16={"enabled": False})
        zero = {k: (5e8 if v == "auto" else v) for k, v in data["zero_optimization"].items()}
        resolved["zero_optimization"] = zero
        cfg = DeepSpeedConfig(resolved)
        assert cfg.zero_optimization_stage == data["zero_optimization"]["stage"]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_architecture_builds_on_meta(path):
    from korcpt.model.load import build_meta_model

    data = json.loads(path.read_text(encoding="utf-8"))
    model = build_meta_model(data)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", ["4b.yaml", "4b_zero2.yaml", "27b_zero3.yaml"])
def test_the_spec_stop_rule_is_on_and_can_trigger(name):
    """Validation loss better by less than 0.01 for 5 evaluations, or perplexity 3.0; the evaluations
    come per epoch, so more of them fit in an epoch than patience needs, whatever the stage's length."""
    from korcpt.train.evaluation import evaluation_every

    e = load_config(CONFIGS / name, check_files=False).eval
    assert (e.patience, e.min_delta, e.target_ppl, e.steps) == (5, 0.01, 3.0, 0)
    assert e.per_epoch > e.patience
    for steps_per_epoch in (37, 1_000, 50_000):  # a quick-validation stage to a full one
        every, _ = evaluation_every(e, steps_per_epoch)
        assert steps_per_epoch // every >= e.per_epoch > e.patience


def test_a_heldout_file_with_a_bad_line_is_read_with_the_skip_counted(tmp_path, caplog):
    from korcpt.config import RunConfig
    from korcpt.train.evaluation import load_heldout_for_run

    path = tmp_path / "heldout.jsonl"
    path.write_text('{"text": "천식은 기도 질환이다."}\n[1, 2]\n{"text": "빈혈이다."}\n', encoding="utf-8")
    cfg = RunConfig()
    cfg.eval.heldout_file = str(path)
    assert load_heldout_for_run(cfg) == ["천식은 기도 질환이다.", "빈혈이다."]
    assert f'eval.heldout_file: 1 lines skipped, first: {path}:2: expected an object with a non-empty "text"' \
        in caplog.text
    cfg.eval.heldout_file = ""
    assert load_heldout_for_run(cfg) == []


def test_evaluation_cadence():
    from korcpt.config import EvalConfig
    from korcpt.errors import ConfigError
    from korcpt.train.evaluation import evaluation_every

    assert evaluation_every(EvalConfig(per_epoch=20), 1000) == (50, 0)
    assert evaluation_every(EvalConfig(per_epoch=20, mcq_file="mcq.jsonl"), 1000) == (50, 50)
    assert evaluation_every(EvalConfig(per_epoch=20, mcq_file="mcq.jsonl", mcq_steps=300), 10) == (1, 300)
    assert evaluation_every(EvalConfig(steps=7), 1000) == (7, 0)
    assert evaluation_every(EvalConfig(), 1000) == (0, 0)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "4b.yaml", overrides=["eval.steps=500"], check_files=False)
    assert "eval.steps 500 and eval.per_epoch 20: set one of them" in str(err.value)
