"""KorMedMCQA scoring: loading with skips, few-shot prompts, letter/choice modes, ranks, memorisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from korcpt.corpus.mcq import LETTERS, MCQItem, parse_mcq_record
from korcpt.errors import DataError
from korcpt.eval.mcq import (build_choice_context, build_letter_prompt, load_mcq, score_mcq, select_fewshot,
                             wilson_interval)
from tinyrun import tiny_model

EXAM_TYPES = ("doctor", "nurse", "pharm")
SUBJECTS = ("내과", "외과", "약리학", "간호학", "소아과")
CONDITIONS = ("고혈압", "당뇨병", "폐렴", "빈혈", "천식", "위염", "간염", "골절", "편두통", "신부전", "결핵", "장염")
TREATMENTS = ("수액 투여", "항생제 처방", "수술 시행", "경과 관찰", "인슐린 주사", "혈압약 복용", "산소 공급",
              "진통제 투여", "수혈", "식이 조절")


def fixture_records(n: int) -> list[dict]:
    """n KorMedMCQA-format records; answers cycle through 1..5 so that a constant guess scores 20%."""
    records = []
    for i in range(n):
        cond = CONDITIONS[i % len(CONDITIONS)]
        options = {letter: f"{TREATMENTS[(i * 3 + j * 7) % len(TREATMENTS)]} {i}-{j}" for j, letter in enumerate(LETTERS)}
        records.append({"question": f"{i}번 {cond} 환자에게 가장 적절한 처치는 무엇인가?", **options,
                        "answer": i % 5 + 1, "exam_type": EXAM_TYPES[i % 3], "subject": SUBJECTS[(i // 3) % 5],
                        "q_number": i + 1})
    return records


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def tiny_tokenizer(tmp_path: Path, items: list[MCQItem]):
    """A small byte-fallback BPE trained on the fixture prompts with their answers (so that ' A'..' E'
    are tokens, as in Gemma's vocabulary)."""
    from transformers import AutoTokenizer

    from korcpt.assets import train_tiny_tokenizer

    text = tmp_path / "tok_text.txt"
    text.write_text("\n".join(build_letter_prompt(it, []) + " " + it.answer_letter for it in items), encoding="utf-8")
    train_tiny_tokenizer([text], tmp_path / "tok", vocab_size=700)
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcq")
    items = [parse_mcq_record(r) for r in fixture_records(60)]
    tok = tiny_tokenizer(tmp, items)
    return tmp, items, tok


# ---------------------------------------------------------------------------------------------- loading

def test_load_mcq_reports_and_skips_malformed_lines(tmp_path):
    good = fixture_records(4)
    missing_option = {k: v for k, v in good[1].items() if k != "C"}
    path = write_jsonl(tmp_path / "test.jsonl", [
        good[0],
        "{not json",
        {**good[1], "answer": 6},
        missing_option,
        "",
        {**good[2], "answer": 0},
        {**good[2], "answer": "B"},
        good[3],
    ])
    items, skipped = load_mcq(path)
    assert [it.question for it in items] == [good[0]["question"], good[3]["question"]]
    assert items[1].answer == 3 and items[1].meta["exam_type"] == "doctor"
    assert len(skipped) == 5
    assert skipped[0].startswith(f"{path}:2: invalid JSON")
    assert f"{path}:3:" in skipped[1] and "1..5" in skipped[1]
    assert f"{path}:4:" in skipped[2] and "'C'" in skipped[2]
    assert [s.split(":")[1] for s in skipped] == ["2", "3", "4", "6", "7"]


def test_load_mcq_missing_or_empty_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_mcq(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_mcq(tmp_path / "empty.jsonl")


def test_wilson_interval():
    low, high = wilson_interval(12, 60)
    assert low < 0.2 < high and 0.11 < low < 0.13 and 0.31 < high < 0.33
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 0) == [0.0, 1.0]


@pytest.mark.parametrize("n", [1, 3, 6, 7, 10, 60, 604, 1000, 3000])
def test_wilson_interval_holds_the_estimate_exactly(n):
    # Before the clamp, k = 0 with n = 3 gave a lower bound of 5.6e-17, above the accuracy 0.0.
    assert wilson_interval(0, n)[0] == 0.0
    assert wilson_interval(n, n)[1] == 1.0
    for k in range(n + 1):
        low, high = wilson_interval(k, n)
        assert 0.0 <= low <= k / n <= high <= 1.0, (k, n, low, high)


# ---------------------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_fewshot_prompts_hold_exactly_k_examples_never_the_question(k):
    items = [parse_mcq_record(r) for r in fixture_records(30)]
    pool = items[:12]  # the question itself is in the pool for the first 12
    checked = 0
    for item in items:
        shots = select_fewshot(item, pool, k)
        assert len(shots) == k and item not in shots
        same_type = [ex for ex in pool if ex.meta["exam_type"] == item.meta["exam_type"] and ex != item]
        assert shots == (same_type + [ex for ex in pool if ex not in same_type and ex != item])[:k]
        prompt = build_letter_prompt(item, shots)
        assert prompt.count("정답:") == k + 1
        assert prompt.count(item.question) == 1 and prompt.endswith(f"E. {item.options[4]}\n정답:")
        blocks = prompt.split("\n\n")
        assert len(blocks) == k + 1
        for ex, block in zip(shots, blocks):
            assert block.startswith(ex.question) and block.endswith(f"정답: {ex.answer_letter}")
        assert prompt.count("정답: ") == k  # examples answered, the question not
        context = build_choice_context(item, shots)
        assert context.count("정답:") == k + 1 and context.count(item.question) == 1
        checked += 1
    assert checked == 30


def test_fewshot_pool_too_small_fails_before_scoring():
    items = [parse_mcq_record(r) for r in fixture_records(6)]
    with pytest.raises(DataError, match="expected 5"):
        select_fewshot(items[0], items[:5], 5)  # item 0 is in the pool: only 4 usable
    with pytest.raises(ValueError):
        build_letter_prompt(items[0], [items[0]])


class Recorder(torch.nn.Module):
    """Wraps a model and records every batch it is asked to score."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, **kwargs):
        self.calls.append({k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return self.model(**kwargs)


def test_score_mcq_feeds_exactly_k_examples_and_letter_tokens(setup):
    _, items, tok = setup
    model = Recorder(tiny_model(len(tok)))
    fewshot = items[40:]
    report = score_mcq(model, tok, items[:10], mode="letter", fewshot=fewshot, shots=3, batch_size=4)
    assert report["letter_tokens"]["variant"] == " A"
    assert tok.convert_ids_to_tokens(report["letter_tokens"]["ids"]) == [f"▁{c}" for c in LETTERS]
    assert len(model.calls) == 3  # 10 questions in batches of 4, one forward each
    prompts = []
    for call in model.calls:
        for ids, mask in zip(call["input_ids"], call["attention_mask"]):
            real = ids[mask.bool()].tolist()
            assert real[0] == tok.bos_token_id and tok.bos_token_id not in real[1:]
            # not skip_special_tokens: the tiny tokenizer registers its byte tokens (newline) as special
            prompts.append(tok.decode(real[1:]))
    assert len(prompts) == 10
    for item in items[:10]:
        (prompt,) = [p for p in prompts if item.question in p]
        assert prompt == build_letter_prompt(item, select_fewshot(item, fewshot, 3))
        assert prompt.count("정답: ") == 3


# ---------------------------------------------------------------------------------------------- scoring

def test_batched_scores_equal_one_at_a_time_in_both_modes(setup):
    _, items, tok = setup
    model = tiny_model(len(tok), seed=3)
    for mode in ("letter", "choice"):
        one = score_mcq(model, tok, items[:6], mode=mode, shots=2, batch_size=1)
        many = score_mcq(model, tok, items[:6], mode=mode, shots=2, batch_size=7)
        assert [p["prediction"] for p in one["predictions"]] == [p["prediction"] for p in many["predictions"]]
        for a, b in zip(one["predictions"], many["predictions"]):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_letter_logprobs_match_a_direct_forward(setup):
    _, items, tok = setup
    model = tiny_model(len(tok), seed=4)
    report = score_mcq(model, tok, items[:3], mode="letter", batch_size=3)
    for item, pred in zip(items[:3], report["predictions"]):
        ids = tok(build_letter_prompt(item, []), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        expected = [float(logp[i]) for i in report["letter_tokens"]["ids"]]
        assert pred["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_choice_mode_reports_normalised_and_raw(setup):
    _, items, tok = setup
    model = tiny_model(len(tok), seed=5)
    report = score_mcq(model, tok, items[:6], mode="choice", batch_size=8)
    assert report["mode"] == "choice" and report["normalisation"] == "per character"
    for key in ("accuracy", "accuracy_raw", "ci95", "ci95_raw", "n", "n_skipped", "chance", "shots", "by_group"):
        assert key in report
    for item, pred in zip(items[:6], report["predictions"]):
        assert pred["logprobs_per_char"] == pytest.approx([r / len(t) for r, t in zip(pred["logprobs"], item.options)])
        assert pred["prediction"] == LETTERS[max(range(5), key=lambda j: pred["logprobs_per_char"][j])]
        assert pred["prediction_raw"] == LETTERS[max(range(5), key=lambda j: pred["logprobs"][j])]
    # a direct forward for one option
    ctx = tok(build_choice_context(items[0], []))["input_ids"]
    cont = tok(" " + items[0].options[2], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
    expected = sum(float(logp[len(ctx) - 1 + t, y]) for t, y in enumerate(cont))
    assert report["predictions"][0]["logprobs"][2] == pytest.approx(expected, abs=1e-4)


def test_malformed_items_are_skipped_and_counted_never_raised(setup, tmp_path):
    _, items, tok = setup
    model = tiny_model(len(tok)).train()
    records = fixture_records(5)
    bad = [{**records[0], "answer": 7}, {k: v for k, v in records[1].items() if k != "E"}, "not a dict", None]
    mixed = [records[2], bad[0], items[3], bad[1], bad[2], records[4], bad[3]]
    report = score_mcq(model, tok, mixed, mode="letter", skipped=["f.jsonl:9: invalid JSON"])
    assert model.training  # restored after the evaluation
    assert report["n"] == 3 and report["n_skipped"] == 5
    assert report["skipped"][0] == "f.jsonl:9: invalid JSON"
    assert any("item 1:" in s and "1..5" in s for s in report["skipped"])
    assert any("item 3:" in s and "'E'" in s for s in report["skipped"])
    # a prompt longer than the model accepts is skipped too, not a crash
    report = score_mcq(model, tok, items[:4], mode="choice", max_length=10)
    assert report["n"] == 0 and report["n_skipped"] == 4 and report["ci95"] == [0.0, 1.0]


def train_to_memorise(model, tok, items: list[MCQItem], steps: int = 80) -> float:
    """Plain AdamW on the letter prompts, loss on the answer token only. Returns the last loss."""
    seqs = [tok(build_letter_prompt(it, []) + " " + it.answer_letter)["input_ids"] for it in items]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for r, s in enumerate(seqs):  # right padding: causal attention never sees the pads
        input_ids[r, :len(s)] = torch.tensor(s)
        labels[r, len(s) - 2] = s[-1]  # aligned: the target of the last prompt position is the letter
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def test_memorised_items_reach_100_percent_untrained_model_near_chance(setup):
    _, items, tok = setup
    memorise = items[:5]
    assert sorted(it.answer_letter for it in memorise) == list(LETTERS)
    model = tiny_model(len(tok), seed=1)

    untrained = score_mcq(model, tok, items, mode="letter", batch_size=8)
    assert untrained["n"] == 60 and untrained["chance"] == 0.2
    low, high = untrained["ci95"]
    assert low <= 0.2 <= high and untrained["accuracy"] <= 0.4
    before = score_mcq(model, tok, memorise, mode="letter", batch_size=4)["accuracy"]
    assert before < 1.0

    loss = train_to_memorise(model, tok, memorise)
    after = score_mcq(model, tok, memorise, mode="letter", batch_size=4)
    assert loss < 0.1
    assert after["accuracy"] == 1.0 and after["n"] == 5
    assert [p["prediction"] for p in after["predictions"]] == list(LETTERS)
    assert set(after["by_group"]) == {"exam_type", "subject"}
    assert sum(g["n"] for g in after["by_group"]["exam_type"].values()) == 5


def test_multimodal_gemma3_gets_token_type_ids_and_scores_alike_batched(setup):
    """Gemma3ForConditionalGeneration (MedGemma 4B's class) needs token_type_ids; logits_to_keep works there too."""
    from korcpt.config import ModelConfig
    from korcpt.eval.perplexity import evaluate_perplexity
    from korcpt.model.load import build_random_model

    _, items, tok = setup
    root = Path(__file__).resolve().parents[1]
    mcfg = ModelConfig(name=str(root / "configs" / "models" / "tiny_gemma3_mm.json"), random_init=True)
    model = build_random_model(mcfg, len(tok), torch.float32, seed=0).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    for mode in ("letter", "choice"):
        recorder = Recorder(model)
        one = score_mcq(recorder, tok, items[:3], mode=mode, batch_size=1)
        many = score_mcq(model, tok, items[:3], mode=mode, batch_size=8)
        assert one["n"] == 3 and recorder.calls
        assert all(torch.equal(c["token_type_ids"], torch.zeros_like(c["input_ids"])) for c in recorder.calls)
        for a, b in zip(one["predictions"], many["predictions"]):
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    ids = torch.randint(4, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity(model, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
    assert result["tokens"] == 16 and result["loss"] > 0


# ---- 1 vs 2 processes: this file is also the worker script (torchrun + Accelerator, gloo on CPU).

def _distributed_worker(tmp: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model")
    tok = AutoTokenizer.from_pretrained(Path(tmp) / "tok")
    items, skipped = load_mcq(Path(tmp) / "test.jsonl")
    out = {"world_size": accelerator.num_processes}
    for mode in ("letter", "choice"):
        out[mode] = score_mcq(model, tok, items, mode=mode, shots=1, batch_size=3, skipped=skipped,
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              gather=gather_object)
    if accelerator.is_main_process:
        (Path(tmp) / "two.json").write_text(json.dumps(out))
    # both ranks leave together: a rank exiting while gloo threads still serve the other aborted in CI
    # ('terminate called without an active exception')
    accelerator.wait_for_everyone()
    accelerator.end_training()


@pytest.mark.slow
def test_one_and_two_processes_agree(setup, tmp_path):
    tmp, items, tok = setup
    work = tmp_path
    model = tiny_model(len(tok), seed=2)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "tok")
    write_jsonl(work / "test.jsonl", fixture_records(7) + ["{broken"])  # odd count: rank 1 gets fewer
    loaded, skipped = load_mcq(work / "test.jsonl")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((work / "two.json").read_text())
    assert two["world_size"] == 2
    for mode in ("letter", "choice"):
        single = score_mcq(model, tok, loaded, mode=mode, shots=1, batch_size=3, skipped=skipped)
        assert two[mode]["n"] == single["n"] == 7 and two[mode]["n_skipped"] == single["n_skipped"] == 1
        assert [p["index"] for p in two[mode]["predictions"]] == list(range(7))
        assert two[mode]["accuracy"] == single["accuracy"]
        for a, b in zip(two[mode]["predictions"], single["predictions"]):
            assert a["prediction"] == b["prediction"]
            assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


if __name__ == "__main__":
    _distributed_worker(sys.argv[1])
