"""1 process vs 2-process DDP vs 2-process DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo), for real:
the same losses and equal saved adapters, and every training sequence seen once across ranks; in
float32 and in bfloat16 (the production regime: DeepSpeed's ``bf16.enabled`` follows ``model.dtype``),
with a pretrained directory and with a random init, for Gemma3ForCausalLM and MedGemma's multimodal
Gemma3ForConditionalGeneration.

Tolerance: losses rel 1e-5, adapters atol 5e-5 (float32; the ranks sum gradients in another order,
and Adam divides by sqrt(v), which turns tiny gradient differences in rarely used embedding rows into
update differences above 1e-6; measured max 1.1e-5, on one LoRA A element under ZeRO-3 with
lr 0.005; the losses agree to every printed digit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyrun import (ROOT, TINY_ARCH, free_port, heldout_text, initial_adapter, launched_run, moved_fractions, run_config,
                     run_info, samples, trained_ids)

MATRIX_LAUNCH = Path(__file__).resolve().parent / "_matrix_launch.py"
MODES = ("one", "ddp", "zero2", "zero3")

# Each embedding mode with the loss it is run with: the plain loss (full logits) and the chunked head
# loss (train.loss_chunk_tokens, a module of the model that ZeRO-3 gathers the head for), and
# new_tokens on an extended tokenizer, the mode whose own rows and head must train under ZeRO-3.
CASES = {"frozen": 0, "full": 16, "new_tokens": 16}

# bfloat16 at train_raw_korean_text.md's lr 2e-5, where a bfloat16 weight without a float32 master keeps most of its
# entries (30% of the full embedding moved in 6 steps, bench/bench_precision.py). Tolerance against the
# float32 run: losses rel 5e-4 (bfloat16 logits; measured max 8.4e-5, new rows and full embedding).
BF16_LR = 2e-5
BF16_REL = 5e-4
# Every entry of every trained tensor moves in float32; in bfloat16 a few LoRA A entries get steps
# below float32 resolution in 3 steps from B = 0 (measured: 99.8% of one LoRA A at least).
MIN_MOVED = 0.99
# the resume test's runs: 4 steps, checkpoints at 2 and 4
WS_STEPS = {"max_steps": 4, "save_steps": 2, "keep_last": 3}


def write_config(root: Path, data, model_dir: Path, name: str, mode: str, embeddings: str, dtype: str = "float32",
                 new_rows: Path | None = None, out: str = "", device: str = "", **train) -> Path:
    """``root/name.yaml``, the config of one cell: 3 steps of the same global batch (4 sequences) on any
    world size, written to ``root/out`` (default: ``root/name``)."""
    tok, shards = data
    random_init = model_dir.suffix == ".json"
    return run_config(root / f"{name}.yaml", tok, shards, root / (out or name),
                      model={"name": str(model_dir), "dtype": dtype, "random_init": random_init,
                             "tokenizer": str(tok) if embeddings == "new_tokens" or random_init else "",
                             "gradient_checkpointing": dtype == "bfloat16", "new_rows": str(new_rows or ""),
                             "device": device},
                      lora={"embeddings": embeddings},
                      # the same global batch (4 sequences) in both: 1 x 4 on one process, 1 x 2 on each of two
                      train={"max_steps": 3, "micro_batch_size": 1, "grad_accum": 4 if mode == "one" else 2,
                             "warmup_steps": 0, "loss_chunk_tokens": CASES[embeddings], **train},
                      eval={"steps": 0, "max_val_sequences": 8, "batch_size": 2,
                            "heldout_file": str(heldout_text(root / "heldout.txt"))})


@pytest.fixture(scope="module")
def plan(tmp_path_factory, tiny_data, extended_tiny, pretrained_tiny, pretrained_tiny_mm, distilled_tiny):
    """mode -> the configs (``CONFIG[::RESUME]`` arguments of tests/_matrix_launch.py) that one launch
    with that launcher trains, in order; every run of this module, each launcher started once."""
    root = tmp_path_factory.mktemp("distributed")
    runs: dict[str, list[str]] = {mode: [] for mode in MODES}

    def add(name: str, mode: str, *args, **kwargs) -> None:
        runs[mode].append(str(write_config(root, *args[:2], name, mode, *args[2:], **kwargs)))

    for embeddings in CASES:
        data = extended_tiny if embeddings == "new_tokens" else tiny_data
        rows = distilled_tiny if embeddings == "new_tokens" else None
        add(f"ref-{embeddings}", "one", data, pretrained_tiny, embeddings, lr=BF16_LR, new_rows=rows)
        for mode in MODES:
            add(f"{mode}-{embeddings}", mode, data, pretrained_tiny, embeddings)
            add(f"bf16-{mode}-{embeddings}", mode, data, pretrained_tiny, embeddings, "bfloat16", lr=BF16_LR,
                new_rows=rows)
    for embeddings in ("frozen", "full"):
        for mode in ("one", "zero3"):
            add(f"{mode}-random-{embeddings}", mode, tiny_data, TINY_ARCH, embeddings)
    add("mm-ref", "one", tiny_data, pretrained_tiny_mm, "full", lr=BF16_LR)
    for mode in ("zero2", "zero3"):
        add(f"mm-bf16-{mode}", mode, tiny_data, pretrained_tiny_mm, "full", "bfloat16", lr=BF16_LR)
    add("ws-ref", "one", tiny_data, pretrained_tiny, "full", **WS_STEPS)  # uninterrupted, its own run
    add("ws-cut", "one", tiny_data, pretrained_tiny, "full", **WS_STEPS)
    # the same config resumed on two processes (after the cut below): the last run of the ddp launch
    runs["ddp"].append(str(write_config(root, tiny_data, pretrained_tiny, "ws-cut-ddp", "ddp", "full", out="ws-cut",
                                        **WS_STEPS)) + "::auto")
    return root, runs


def launch_all(plan, mode: str) -> Path:
    root, runs = plan
    launched_run(mode, runs[mode], script=MATRIX_LAUNCH, timeout=1800)
    return root


@pytest.fixture(scope="module")
def one(plan) -> Path:
    """The one-process runs, in one process; then ws-cut is cut back to its step-2 checkpoint for the
    ddp launch to resume."""
    root = launch_all(plan, "one")
    cut = root / "ws-cut"
    for later in ("checkpoints/step-00000004", "adapter_model.safetensors", "training_info.json"):
        path = cut / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


@pytest.fixture(scope="module")
def ddp(plan, one) -> Path:
    return launch_all(plan, "ddp")


@pytest.fixture(scope="module")
def zero2(plan) -> Path:
    return launch_all(plan, "zero2")


@pytest.fixture(scope="module")
def zero3(plan) -> Path:
    return launch_all(plan, "zero3")


def losses(out: Path) -> list[float]:
    return [x["loss"] for x in run_info(out)["losses"]]


def rank_ids(out: Path, ranks=(0, 1)) -> list[int]:
    return [i for r in ranks for record in samples(out, r) for i in record["ids"]]


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", list(CASES))
def test_one_process_ddp_zero2_zero3_agree(one, ddp, zero2, zero3, embeddings):
    runs = {mode: one / f"{mode}-{embeddings}" for mode in MODES}
    info = {m: run_info(out) for m, out in runs.items()}
    ref = [x["loss"] for x in info["one"]["losses"]]
    assert len(ref) == 3
    ref_adapter = load_file(str(runs["one"] / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in ref_adapter)
    if embeddings != "frozen":
        assert any("trainable_tokens_delta" in k for k in ref_adapter)
    if embeddings == "new_tokens":
        assert info["one"]["new_tokens"] == 40
    for mode in ("ddp", "zero2", "zero3"):
        assert info[mode]["world_size"] == 2
        # fails once Accelerate records the ranks of a CPU DeepSpeed run itself: then delete
        # korcpt.train.distributed._record_cpu_deepspeed_ranks
        assert info[mode]["workarounds"] == ([] if mode == "ddp" else ["accelerate_cpu_deepspeed_ranks"]), mode
        losses = [x["loss"] for x in info[mode]["losses"]]
        assert losses == pytest.approx(ref, rel=1e-5), mode
        assert info[mode]["val_loss_baseline"] == pytest.approx(info["one"]["val_loss_baseline"], rel=1e-5), mode
        assert info[mode]["val_loss_final"] == pytest.approx(info["one"]["val_loss_final"], rel=1e-5), mode
        for key in ("heldout_bpc_baseline", "heldout_bpc_final"):  # every rank scores every text
            assert info[mode][key] == pytest.approx(info["one"][key], rel=1e-5), (mode, key)
        got = load_file(str(runs[mode] / "adapter_model.safetensors"))
        assert got.keys() == ref_adapter.keys(), mode
        for key, value in ref_adapter.items():
            assert got[key].shape == value.shape and got[key].numel() > 0, (mode, key)  # never empty under ZeRO-3
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=5e-5, msg=f"{mode} {key}")
        ids, one_ids = rank_ids(runs[mode]), rank_ids(runs["one"], ranks=(0,))
        assert sorted(ids) == sorted(one_ids) and len(set(ids)) == len(ids) == 12, mode


def attempts(out: Path, rank: int) -> list[tuple[int, list[int]]]:
    """(step, ids) of every step attempt of ``rank``, replays included."""
    return [(e["step"], e["ids"]) for e in samples(out, rank)]


@pytest.mark.slow
def test_a_one_process_run_resumed_on_two_processes_continues_exactly(ddp):
    """Another world size with the same global batch (1 x 1 x 4 -> 2 x 1 x 2): no sequence twice, none
    skipped, and the losses of the uninterrupted run (ws-ref, the same config run separately to the end);
    rank 1 has no RNG file of its own to restore."""
    ref, cut = ddp / "ws-ref", ddp / "ws-cut"
    assert run_info(ref)["world_size"] == 1 and run_info(ref)["steps"] == 4
    assert run_info(cut)["world_size"] == 2 and run_info(cut)["steps"] == 4
    assert losses(cut) == pytest.approx(losses(ref), rel=1e-5)
    reference = attempts(ref, 0)
    assert attempts(cut, 0)[:4] == reference  # the one-process attempt, steps 1-4
    resumed = zip(attempts(cut, 0)[4:], attempts(cut, 1))  # steps 3-4 again, on two ranks
    assert [(s0, sorted(a + b)) for (s0, a), (s1, b) in resumed if s0 == s1] == \
        [(step, sorted(ids)) for step, ids in reference[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", ["frozen", "full"])
def test_random_init_under_zero3_is_the_one_process_model(one, zero3, embeddings):
    """The same seed builds the same random model under ZeRO-3 (zero3_init_flag on) as in one process."""
    one, zero3 = (one / f"{mode}-random-{embeddings}" for mode in ("one", "zero3"))
    assert run_info(zero3)["world_size"] == 2
    assert run_info(zero3)["val_loss_baseline"] == pytest.approx(run_info(one)["val_loss_baseline"], rel=1e-5)
    assert losses(zero3) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == 3
    assert sorted(trained_ids(zero3)) == sorted(trained_ids(one))


def assert_bf16_run_matches(out: Path, ref: Path, mode: str, initial: dict) -> None:
    assert run_info(out)["world_size"] == (1 if mode == "one" else 2)
    worst = max(abs(a / b - 1) for a, b in zip(losses(out), losses(ref)))
    print(f"[bf16] {out.name}: losses within rel {worst:.2e} of float32")
    assert losses(out) == pytest.approx(losses(ref), rel=BF16_REL), mode
    assert run_info(out)["val_loss_final"] == pytest.approx(run_info(ref)["val_loss_final"], rel=BF16_REL), mode
    assert run_info(out)["heldout_bpc_final"] == pytest.approx(run_info(ref)["heldout_bpc_final"], rel=BF16_REL), mode
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values()), mode  # the float32 masters, not bf16 copies
    moved = moved_fractions(initial, saved)
    assert moved and min(moved.values()) >= MIN_MOVED, (mode, {k: v for k, v in moved.items() if v < MIN_MOVED})
    assert sorted(trained_ids(out)) == sorted(trained_ids(ref)), mode


@pytest.mark.slow
@pytest.mark.parametrize("embeddings", list(CASES))
def test_bfloat16_matrix_one_ddp_zero2_zero3(one, ddp, zero2, zero3, embeddings):
    """Each cell: bfloat16 with gradient checkpointing; every trainable tensor moved, losses as float32.
    new_tokens starts from distilled rows (model.new_rows): its output rows are a parameter of the head's
    own, which must train and save under every launcher (the float32 matrix above covers the tied head)."""
    initial = initial_adapter(one / f"ref-{embeddings}.yaml")
    if embeddings == "new_tokens":
        assert sum("lm_head.token_adapter" in k for k in initial) == 1, sorted(initial)  # untied output rows
    for mode in MODES:
        assert_bf16_run_matches(one / f"bf16-{mode}-{embeddings}", one / f"ref-{embeddings}", mode, initial)


@pytest.mark.slow
def test_bfloat16_multimodal_zero2_auto_buckets_and_zero3_init(one, zero2, zero3):
    """MedGemma 4B's class (tiny): ZeRO-2 with the shipped "auto" bucket sizes, ZeRO-3 with zero3_init_flag."""
    initial = initial_adapter(one / "mm-ref.yaml")
    for mode in ("zero2", "zero3"):
        assert_bf16_run_matches(one / f"mm-bf16-{mode}", one / "mm-ref", mode, initial)


def test_a_deepspeed_file_contradicting_model_dtype_is_one_line(tmp_path, tiny_data):
    ds = json.loads((ROOT / "configs/deepspeed/cpu_zero2.json").read_text())
    ds["bf16"] = {"enabled": False}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = run_config(tmp_path / "c.yaml", *tiny_data, tmp_path / "out", model={"dtype": "bfloat16"})
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--use_deepspeed",
                           "--deepspeed_config_file", str(tmp_path / "ds.json"),
                           "--main_process_port", str(free_port()), "launch/train.py", "--config",
                           str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KORCPT_NO_PROGRESS": "1"})
    assert proc.returncode != 0
    assert ("error: the DeepSpeed config sets bf16.enabled=False but model.dtype 'bfloat16' needs True: "
            'set it to "auto" (derived from model.dtype)') in proc.stderr.splitlines()
