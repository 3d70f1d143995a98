"""The training loop on a tiny Gemma 3: loss falls, outputs and TensorBoard tags, token-weighted
accumulation, exact resume, gradient checkpointing that trains LoRA, text-only multimodal training."""

from __future__ import annotations

import json
import math
import os
import shutil
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from korcpt.config import load_config
from korcpt.train.loop import train
from tinyrun import ROOT, heldout_text, run_config, samples
from tinyrun import train_run as run


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_loss_falls_and_the_output_layout_is_complete(tmp_path, tiny_data):
    heldout = heldout_text(tmp_path / "heldout.txt")
    info, out = run(tmp_path, tiny_data, "basic", train={"max_steps": 12, "lr": 0.01},
                    eval={"steps": 6, "heldout_file": str(heldout)})
    losses = [x["loss"] for x in info["losses"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert info["val_loss_final"] < info["val_loss_baseline"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer/tokenizer.json",
                 "training_info.json", "config.yaml", "checkpoints"):
        assert (out / name).exists(), name
    saved = json.loads((out / "training_info.json").read_text())
    for key in ("config", "steps", "tokens_seen", "train_seconds", "tokens_per_sec", "trainable_params",
                "total_params", "trainable_percent", "val_loss_baseline", "val_loss_final", "val_loss_best",
                "val_ppl_baseline", "val_ppl_final", "val_ppl_best", "mcq_accuracy_baseline", "mcq_accuracy_final",
                "history", "losses", "stop_reason", "versions"):
        assert key in saved, key
    assert saved["mcq_accuracy_final"] is None and saved["stop_reason"] == "max_steps"
    assert [h["step"] for h in saved["history"]] == [0, 6, 12]
    assert saved["val_ppl_final"] == pytest.approx(2.718281828 ** saved["val_loss_final"])
    # bits per character: the validation NLL over the characters its targets cover (decoded text,
    # no <bos>/<eos>), tokenizer-independent where per-token perplexity is not
    from transformers import AutoTokenizer

    from korcpt.shards.reader import IGNORE_INDEX, open_shards

    tok, val = AutoTokenizer.from_pretrained(tiny_data[0]), open_shards(tiny_data[1], "val", verify=False)
    chars = sum(len(tok.decode([t for t in val.sample(i)["labels"].tolist() if t != IGNORE_INDEX],
                               skip_special_tokens=True)) for i in range(min(8, val.num_sequences)))
    baseline = saved["history"][0]
    assert saved["val_bpc_baseline"] == pytest.approx(baseline["val_loss"] * baseline["val_tokens"] / math.log(2) / chars)
    assert saved["val_bpc_final"] < saved["val_bpc_baseline"]
    assert saved["val_bpc_best"] == min(h["val_bpc"] for h in saved["history"])
    # text never trained on, in bits per character at every evaluation
    assert [h["heldout_bpc"] is not None for h in saved["history"]] == [True] * 3
    assert saved["heldout_bpc_final"] < saved["heldout_bpc_baseline"] == saved["history"][0]["heldout_bpc"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen",
                "val/loss", "val/ppl", "val/bpc", "heldout/bpc"):
        assert tag in tags, tag
    assert len(events.Scalars("train/loss")) == 12
    assert "config/text_summary" in events.Tags()["tensors"]


def test_each_sequence_is_trained_once_per_epoch(tmp_path, tiny_data):
    info, out = run(tmp_path, tiny_data, "epoch", train={"max_steps": 0, "epochs": 1, "micro_batch_size": 4,
                                                          "grad_accum": 4})
    ids = [i for record in samples(out) for i in record["ids"]]
    assert len(ids) == len(set(ids)) == info["steps"] * 16
    manifest = json.loads((tiny_data[1] / "manifest.json").read_text())
    n_train = sum(s["sequences"] for s in manifest["shards"] if s["split"] == "train")
    assert info["steps"] == n_train // 16 and set(ids) <= set(range(n_train))


@pytest.mark.parametrize("micro, accum", [(2, 2), (1, 4)])
def test_accumulation_is_token_weighted(tmp_path, tiny_data, micro, accum):
    """micro 4 x accum 1, 2 x 2 and 1 x 4 take the same step, though sequences differ in target tokens."""
    common = {"max_steps": 1, "warmup_steps": 0, "grad_clip": 0.0, "lr": 0.01}
    ref_info, ref = run(tmp_path, tiny_data, "ref", train={**common, "micro_batch_size": 4, "grad_accum": 1})
    info, out = run(tmp_path, tiny_data, f"m{micro}", train={**common, "micro_batch_size": micro, "grad_accum": accum})
    assert info["losses"][0]["loss"] == pytest.approx(ref_info["losses"][0]["loss"], rel=1e-6)
    a, b = adapter(ref), adapter(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_max_samples_counts_documents_and_every_epoch_repeats_them(tmp_path, tiny_data):
    """--max-samples 20 trains the sequences that hold the first 20 documents, the same ones each epoch."""
    from korcpt.shards.reader import open_shards

    train_set = open_shards(tiny_data[1], "train", verify=False)
    sequences = train_set.sequences_for_documents(20)
    info, out = run(tmp_path, tiny_data, "docs", train={"max_steps": 0, "max_samples": 20, "epochs": 2},
                    eval={"steps": 0})
    assert info["plan"] == {"documents": 20, "documents_available": train_set.num_documents,
                            "sequences_per_epoch": sequences, "tokens_per_epoch": sequences * 64, "epochs": 2,
                            "steps": -(-sequences // 2) * 2 // 2, "steps_per_epoch": -(-sequences // 2) // 2,
                            "global_batch": 4, "evaluations": 2}
    ids = Counter(i for record in samples(out) for i in record["ids"])
    assert sorted(ids) == list(range(sequences)) and set(ids.values()) == {2}


def test_the_best_adapter_is_kept_outside_rotation_and_saved(tmp_path, tiny_data):
    """lr 5 makes every step worse than the untrained model: the saved adapter is the baseline's
    (step 0), kept in checkpoints/best while step checkpoints rotate, and *_final are its figures."""
    from tinyrun import initial_adapter

    sections = {"train": {"max_steps": 4, "lr": 5.0, "save_steps": 1, "keep_last": 1}, "eval": {"steps": 2},
                "output": {"adapter": "best"}}
    info, out = run(tmp_path, tiny_data, "best", **sections)
    assert info["best_step"] == 0 and info["adapter_step"] == 0 and info["steps"] == 4
    assert info["val_loss_final"] == info["val_loss_baseline"] == info["val_loss_best"] < info["val_loss_last"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-00000004"]
    assert json.loads((out / "checkpoints/best/best.json").read_text())["step"] == 0
    saved, initial = adapter(out), initial_adapter(tmp_path / "best.yaml")
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in saved)
    last, _ = run(tmp_path, tiny_data, "last", **{**sections, "output": {"adapter": "last"}})
    assert last["adapter_step"] == 4 and last["val_loss_final"] == last["val_loss_last"] == info["val_loss_last"]


def test_early_stopping_and_a_target_met_at_the_baseline_stop_the_run(tmp_path, tiny_data):
    info, _ = run(tmp_path, tiny_data, "patience", train={"max_steps": 6},
                  eval={"steps": 1, "patience": 2, "min_delta": 100.0})  # no evaluation counts as better
    assert info["steps"] == 2 and [h["step"] for h in info["history"]] == [0, 1, 2, 2]
    assert info["stop_reason"] == "early_stopping: validation loss did not improve by 100.0 for 2 evaluations"
    info, _ = run(tmp_path, tiny_data, "target", eval={"target_ppl": 1e9})
    assert info["steps"] == 0 and info["losses"] == [] and info["stop_reason"].startswith("target_ppl: ")


def test_a_resume_onto_another_data_order_is_refused_in_one_line(tmp_path, tiny_data):
    """The checkpoint holds the stream's state and what fixes the data order; a resume compares them
    with the run's: another seed, shards rebuilt to the same size or another global batch are refused."""
    from korcpt.errors import TrainingError
    from korcpt.shards.reader import open_shards
    from korcpt.shards.writer import ShardOptions, write_shards

    tok, shards = tiny_data
    sections = {"train": {"max_steps": 2, "save_steps": 1, "keep_last": 3, "seed": 3}}
    _, out = run(tmp_path, tiny_data, "order", **sections)
    saved = json.loads((out / "checkpoints/step-00000002/trainer_state.json").read_text())
    assert saved["stream"] == {"seed": 3, "epoch": 0, "consumed": 8, "num_sequences": saved["data_order"]["num_sequences"]}
    assert not {"losses", "history"} & set(saved["state"])  # per-step records live in metrics.jsonl
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["eval", "train", "train", "final"]
    prefix = f"cannot resume from {out / 'checkpoints/step-00000002'}: the data order changed ("
    suffix = "); resume with the checkpoint's settings or start afresh in another output.dir"

    def refused(data, **overrides) -> str:
        cfg = load_config(run_config(tmp_path / "again.yaml", *data, out, train={**sections["train"], **overrides}))
        with pytest.raises(TrainingError) as err:
            train(cfg, resume="auto")
        return str(err.value)

    assert refused(tiny_data, seed=4) == prefix + "seed 3 in the checkpoint, expected 4" + suffix
    assert refused(tiny_data, grad_accum=4) == prefix + "global_batch 4 in the checkpoint, expected 8" + suffix
    rebuilt = tmp_path / "rebuilt"  # the same documents packed in another order (seed 11: as many sequences)
    write_shards(tiny_data[0].parent / "corpus.jsonl", rebuilt, ShardOptions(
        tokenizer=str(tok), seq_len=64, val_fraction=0.1, shard_tokens=4096, seed=11, workers=1))
    assert open_shards(rebuilt, "train").num_sequences == saved["data_order"]["num_sequences"]
    message = refused((tok, rebuilt))
    assert message.startswith(prefix + "shards_sha256 ") and message.endswith(suffix) and "num_sequences" not in message


def test_interrupt_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_data):
    sections = {"train": {"max_steps": 8, "save_steps": 4, "keep_last": 3}}
    _, whole = run(tmp_path, tiny_data, "whole", **sections)
    _, cut = run(tmp_path, tiny_data, "cut", **sections)
    # pretend the run died after the checkpoint at step 4: drop everything written later
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    lines = (cut / "samples/rank000.jsonl").read_text().splitlines()[:4]
    (cut / "samples/rank000.jsonl").write_text("\n".join(lines) + "\n")
    (cut / "adapter_model.safetensors").unlink()
    info, _ = run(tmp_path, tiny_data, "cut", resume="auto", **sections)
    assert info["steps"] == 8
    a, b = adapter(whole), adapter(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (whole / "samples/rank000.jsonl").read_text() == (cut / "samples/rank000.jsonl").read_text()


def test_gradient_checkpointing_still_trains_lora(tmp_path, tiny_data):
    _, plain = run(tmp_path, tiny_data, "plain", train={"max_steps": 2, "warmup_steps": 0})
    _, ckp = run(tmp_path, tiny_data, "ckpt", train={"max_steps": 2, "warmup_steps": 0},
                 model={"gradient_checkpointing": True})
    a, b = adapter(plain), adapter(ckp)
    lora_b = [k for k in b if "lora_B" in k]
    assert lora_b and all(b[k].abs().sum() > 0 for k in lora_b)  # B starts at zero: non-zero means trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_multimodal_gemma3_trains_text_only_and_its_adapter_loads_on_that_class(tmp_path, tiny_data):
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    from korcpt.config import ModelConfig
    from korcpt.model.load import build_random_model

    info, out = run(tmp_path, tiny_data, "mm", model={"name": str(ROOT / "configs/models/tiny_gemma3_mm.json")},
                    train={"max_steps": 3})
    assert info["steps"] == 3
    keys = adapter(out).keys()
    assert keys and all("vision" not in k for k in keys) and any("language_model" in k for k in keys)
    mcfg = ModelConfig(name=str(ROOT / "configs/models/tiny_gemma3_mm.json"), random_init=True,
                       attn_implementation="eager")
    base = build_random_model(mcfg, len(json.loads((tiny_data[0] / "tokenizer.json").read_text())["model"]["vocab"]),
                              torch.float32, seed=3)
    assert isinstance(base, Gemma3ForConditionalGeneration)
    loaded = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


@pytest.mark.parametrize("embeddings", ["frozen", "full"])
def test_chunked_head_loss_trains_like_the_plain_loss(tmp_path, tiny_data, embeddings):
    common = {"max_steps": 2, "warmup_steps": 0}
    plain_info, plain = run(tmp_path, tiny_data, f"plain-{embeddings}", train=common, lora={"embeddings": embeddings})
    info, chunked = run(tmp_path, tiny_data, f"chunked-{embeddings}", train={**common, "loss_chunk_tokens": 16},
                        lora={"embeddings": embeddings})
    assert [x["loss"] for x in info["losses"]] == pytest.approx([x["loss"] for x in plain_info["losses"]], rel=1e-5)
    a, b = adapter(plain), adapter(chunked)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_mcq_and_per_source_evaluation_during_training(tmp_path, tiny_data):
    from korcpt.corpus.mcq import LETTERS

    mcq = tmp_path / "mcq.jsonl"
    rows = [{"question": f"질문 {i}번은 무엇인가?", **{k: f"보기 {k}{i}" for k in LETTERS}, "answer": 1 + i % 5,
             "exam_type": "doctor" if i % 2 else "nurse"} for i in range(10)]
    lines = [__import__("json").dumps(r, ensure_ascii=False) for r in rows] + ['{"question": "broken"', ""]
    mcq.write_text("\n".join(lines) + "\n", encoding="utf-8")
    info, out = run(tmp_path, tiny_data, "mcq", train={"max_steps": 2}, eval={"steps": 0, "mcq_file": str(mcq)})
    assert info["mcq_accuracy_baseline"] is not None and info["mcq_accuracy_final"] is not None
    final = info["history"][-1]
    assert final["mcq_n"] == 10 and final["mcq_skipped"] >= 1
    assert set(final["mcq_by_group"]["exam_type"]) == {"doctor", "nurse"}
    assert {"val_loss_korean", "val_loss_medical_dict"} <= set(final)


# ops that make the host wait for the device on CUDA: a tensor read as a Python number, or an output
# whose size depends on the values. They dispatch on CPU too, so they can be counted here.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim"}


# korcpt's own files: a path test on "/korcpt/" would also take in a venv inside a checkout named korcpt
KORCPT_PACKAGE = str(Path(__import__("korcpt").__file__).resolve().parent) + os.sep


class KorcptHostSyncs(TorchDispatchMode):
    """Counts the host-synchronising ops called from korcpt's own code (innermost non-torch frame)."""

    def __init__(self):
        super().__init__()
        self.where: Counter = Counter()
        self.upstream = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPS:
            frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}torch{os.sep}" not in f.filename]
            caller = frames[-1] if frames else None
            if caller is not None and caller.filename.startswith(KORCPT_PACKAGE):
                self.where[f"{Path(caller.filename).name}:{caller.lineno}"] += 1
            else:
                self.upstream += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("embeddings", ["frozen", "full"])
def test_the_training_step_waits_for_the_device_once_per_optimizer_step(tmp_path, tiny_data, monkeypatch, embeddings):
    """The finite flag, the loss and the token count stay on the device until the step ends: korcpt's
    code makes no host-synchronising call per micro-batch (transformers' own per-forward packed-sequence
    check, ``find_packed_sequence_indices``, is upstream and counted apart)."""
    import korcpt.train.loop as loop

    real = loop.train_step
    per_step: list[KorcptHostSyncs] = []

    def counted(*args, **kwargs):
        with KorcptHostSyncs() as syncs:
            result = real(*args, **kwargs)
        per_step.append(syncs)
        return result

    monkeypatch.setattr(loop, "train_step", counted)
    for accum in (1, 4):
        run(tmp_path, tiny_data, f"sync-{embeddings}-{accum}", model={"dtype": "bfloat16"}, lora={"embeddings": embeddings},
            train={"max_steps": 2, "micro_batch_size": 1, "grad_accum": accum, "loss_chunk_tokens": 16}, eval={"steps": 0})
    assert len(per_step) == 4
    ones, fours = [dict(s.where) for s in per_step[:2]], [dict(s.where) for s in per_step[2:]]
    # as many with 4 micro-batches as with 1; on CPU the step's own sync (.tolist()) reads memory
    # directly, and the first step's one is the DataLoader drawing its base seed when an epoch starts
    assert ones == fours and ones[1] == {} and sum(ones[0].values()) <= 1, (ones, fours)
    assert per_step[2].upstream > per_step[0].upstream  # the counter sees syncs: transformers' per forward


def test_the_schedule_is_transformers_cosine_and_staging_holds_lora_at_zero(tmp_path, pretrained_tiny, extended_tiny):
    """lr_multiplier is transformers' cosine_with_min_lr; with lora.embeddings_first_steps the LoRA group
    stays at 0 for those steps and then runs its own warmup and decay, while the rows keep the whole run's."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from korcpt.model.load import load_model_and_tokenizer
    from korcpt.model.lora import apply_lora
    from korcpt.train.optim import build_optimizer, lr_multiplier

    tok, shards = extended_tiny
    cfg = load_config(run_config(tmp_path / "staged.yaml", tok, shards, tmp_path / "out",
                                 model={"name": str(pretrained_tiny), "random_init": False},
                                 lora={"embeddings": "new_tokens", "embedding_lr": 0.01, "embeddings_first_steps": 4},
                                 train={"max_steps": 10, "warmup_steps": 2, "lr": 0.005}))
    reference = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=2, num_training_steps=10,
        min_lr_rate=cfg.train.min_lr_ratio).lr_lambdas[0]
    assert [lr_multiplier(cfg, 10)(s) for s in range(12)] == pytest.approx([reference(s) for s in range(12)], abs=1e-12)

    model, _, new_ids = load_model_and_tokenizer(cfg.model, torch.device("cpu"), cfg.train.seed)
    optimizer, scheduler = build_optimizer(apply_lora(model, cfg.lora, new_ids, seed=3), cfg, total_steps=10)
    lora, rows = [], []
    for _ in range(10):
        lora.append(optimizer.param_groups[0]["lr"])
        rows.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    later = lr_multiplier(cfg, 6)
    assert lora == pytest.approx([0.0] * 4 + [0.005 * later(s) for s in range(6)], abs=1e-12)
    assert lora[4] == 0.0 and lora[5] == pytest.approx(0.0025)  # LoRA's own warmup starts at step 4
    assert rows == pytest.approx([0.01 * reference(s) for s in range(10)], abs=1e-12)


def test_staging_needs_trainable_rows_and_fewer_steps_than_the_run(tmp_path, tiny_data):
    from korcpt.errors import ConfigError

    tok, shards = tiny_data
    with pytest.raises(ConfigError, match="needs lora.embeddings new_tokens or full"):
        load_config(run_config(tmp_path / "a.yaml", tok, shards, tmp_path / "o", lora={"embeddings_first_steps": 2}))
    with pytest.raises(ConfigError, match=r"embeddings_first_steps \(6\) must be below train.max_steps \(6\)"):
        load_config(run_config(tmp_path / "b.yaml", tok, shards, tmp_path / "o",
                               lora={"embeddings": "full", "embeddings_first_steps": 6}))
