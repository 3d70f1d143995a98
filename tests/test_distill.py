"""Distilled new-token rows (korcpt.model.distill, tools/distill_rows.py): the hidden-state distance falls
below the mean initialisation's in float32 and bfloat16, the same bytes twice, rows round-trip into the
model, and a run trained from them loads with PEFT's AutoPeftModelForCausalLM and merges."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from korcpt.model.distill import DistillOptions, distill_rows
from korcpt.model.embeddings import ROWS_FILE, read_rows
from tinyrun import ROOT


def options(pretrained, tokenizer, out, **kw) -> DistillOptions:
    values = dict(model=str(pretrained), tokenizer=tokenizer, corpus=tokenizer.parent / "corpus.jsonl", out_dir=out,
                  contexts_per_token=4, context_tokens=24, epochs=3, lr=0.002, depth=1.0, output="ntp",
                  batch_size=8, output_steps=20, attn_implementation="eager")
    return DistillOptions(**{**values, **kw})


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, pretrained_tiny, extended_tiny):
    """float32 rows distilled twice with one seed, and once in bfloat16."""
    root = tmp_path_factory.mktemp("distilled")
    tok = extended_tiny[0]
    runs = {name: (root / name, distill_rows(options(pretrained_tiny, tok, root / name, dtype=dtype)))
            for name, dtype in (("a", "float32"), ("b", "float32"), ("bf16", "bfloat16"))}
    return runs


@pytest.mark.parametrize("name", ["a", "bf16"])
def test_distillation_beats_the_mean_initialisation(distilled, name):
    out, report = distilled[name]
    assert report["loss_final"] < 0.8 * report["loss_mean_init"], (report["loss_mean_init"], report["loss_final"])
    assert report["cost"]["held_out_windows"] > 0  # the distances above are on windows never trained on
    assert report["loss_per_epoch"][-1] < report["loss_per_epoch"][0]
    tokens = [t for t in report["tokens"] if t["contexts"]]
    assert len(tokens) == report["new_tokens"] - report["too_few_contexts"]["count"] > 0
    assert all(t["loss_last_epoch"] is not None for t in tokens if t["contexts"] >= 2)
    assert report["ntp_loss"][1] < report["ntp_loss"][0]
    cost = report["cost"]
    assert cost["flops"] == cost["flops_input_rows"] + cost["flops_output_rows"] > 0
    assert cost["tokens_read"] == (report["options"]["epochs"] * (cost["teacher_tokens"] + cost["student_tokens"])
                                   + 2 * cost["held_out_tokens"] + cost["output_positions"])
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f"{name}.")) == []  # no staging left


def test_same_seed_same_bytes(distilled):
    (a, _), (b, _) = distilled["a"], distilled["b"]
    assert (a / ROWS_FILE).read_bytes() == (b / ROWS_FILE).read_bytes()
    first, inputs, outputs = read_rows(a)
    assert inputs.dtype == outputs.dtype == torch.float32 and not torch.equal(inputs, outputs)


@pytest.fixture(scope="module", params=["causal", "multimodal", "full"])
def trained_from_rows(request, tmp_path_factory, distilled, pretrained_tiny, extended_tiny):
    """A 2-step run from distilled rows (vocabulary padded 552 -> 576) on Gemma3ForCausalLM, on MedGemma's
    multimodal class (rows distilled from that model), and with the whole embedding trained (full)."""
    from korcpt.config import load_config
    from korcpt.train.loop import train
    from tinyrun import run_config

    root = tmp_path_factory.mktemp(f"trained_rows_{request.param}")
    tok, shards = extended_tiny
    model = pretrained_tiny
    rows = distilled["a"][0]
    if request.param == "multimodal":
        model = request.getfixturevalue("pretrained_tiny_mm")
        rows = root / "rows"
        distill_rows(options(model, tok, rows, epochs=1))
    out = root / "out"
    train(load_config(run_config(root / "run.yaml", tok, shards, out,
                                 model={"name": str(model), "random_init": False, "new_rows": str(rows)},
                                 lora={"embeddings": "full" if request.param == "full" else "new_tokens"},
                                 train={"max_steps": 2}, eval={"steps": 0})))
    return model, rows, out, tok


def test_rows_start_the_run_and_load_anywhere(trained_from_rows, tmp_path):
    """The untrained model reads the file's rows; the trained run loads with AutoPeftModelForCausalLM and
    merges (untied head) to the logits korcpt's own loader gives."""
    from peft import AutoPeftModelForCausalLM
    
    from korcpt.config import ModelConfig
    from korcpt.eval.loading import load_for_eval
    from korcpt.model.load import load_model_and_tokenizer

    pretrained, rows_dir, out, tok_dir = trained_from_rows
    first, inputs, outputs = read_rows(rows_dir)
    model, tok, new_ids = load_model_and_tokenizer(
        ModelConfig(name=str(pretrained), tokenizer=str(tok_dir), new_rows=str(rows_dir),
                    attn_implementation="eager"), torch.device("cpu"))
    n = len(new_ids)
    assert new_ids[0] == first and n == len(inputs)
    torch.testing.assert_close(model.get_input_embeddings().weight[first:first + n], inputs, rtol=0, atol=0)
    hidden = torch.randn(3, inputs.shape[1])
    logits = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(logits[:, first:first + n], hidden @ outputs.T)

    text = (tok_dir.parent / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[0]
    ids = torch.tensor([tok(json.loads(text)["text"])["input_ids"][:40]])
    assert (ids >= first).any()
    adapted, _ = load_for_eval(str(pretrained), adapter=out)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(auto.get_base_model()) is type(adapted.get_base_model())
    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/merge_adapter.py", "--model", str(pretrained), "--adapter",
                           str(out), "--out", str(merged_dir)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = type(adapted.get_base_model()).from_pretrained(merged_dir).eval()
    assert not merged.config.tie_word_embeddings
    with torch.no_grad():
        want = adapted(input_ids=ids).logits[..., :len(tok)]
        got_auto = auto(input_ids=ids).logits
        got_merged = merged(input_ids=ids).logits[..., :len(tok)]
    assert got_auto.shape[-1] == len(tok)
    torch.testing.assert_close(got_auto, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_merged, want, rtol=1e-4, atol=1e-4)
    # the output rows trained apart from the input rows
    from safetensors.torch import load_file

    state = load_file(str(out / "adapter_model.safetensors"))
    rows = [v for k, v in state.items() if "trainable_tokens_delta" in k]
    assert len(rows) == 2 and not torch.equal(rows[0], rows[1].flip(0))


def test_a_killed_run_leaves_the_previous_rows_alone(tmp_path, distilled, pretrained_tiny, extended_tiny):
    import shutil

    out = tmp_path / "rows"
    shutil.copytree(distilled["a"][0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    tok = extended_tiny[0]
    cmd = [sys.executable, "tools/distill_rows.py", "--model", str(pretrained_tiny), "--tokenizer", str(tok),
           "--corpus", str(tok.parent / "corpus.jsonl"), "--out", str(out), "--epochs", "1000", "--depth", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # killed once it is distilling, long before it would write anything
        if "distilling 40 new rows" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows"]  # nothing staged beside it either


def test_bad_rows_and_options_are_one_line_errors(tmp_path, distilled, pretrained_tiny, extended_tiny, tiny_data):
    from korcpt.config import ModelConfig, load_config
    from korcpt.errors import ModelError
    from korcpt.model.embeddings import write_rows
    from korcpt.model.load import load_model_and_tokenizer
    from tinyrun import run_config

    tok = extended_tiny[0]
    first, inputs, outputs = read_rows(distilled["a"][0])
    short = tmp_path / "short"
    write_rows(short, inputs[:-1], outputs[:-1], first, {})
    mcfg = ModelConfig(name=str(pretrained_tiny), tokenizer=str(tok), new_rows=str(short), attn_implementation="eager")
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(mcfg, torch.device("cpu"))
    assert str(err.value) == (f"model.new_rows: {short} holds 39 rows of 64 from id 512; expected 40 rows of 64 from "
                              "id 512 (rows of another tokenizer or model?)")
    with pytest.raises(ModelError, match=f"model.new_rows: {tmp_path} has no rows.safetensors"):
        read_rows(tmp_path)
    cfg = run_config(tmp_path / "c.yaml", tok, extended_tiny[1], tmp_path / "out",
                     model={"name": str(pretrained_tiny), "random_init": False, "new_rows": str(tmp_path / "none")})
    with pytest.raises(Exception) as err:
        load_config(cfg)
    assert "model.new_rows holds rows of an extended tokenizer's new tokens: it needs model.tokenizer and " \
           "lora.embeddings new_tokens or full" in str(err.value)
    assert f"model.new_rows: no rows.safetensors in {tmp_path / 'none'}" in str(err.value)
    with pytest.raises(ModelError, match="depth is 0.0, expected a share of the decoder layers in"):
        distill_rows(options(pretrained_tiny, tok, tmp_path / "x", depth=0.0))
    with pytest.raises(ModelError, match=r"output_base_share is 0.0, expected a share in \(0, 1\]"):
        distill_rows(options(pretrained_tiny, tok, tmp_path / "x", output_base_share=0.0))
    with pytest.raises(ModelError, match="output is 'best', expected one of tied, mean, piece_fit, ntp"):
        distill_rows(options(pretrained_tiny, tok, tmp_path / "x", output="best"))
    with pytest.raises(ModelError, match="adds no token to"):
        distill_rows(options(pretrained_tiny, tiny_data[0], tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_the_output_fit_keeps_every_new_target_and_a_weighted_share_of_the_rest():
    from korcpt.model.distill import keep_positions

    h = torch.arange(4000.0)[:, None]
    targets = torch.tensor([10, 200, 300, 20] * 1000)  # ids from 100 are new: half the positions
    same = keep_positions(h, targets, 100, 1.0, seed=0)
    assert torch.equal(same[0], h) and torch.equal(same[1], targets) and torch.equal(same[2], torch.ones(4000))
    kept_h, kept_t, weight = keep_positions(h, targets, 100, 0.25, seed=0)
    assert (kept_t >= 100).sum() == 2000  # every new-token target
    assert torch.equal(weight, torch.where(kept_t >= 100, 1.0, 4.0))
    assert 400 < (kept_t < 100).sum() < 600 and weight.sum().item() == pytest.approx(4000, rel=0.1)
    assert torch.equal(kept_t, targets[kept_h[:, 0].long()])  # states and targets stay paired
    assert torch.equal(keep_positions(h, targets, 100, 0.25, seed=0)[0], kept_h)  # seeded
