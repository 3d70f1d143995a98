"""The planner's parameter counts equal the PEFT-wrapped meta model's; its estimate reacts to the knobs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from korcpt.config import RunConfig
from korcpt.model.load import build_meta_model, is_multimodal, padded_vocab, read_arch_config
from korcpt.model.lora import apply_lora, count_parameters
from korcpt.model.memory import GIB, count_params, plan, zero_stage_of_accelerate_config
from korcpt.assets import ROOT

VOCAB = 282_738  # the extended vocabulary of train_raw_korean_text.md


def run_config(model: str, mode: str, **train) -> RunConfig:
    cfg = RunConfig()
    cfg = replace(cfg, model=replace(cfg.model, name=model), train=replace(cfg.train, **train))
    return replace(cfg, lora=replace(cfg.lora, r=16, alpha=32, use_rslora=True, embeddings=mode))


@pytest.mark.parametrize("model", ["medgemma-4b", "medgemma-27b"])
def test_counts_equal_the_peft_meta_model_in_every_embedding_mode(model):
    arch = read_arch_config(model)
    checked = 0
    for mode in ("frozen", "new_tokens", "full"):
        cfg = run_config(model, mode)
        counts, info = count_params(cfg, VOCAB)
        meta = build_meta_model(arch, padded_vocab(VOCAB))
        assert is_multimodal(meta) == (model == "medgemma-4b")
        new_ids = list(range(info.base_vocab, VOCAB))
        peft_model = apply_lora(meta, cfg.lora, new_ids if mode == "new_tokens" else [])
        trainable, total = count_parameters(peft_model)
        assert (counts.trainable, counts.total) == (trainable, total), mode
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        assert counts.lora == lora > 0
        checked += 1
    assert checked == 3


def test_published_sizes_and_embedding_modes():
    c4, i4 = count_params(run_config("medgemma-4b", "full"))  # the architecture's own vocabulary
    assert c4.base == 4_300_079_472 and i4.vocab_rows == 262_208
    c27, i27 = count_params(run_config("medgemma-27b", "frozen"))
    assert 26.9e9 < c27.base < 27.1e9 and i27.vocab_rows == 262_144
    full, info = count_params(run_config("medgemma-4b", "full"), VOCAB)
    new, _ = count_params(run_config("medgemma-4b", "new_tokens"), VOCAB)
    assert full.embedding_trainable == padded_vocab(VOCAB) * 2560  # one tied table, not two
    assert new.embedding_trainable == (VOCAB - 262_208) * 2560
    assert full.total == new.total  # the new rows replace existing frozen rows, they are not extra parameters


def test_estimate_responds_to_checkpointing_chunking_and_zero():
    base = run_config("medgemma-27b", "full", micro_batch_size=2, loss_chunk_tokens=0)
    p0 = plan(base, gpus=8, gpu_mem_gib=80, zero_stage=3, vocab=VOCAB)
    assert p0.breakdown["logits_loss"] == 3 * 4096 * padded_vocab(VOCAB) * 4
    chunked = plan(replace(base, train=replace(base.train, loss_chunk_tokens=1024)), gpus=8, zero_stage=3, vocab=VOCAB)
    # 3 chunk-sized buffers plus the float32 gradient accumulator of the trained head
    assert chunked.breakdown["logits_loss"] == 3 * 1024 * padded_vocab(VOCAB) * 4 + padded_vocab(VOCAB) * 5376 * 4
    assert chunked.breakdown["logits_loss"] < 0.7 * p0.breakdown["logits_loss"]
    ckpt = plan(replace(base, model=replace(base.model, gradient_checkpointing=True)), gpus=8, zero_stage=3, vocab=VOCAB)
    assert ckpt.breakdown["activations"] * 10 < p0.breakdown["activations"]
    z2 = plan(base, gpus=8, zero_stage=2, vocab=VOCAB)
    assert z2.breakdown["frozen_weights"] == pytest.approx(8 * p0.breakdown["frozen_weights"], rel=1e-6)
    assert not z2.fits and any("gradient_checkpointing" in s for s in z2.suggestions)
    # With checkpointing and chunking already on, 27B replicated per GPU (ZeRO-2) still needs more than
    # 64 GiB: only sharding the weights (or offloading the optimizer) is left to suggest.
    tight = replace(base, model=replace(base.model, gradient_checkpointing=True),
                    train=replace(base.train, loss_chunk_tokens=1024, micro_batch_size=1))
    z2t = plan(tight, gpus=8, gpu_mem_gib=64, zero_stage=2, vocab=VOCAB)
    assert not z2t.fits and any("ZeRO-3" in s for s in z2t.suggestions), z2t.suggestions
    assert p0.per_gpu_bytes == sum(p0.breakdown.values())
    js = p0.to_json()
    assert {"total_params", "trainable_params", "per_gpu_bytes", "fits"} <= set(js)
    json.dumps(js)


def test_shipped_27b_config_fits_8_gpus_and_4b_fits_one():
    from korcpt.config import load_config

    p27 = plan(load_config(ROOT / "configs/27b_zero3.yaml", check_files=False), gpus=8, gpu_mem_gib=80,
               zero_stage=3, vocab=VOCAB)
    p4 = plan(load_config(ROOT / "configs/4b.yaml", check_files=False), gpus=1, gpu_mem_gib=80, zero_stage=0,
              vocab=VOCAB)
    assert p27.fits and p4.fits, (p27.per_gpu_bytes / GIB, p4.per_gpu_bytes / GIB)


def test_accelerate_config_names_stage_and_processes():
    assert zero_stage_of_accelerate_config(ROOT / "configs/accelerate/zero3.yaml") == (3, 8)
    assert zero_stage_of_accelerate_config(ROOT / "configs/accelerate/cpu_zero2.yaml") == (2, 2)
    assert zero_stage_of_accelerate_config(ROOT / "configs/accelerate/single_gpu.yaml") == (0, 1)


def test_tool_prints_one_json_object(monkeypatch, capsys):
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    tool = importlib.import_module("plan_memory")
    rc = tool.main(["--config", str(ROOT / "configs/27b_zero3.yaml"), "--vocab", str(VOCAB), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["gpus"] == 8 and out["zero_stage"] == 3 and out["fits"] is True
    assert out["trainable_params"] < out["total_params"] and out["per_gpu_bytes"] > 0


def test_one_gpu_without_deepspeed_counts_float32_masters_and_the_head_cast():
    from korcpt.config import load_config

    p = plan(load_config(ROOT / "configs/4b.yaml", check_files=False), gpus=1, zero_stage=0, vocab=VOCAB)
    b, n, emb = p.breakdown, p.params.trainable, p.params.embedding_trainable
    assert p.embeddings == "full" and emb == padded_vocab(VOCAB) * 2560  # 0.72B rows at this vocabulary
    assert (b["trainable_weights"], b["gradients"], b["optimizer_states"]) == (4 * n, 4 * n, 8 * n)
    assert b["master_cast"] == 2 * emb  # the bf16 copy of the table the head multiplies with
    z2 = plan(load_config(ROOT / "configs/4b.yaml", check_files=False), gpus=1, zero_stage=2, vocab=VOCAB)
    assert z2.breakdown["master_cast"] == 0 and z2.breakdown["optimizer_states"] == 12 * n
