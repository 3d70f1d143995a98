"""Validation perplexity: token-weighted over the whole set, per source, the same from 1 and 2 ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from korcpt.eval.perplexity import evaluate_perplexity
from korcpt.model.loss import forward_kwargs, token_nll
from tinyrun import tiny_model

VOCAB = 97


def packed_batches(seed: int = 1) -> list[dict]:
    """Batches the way the packed reader yields them (labels aligned, -100 ignored), with very
    different numbers of targets per batch and a per-token source id."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for rows, seq, n_ignored in [(2, 16, 0), (1, 16, 13), (3, 8, 2), (2, 12, 10), (1, 24, 0), (2, 16, 15)]:
        window = torch.randint(2, VOCAB, (rows, seq + 1), generator=g)
        labels = window[:, 1:].clone()
        labels[:, :n_ignored] = -100
        position_ids = torch.arange(seq).repeat(rows, 1)
        source = torch.randint(0, 2, (rows, seq), generator=g)
        batches.append({"input_ids": window[:, :-1], "labels": labels, "position_ids": position_ids,
                        "token_source": source})
    return batches


def hand_nll(model, batch) -> tuple[list[float], list[int]]:
    """Per-target NLL and source ids, computed independently (log_softmax in float64, explicit loop)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    nll, src = [], []
    for r in range(batch["labels"].shape[0]):
        for t in range(batch["labels"].shape[1]):
            y = int(batch["labels"][r, t])
            if y != -100:
                nll.append(-float(logp[r, t, y]))
                src.append(int(batch["token_source"][r, t]))
    return nll, src


def test_perplexity_is_exp_of_token_weighted_nll_not_mean_of_batch_means():
    model = tiny_model(VOCAB)
    batches = packed_batches()
    all_nll, all_src, batch_means = [], [], []
    for b in batches:
        nll, src = hand_nll(model, b)
        all_nll += nll
        all_src += src
        batch_means.append(sum(nll) / len(nll))
    expected = sum(all_nll) / len(all_nll)
    result = evaluate_perplexity(model, batches, source_names=["korean", "medical"])

    assert result["tokens"] == len(all_nll) == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert result["sequences"] == sum(b["input_ids"].shape[0] for b in batches)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    mean_of_means = sum(batch_means) / len(batch_means)
    assert abs(mean_of_means - expected) > 1e-3, "fixture too uniform: mean of batch means equals the answer"
    for sid, name in enumerate(["korean", "medical"]):
        part = [x for x, s in zip(all_nll, all_src) if s == sid]
        assert result["by_source"][name]["tokens"] == len(part) > 0
        assert result["by_source"][name]["loss"] == pytest.approx(sum(part) / len(part), rel=1e-5)


def test_token_nll_matches_hand_sum_and_keeps_gradients():
    model = tiny_model(VOCAB)
    batch = packed_batches()[1]
    nll_sum, n = token_nll(model.train(), {k: v for k, v in batch.items() if k != "token_source"})
    nll, _ = hand_nll(model, batch)
    assert nll_sum.dtype == torch.float32 and int(n) == len(nll) == 3
    assert float(nll_sum.detach()) == pytest.approx(sum(nll), rel=1e-5)
    nll_sum.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_evaluation_restores_training_mode_and_handles_empty_set():
    model = tiny_model(VOCAB).train()
    result = evaluate_perplexity(model, [])
    assert model.training
    assert result["tokens"] == 0 and math.isnan(result["loss"]) and "by_source" not in result


def test_forward_kwargs_adds_token_type_ids_for_multimodal_gemma3():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "position_ids": torch.zeros(2, 3, dtype=torch.long)}

    class Fake(torch.nn.Module):
        def __init__(self, model_type):
            super().__init__()
            self.config = type("C", (), {"model_type": model_type})()

    assert "token_type_ids" not in forward_kwargs(Fake("gemma3_text"), batch)
    kwargs = forward_kwargs(Fake("gemma3"), batch)
    assert torch.equal(kwargs["token_type_ids"], torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(kwargs["position_ids"], batch["position_ids"]) and "attention_mask" not in kwargs

    class Wrapped(torch.nn.Module):  # DDP / DeepSpeed keep the model in .module and have no .config
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert "token_type_ids" in forward_kwargs(Wrapped(Fake("gemma3")), batch)
    # the trainer's per-document masking kwargs pass through; metadata does not
    extra = {**batch, "cu_seq_lens_q": torch.tensor([0, 3]), "max_length_q": 3, "labels": batch["input_ids"],
             "sample_id": torch.tensor([0, 1]), "token_source": torch.zeros(2, 3)}
    kwargs = forward_kwargs(Fake("gemma3_text"), extra)
    assert set(kwargs) == {"input_ids", "position_ids", "use_cache", "cu_seq_lens_q", "max_length_q"}


# ---- 1 vs 2 processes: this file is also the worker script (torchrun + Accelerator, gloo on CPU).

def _distributed_worker(model_dir: str, out: str) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    mine = packed_batches()[accelerator.process_index::accelerator.num_processes]
    result = evaluate_perplexity(model, mine, reduce=lambda t: accelerator.reduce(t, "sum"),
                                 source_names=["korean", "medical"])
    local = evaluate_perplexity(model, mine)
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps({"world_size": accelerator.num_processes, "result": result,
                                         "local_tokens": local["tokens"]}))
    accelerator.wait_for_everyone()  # leave together (see test_eval_mcq's worker)
    accelerator.end_training()


@pytest.mark.slow
def test_one_and_two_processes_agree(tmp_path):
    model = tiny_model(VOCAB)
    model.save_pretrained(tmp_path / "model")
    single = evaluate_perplexity(model, packed_batches(), source_names=["korean", "medical"])
    out = tmp_path / "two.json"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    # torchrun (gloo): `accelerate launch --cpu` starts a single process unless MPI is set up.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path / "model"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2
    assert 0 < two["local_tokens"] < single["tokens"]  # rank 0 really saw only part of the set
    assert two["result"]["tokens"] == single["tokens"]
    assert two["result"]["sequences"] == single["sequences"]
    assert two["result"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert two["result"]["ppl"] == pytest.approx(single["ppl"], rel=1e-6)
    for name in ("korean", "medical"):
        assert two["result"]["by_source"][name]["loss"] == pytest.approx(single["by_source"][name]["loss"], rel=1e-6)


if __name__ == "__main__":
    _distributed_worker(sys.argv[1], sys.argv[2])
