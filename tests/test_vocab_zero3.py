"""resize_and_init_embeddings under DeepSpeed ZeRO-3 (2 CPU processes, gloo) gives the same rows as
in one process. This file is also the worker script that torchrun runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tinyrun import ROOT
LINES = ["오늘 아침에 우리는 학교에 갔다.", "친구와 함께 시장에 가서 과일을 샀다.", "The quick brown fox."] * 3
EXTENSION = [f"어제 당뇨병{p} 검진 결과를 들었다." for p in ["은", "이", "을", ""]] * 2 + ["고혈압 폐렴"] * 2


def _worker(model_dir: str, base_dir: str, new_dir: str, out: str) -> None:
    import json

    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from korcpt.model.embeddings import resize_and_init_embeddings

    world = int(os.environ["WORLD_SIZE"])
    ds_config = json.loads((ROOT / "configs" / "deepspeed" / "cpu_zero3.json").read_text())
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_batch_size=world,
                     gradient_clipping=1.0)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        ds_config["zero_optimization"][key] = 0 if "threshold" in key else 10_000
    deepspeed.init_distributed(dist_backend="gloo")
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (while alive, from_pretrained builds under zero.Init)
    assert is_deepspeed_zero3_enabled()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    weight = model.get_input_embeddings().weight
    assert hasattr(weight, "ds_id") and weight.numel() == 0, "expected a ZeRO-3 partitioned embedding"
    base, new = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(new_dir)
    ids = resize_and_init_embeddings(model, base, new)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    inner = engine.module
    emb = inner.get_input_embeddings().weight
    assert hasattr(emb, "ds_id"), "the resized embedding should be partitioned again by the engine"
    assert inner.get_output_embeddings().weight is emb
    batch = torch.tensor([[2, ids[0], ids[-1], 5]])
    loss = engine(input_ids=batch, labels=batch).loss
    assert torch.isfinite(loss)
    with deepspeed.zero.GatheredParameters([emb]):
        full = emb.detach().clone()
    # A model already large enough is not resized: its partitioned rows are gathered, written, re-partitioned.
    big = AutoModelForCausalLM.from_pretrained(model_dir + "_big")
    big_emb = big.get_input_embeddings().weight
    assert hasattr(big_emb, "ds_id") and big_emb.numel() == 0
    resize_and_init_embeddings(big, base, new)
    assert big_emb.numel() == 0  # still partitioned
    with deepspeed.zero.GatheredParameters([big_emb]):
        big_full = big_emb.detach().clone()
    if engine.global_rank == 0:
        torch.save({"weight": full, "vocab_size": inner.config.vocab_size, "ids": ids, "big": big_full,
                    "world_size": engine.world_size, "local_numel": emb.ds_tensor.numel()}, out)
    torch.distributed.barrier()  # leave together (see test_eval_mcq's worker)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero3_resize_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from korcpt.model.embeddings import resize_and_init_embeddings
    from korcpt.vocab.extend import build_extended_tokenizer, learn_extension
    from korcpt.assets import train_tiny_tokenizer

    (tmp_path / "base.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    train_tiny_tokenizer([tmp_path / "base.txt"], tmp_path / "base", vocab_size=300)
    base = AutoTokenizer.from_pretrained(tmp_path / "base")
    new = build_extended_tokenizer(base, learn_extension(base, EXTENSION, max_new_tokens=20), tmp_path / "new")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(base), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "model")
    single = Gemma3ForCausalLM.from_pretrained(tmp_path / "model")
    single_ids = resize_and_init_embeddings(single, base, new)
    big_config = Gemma3TextConfig(**{**config.to_dict(), "vocab_size": single.config.vocab_size})
    torch.manual_seed(1)
    Gemma3ForCausalLM(big_config).save_pretrained(tmp_path / "model_big")
    big = Gemma3ForCausalLM.from_pretrained(tmp_path / "model_big")
    big_before = big.get_input_embeddings().weight.detach().clone()
    resize_and_init_embeddings(big, base, new)

    out = tmp_path / "zero3.pt"
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # torchrun + deepspeed.initialize: on CPU, Accelerator(cpu=True) drops the DeepSpeed plugin and
    # Accelerator() reports one process, so accelerate cannot build the ZeRO-3 engine here.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path / "model"), str(tmp_path / "base"), str(tmp_path / "new"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = torch.load(out)
    expected = single.get_input_embeddings().weight.detach()
    assert two["world_size"] == 2 and two["ids"] == single_ids
    assert two["vocab_size"] == single.config.vocab_size == expected.shape[0] and expected.shape[0] % 64 == 0
    assert 0 < two["local_numel"] < expected.numel()  # really partitioned across the two ranks
    assert torch.equal(two["weight"], expected)
    big_expected = big.get_input_embeddings().weight.detach()
    assert torch.equal(two["big"], big_expected) and not torch.equal(big_before, big_expected)
    assert torch.equal(two["big"][: len(base)], big_before[: len(base)])


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
