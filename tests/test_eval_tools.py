"""tools/eval_mcq.py and tools/eval_ppl.py end to end on a tiny saved model (and a trained-style adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from korcpt.corpus.mcq import parse_mcq_record
from korcpt.eval.mcq import build_letter_prompt, load_mcq, score_mcq

from test_eval_mcq import fixture_records, tiny_tokenizer, write_jsonl
from tinyrun import ROOT, tiny_model

REPORT_KEYS = {"accuracy", "n", "n_skipped", "ci95", "mode", "shots", "chance", "by_group"}


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    items = [parse_mcq_record(r) for r in fixture_records(60)]
    tok = tiny_tokenizer(tmp, items)
    model = tiny_model(len(tok))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    write_jsonl(tmp / "test.jsonl", fixture_records(12) + ['{"question": "x", "answer": 1}', "[1, 2"])
    write_jsonl(tmp / "few.jsonl", fixture_records(20)[12:])
    return tmp, items


def test_eval_mcq_cli_writes_report_and_predictions(saved):
    tmp, _ = saved
    out, preds = tmp / "r.json", tmp / "p.jsonl"
    proc = run_tool("eval_mcq.py", "--model", tmp / "model", "--data", tmp / "test.jsonl", "--fewshot",
                    tmp / "few.jsonl", "--shots", 2, "--batch-size", 5, "--out", out, "--predictions", preds)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["n"] == 12 and report["n_skipped"] == 2 and report["mode"] == "letter" and report["shots"] == 2
    assert 0.0 <= report["ci95"][0] <= report["accuracy"] <= report["ci95"][1] <= 1.0
    assert any(":13:" in s for s in report["skipped"]) and any(":14: invalid JSON" in s for s in report["skipped"])
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 12 and sum(p["correct"] for p in lines) == report["n_correct"]
    assert "accuracy" in proc.stderr

    proc = run_tool("eval_mcq.py", "--model", tmp / "model", "--data", tmp / "test.jsonl", "--mode", "choice",
                    "--max-questions", 4, "--out", tmp / "c.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp / "c.json").read_text())
    assert report["mode"] == "choice" and report["n"] == 4 and "accuracy_raw" in report and report["shots"] == 0


def test_eval_mcq_cli_user_errors_are_one_line(saved):
    tmp, _ = saved
    proc = run_tool("eval_mcq.py", "--model", tmp / "model", "--data", tmp / "missing.jsonl")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: MCQ file not found")
    proc = run_tool("eval_mcq.py", "--model", tmp / "model", "--data", tmp / "few.jsonl", "--fewshot",
                    tmp / "few.jsonl", "--shots", 9)
    assert proc.returncode == 2 and "expected 9" in proc.stderr


def test_eval_mcq_cli_loads_adapter_with_extended_tokenizer(saved, tmp_path):
    """An adapter dir as the trainer writes it: LoRA + trained token rows, the run's tokenizer in tokenizer/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from korcpt.config import ModelConfig
    from korcpt.model.load import load_model_and_tokenizer

    tmp, items = saved
    ext = AutoTokenizer.from_pretrained(tmp / "model")
    ext.add_tokens(["적절한처치"])
    ext.save_pretrained(tmp_path / "ext")
    base, tok, new_ids = load_model_and_tokenizer(ModelConfig(name=str(tmp / "model"), tokenizer=str(tmp_path / "ext")),
                                                  torch.device("cpu"))
    assert len(new_ids) == 1
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 trainable_token_indices={"embed_tokens": new_ids}))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "run"
    peft_model.save_pretrained(adapter, save_embedding_layers=False)  # as the trainer: rows via trainable tokens
    tok.save_pretrained(adapter / "tokenizer")
    expected = score_mcq(peft_model.eval(), tok, load_mcq(tmp / "test.jsonl")[0][:5], mode="letter")
    plain = score_mcq(tiny_model(len(tok) - 1), tok, load_mcq(tmp / "test.jsonl")[0][:5], mode="letter")
    assert expected["predictions"][0]["logprobs"] != pytest.approx(plain["predictions"][0]["logprobs"], abs=1e-3)

    proc = run_tool("eval_mcq.py", "--model", tmp / "model", "--adapter", adapter, "--data", tmp / "test.jsonl",
                    "--max-questions", 5, "--out", tmp_path / "a.json", "--predictions", tmp_path / "a.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(got) == 5
    for a, b in zip(got, expected["predictions"]):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    assert json.loads((tmp_path / "a.json").read_text())["adapter"] == str(adapter)


def test_eval_ppl_cli_on_built_shards(saved, tmp_path):
    tmp, items = saved
    corpus = [{"text": build_letter_prompt(it, []) + " " + it.answer_letter, "source": ("korean", "mcq")[i % 2]}
              for i, it in enumerate(items)]
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), "--from-jsonl",
                           tmp_path / "corpus.jsonl", "--tokenizer", tmp / "model", "--seq-len", "32",
                           "--val-fraction", "0.3", "--workers", "1", "--out", tmp_path / "shards"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from korcpt.shards.reader import open_shards

    val = open_shards(tmp_path / "shards", "val")
    expected_tokens = sum(int((val.sample(i)["labels"] != -100).sum()) for i in range(min(5, val.num_sequences)))

    proc = run_tool("eval_ppl.py", "--model", tmp / "model", "--shards", tmp_path / "shards",
                    "--max-val-sequences", 5, "--batch-size", 2, "--out", tmp_path / "ppl.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert result["sequences"] == 5 and result["tokens"] == expected_tokens > 0
    assert abs(result["ppl"] - 2.718281828 ** result["loss"]) < 1e-6 * result["ppl"]
    assert set(result["by_source"]) <= {"korean", "mcq"} and result["by_source"]
    assert sum(s["tokens"] for s in result["by_source"].values()) == result["tokens"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, pretrained_tiny) -> dict[bool, Path]:
    """document_mask -> the output directory of a 1-step run from the pretrained tiny Gemma 3."""
    from korcpt.config import load_config
    from korcpt.train.loop import train
    from tinyrun import run_config

    tok, shards = tiny_data
    tmp = tmp_path_factory.mktemp("ppl_runs")
    outs = {}
    for mask in (False, True):
        out = tmp / f"mask_{mask}"
        cfg = run_config(tmp / f"mask_{mask}.yaml", tok, shards, out, data={"document_mask": mask},
                         model={"name": str(pretrained_tiny), "random_init": False},
                         train={"max_steps": 1, "lr": 0.05}, eval={"max_val_sequences": 8, "batch_size": 4})
        train(load_config(cfg))
        outs[mask] = out
    return outs


def eval_ppl_loss(tmp_path: Path, run: Path, shards: Path, base: Path, *flags) -> float:
    out = tmp_path / f"ppl{len(list(tmp_path.iterdir()))}.json"
    proc = run_tool("eval_ppl.py", "--model", base, "--adapter", run, "--shards", shards, "--max-val-sequences", 8,
                    "--batch-size", 4, "--out", out, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["loss"]


def test_eval_ppl_masks_documents_as_the_trainer_did(runs, tiny_data, pretrained_tiny, tmp_path):
    # Before, eval_ppl passed the reader's restarting position_ids whatever the setting, so transformers
    # masked per document by itself: a run trained without document masking was scored with it.
    shards = tiny_data[1]
    trainer = {mask: json.loads((out / "training_info.json").read_text())["val_loss_final"]
               for mask, out in runs.items()}
    off = eval_ppl_loss(tmp_path, runs[False], shards, pretrained_tiny)  # the run's config.yaml: off
    on = eval_ppl_loss(tmp_path, runs[True], shards, pretrained_tiny)  # the run's config.yaml: on
    assert off == pytest.approx(trainer[False], rel=1e-5)
    assert on == pytest.approx(trainer[True], rel=1e-5)
    # the flag overrides the run's setting, and the setting matters on these packed shards
    forced = eval_ppl_loss(tmp_path, runs[False], shards, pretrained_tiny, "--document-mask")
    assert abs(forced - off) > 1e-3


# Held-out style sentences written for this test (not from any corpus).
BPC_DOCS = ["환자는 사흘 전부터 기침과 미열이 있었고, 어제부터 숨이 차다고 호소하였다.",
            "혈압은 142/88 mmHg였으며 청진에서 양측 하엽에 수포음이 들렸다.",
            "흉부 X선 검사를 시행하였고 항생제 치료를 시작하기로 하였다. 경과는 좋았다."]


def test_eval_ppl_text_mode_is_bits_per_character_as_plain_transformers_computes_it(pretrained_tiny, tmp_path):
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("\n".join([json.dumps({"text": t}, ensure_ascii=False) for t in BPC_DOCS]
                               + ['{"text": ""}', "not json"]) + "\n", encoding="utf-8")
    txt = tmp_path / "held_out.txt"
    txt.write_text("\n\n".join(BPC_DOCS) + "\n", encoding="utf-8")
    reports = []
    for source in (jsonl, txt):
        proc = run_tool("eval_ppl.py", "--model", pretrained_tiny, "--text", source, "--out", tmp_path / "r.json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.loads((tmp_path / "r.json").read_text()))
    assert reports[0]["skipped"] == 2 and reports[1]["skipped"] == 0
    # the reference: each document alone from <bos>, every later token a target, no <eos>
    tok = AutoTokenizer.from_pretrained(pretrained_tiny)
    model = AutoModelForCausalLM.from_pretrained(pretrained_tiny, torch_dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    for text in BPC_DOCS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum").item()
        tokens += len(ids) - 1
    chars = sum(len(t) for t in BPC_DOCS)
    for report in reports:
        assert (report["tokens"], report["chars"], report["documents"]) == (tokens, chars, 3)
        assert report["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=5e-3)  # the 0.5%
        assert report["bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)  # measured: padding only
        assert report["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
        syllables = sum("가" <= c <= "힣" for t in BPC_DOCS for c in t)
        assert report["bits_per_syllable"] == pytest.approx(nll / math.log(2) / syllables, rel=1e-5)
    bad = run_tool("eval_ppl.py", "--model", pretrained_tiny, "--text", tmp_path / "held_out.csv")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'held_out.csv'}: expected a .txt (a document a line) or .jsonl ({{\"text\"}} a line) file")
