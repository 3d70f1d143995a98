"""build_corpus end to end on tiny inputs written here: counts, mixing, determinism, strictness, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from korcpt.corpus.build import CorpusOptions, ExcludeSet, build_corpus
from korcpt.errors import DataError

from tinyrun import ROOT
SEED_MCQ = {
    "question": "항문압 측정 검사에서 항문 압력이 증가하는 경우는?",
    "A": "직장질루(rectovaginal fistula)", "B": "항문열창(anal fissure)", "C": "대변실금(fecal incontinence)",
    "D": "대변메막힘(fecal impaction)", "E": "직장탈출증(rectal prolapse)", "answer": 2,
}
HELD_OUT_Q = "다음 중 당뇨병 환자에게서 가장 먼저 시행해야 할 검사로 옳은 것은?"
PARAGRAPH = "당뇨병은 혈당 조절 장애로 인한 대사 질환이다. 인슐린 분비나 작용에 문제가 생기면 혈당이 높아진다. "


def _doc(i: int) -> str:
    return f"'''문서 {i}''' [[링크|라벨 {i}]]\n\n" + PARAGRAPH * 2


def _jsonl(path: Path, rows: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


@pytest.fixture
def sources(tmp_path):
    """One small input of each kind, with one bad record of each kind the source can have."""
    d = tmp_path / "in"
    d.mkdir()
    korean = [{"namespace": 0, "title": f"t{i}", "text": _doc(i)} for i in range(12)]
    korean += [
        {"namespace": "0", "title": "!", "text": "#redirect 느낌표\n"},  # redirect
        {"namespace": 0, "title": "short", "text": "[[짧다]]"},  # too short
        {"namespace": 0, "title": "en", "text": "English only text. " * 10},  # low Hangul ratio
        {"namespace": 0, "title": "empty", "text": "[목차][clearfix]"},  # empty after cleaning
        {"namespace": 0, "title": "dup", "text": _doc(0)},  # duplicate of t0
        {"namespace": 0, "title": "leak", "text": PARAGRAPH + HELD_OUT_Q + " " + PARAGRAPH},  # held-out question
        {"namespace": 0, "title": "notext"},  # missing field
    ]
    (d / "namu.json").write_text(json.dumps(korean, ensure_ascii=False), encoding="utf-8")
    (d / "plain").mkdir()
    (d / "plain" / "a.txt").write_bytes(("법률안 본문이다.\r\n" * 20).encode())
    (d / "plain" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    mcq_rows = [SEED_MCQ, {**SEED_MCQ, "question": "두 번째 문제는 무엇인가?"}, {**SEED_MCQ, "question": HELD_OUT_Q},
                SEED_MCQ, {**SEED_MCQ, "question": "q0", "answer": 0}, {**SEED_MCQ, "question": "q6", "answer": 6},
                {**SEED_MCQ, "question": "qB", "answer": "B"}, {**SEED_MCQ, "question": "qnull", "answer": None},
                {k: v for k, v in SEED_MCQ.items() if k != "C"}]
    mcq = _jsonl(d / "train.jsonl", mcq_rows, [b'{"question": "broken"', b'{"question": "\xff"}'])
    med = d / "medical_dict.json"
    med.write_text(json.dumps([{"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태"},
                               {"term": "두통", "definition": "Headache. 머리에 느끼는 통증."},
                               {"term": "빈칸"}], ensure_ascii=False), encoding="utf-8")
    chars = d / "char_dict.json"
    chars.write_text(json.dumps([{"term": "↑", "definition": "increased, elevated, or upward trend"}]), encoding="utf-8")
    held = _jsonl(d / "test.jsonl", [{**SEED_MCQ, "question": HELD_OUT_Q}])
    return {"korean": [d / "namu.json", d / "plain"], "mcq": mcq, "medical_dict": med, "char_dict": chars, "held": held}


def _opts(sources, **kw) -> CorpusOptions:
    base = dict(korean=sources["korean"], mcq=sources["mcq"], medical_dict=sources["medical_dict"],
                char_dict=sources["char_dict"], exclude_mcq=[sources["held"]], progress=False)
    return CorpusOptions(**{**base, **kw})


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "raw_text_mixed.jsonl").read_text(encoding="utf-8").splitlines()]


def test_report_counts_every_record(sources, tmp_path):
    report = build_corpus(_opts(sources), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8")) == report
    s = report["sources"]
    checked = 0
    for name, c in s.items():
        assert c["read"] == c["kept"] + c["dropped"] + c["rejected"], name
        assert c["dropped"] == sum(c["dropped_by_reason"].values()) and c["rejected"] == sum(c["rejected_by_reason"].values())
        checked += 1
    assert checked == 4
    k = s["korean"]
    assert (k["read"], k["kept"]) == (21, 13)  # 19 records + 2 txt files; t0..t11 + a.txt
    assert {r: n for r, n in k["dropped_by_reason"].items() if n} == {
        "redirect": 1, "too_short": 1, "low_hangul_ratio": 1, "empty": 1, "duplicate": 1, "excluded": 1}
    assert {r: n for r, n in k["rejected_by_reason"].items() if n} == {"missing_field": 1, "non_utf8": 1}
    m = s["mcq"]
    assert (m["read"], m["kept"]) == (11, 2)
    assert {r: n for r, n in m["dropped_by_reason"].items() if n} == {"excluded": 1, "duplicate": 1}
    assert {r: n for r, n in m["rejected_by_reason"].items() if n} == {"bad_answer": 4, "missing_field": 1, "malformed_json": 1, "non_utf8": 1}
    assert [x["where"].rsplit("/", 1)[-1] for x in m["rejects"]] == [f"train.jsonl:{n}" for n in range(5, 12)]
    assert (s["medical_dict"]["kept"], s["medical_dict"]["rejected"], s["char_dict"]["kept"]) == (2, 1, 1)
    assert report["options"]["excluded_questions"] == 1


def test_distribution_and_multiplier(sources, tmp_path):
    report = build_corpus(_opts(sources, medical_multiplier=3), tmp_path / "out")
    rows = {r["source"]: r for r in report["distribution"]}
    assert [(rows[s]["base"], rows[s]["multiplier"], rows[s]["final"]) for s in ("korean", "mcq", "medical_dict", "char_dict")] == \
        [(13, 1, 13), (2, 3, 6), (2, 3, 6), (1, 3, 3)]
    assert rows["total"]["final"] == 28 and abs(sum(rows[s]["ratio"] for s in rows if s != "total") - 1) < 1e-3
    lines = _lines(tmp_path / "out")
    assert len(lines) == 28 == report["output"]["lines"]
    assert Counter(x["source"] for x in lines) == {"korean": 13, "mcq": 6, "medical_dict": 6, "char_dict": 3}
    texts = Counter(x["text"] for x in lines)
    assert texts["고혈압(Hypertension)은 혈압이 정상 범위보다 높은 상태를 의미한다."] == 3
    assert texts["의학 기호 ↑는 increased, elevated, or upward trend를 나타낸다."] == 3
    assert all(HELD_OUT_Q not in t for t in texts)
    assert any(t.startswith("문서 0 라벨 0\n\n당뇨병은") for t in texts)
    assert all(set(x) == {"text", "source"} for x in lines)
    # shuffled: the medical copies are not all at the end, in the order they were read
    assert [x["source"] for x in lines] != sorted((x["source"] for x in lines), key=["mcq", "medical_dict", "char_dict", "korean"].index)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_byte_identical_reruns_and_worker_independence(sources, tmp_path):
    build_corpus(_opts(sources, workers=1), tmp_path / "a")
    build_corpus(_opts(sources, workers=1), tmp_path / "b")
    build_corpus(_opts(sources, workers=2, parallel_min_bytes=0), tmp_path / "c")  # process pool path
    build_corpus(_opts(sources, workers=1, seed=7), tmp_path / "d")
    digests = [_sha(tmp_path / x / "raw_text_mixed.jsonl") for x in "abcd"]
    assert digests[0] == digests[1] == digests[2]
    assert digests[3] != digests[0]
    assert sorted(_lines(tmp_path / "a"), key=json.dumps) == sorted(_lines(tmp_path / "d"), key=json.dumps)
    assert sorted(os.listdir(tmp_path / "c")) == ["raw_text_mixed.jsonl", "report.json"]  # no spool or tmp left


def test_max_samples_is_a_prefix_of_the_shuffle(sources, tmp_path):
    full = build_corpus(_opts(sources), tmp_path / "full")
    capped = build_corpus(_opts(sources, max_samples=5), tmp_path / "cap")
    assert capped["output"]["lines"] == 5 and full["output"]["lines"] > 5
    assert _lines(tmp_path / "cap") == _lines(tmp_path / "full")[:5]
    assert sum(r["final"] for r in capped["distribution"][:-1]) == 5


def test_strict_names_file_and_line(sources, tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl:5: bad answer: answer must be an integer in 1\.\.5, found 0"):
        build_corpus(_opts(sources, strict=True), tmp_path / "out")
    assert not (tmp_path / "out" / "raw_text_mixed.jsonl").exists()


def test_missing_inputs_and_bad_options_fail_before_work(sources, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        build_corpus(_opts(sources, mcq=tmp_path / "nope.jsonl"), tmp_path / "out")
    with pytest.raises(DataError, match="medical_multiplier must be >= 1, found 0; max_samples must be >= 0"):
        build_corpus(_opts(sources, medical_multiplier=0, max_samples=-1), tmp_path / "out")
    with pytest.raises(DataError, match="no input"):
        build_corpus(CorpusOptions(), tmp_path / "out")
    bad_held = _jsonl(tmp_path / "held.jsonl", [{"A": "no question"}])
    with pytest.raises(DataError, match="held.jsonl:1: held-out MCQ line has no 'question'"):
        build_corpus(_opts(sources, exclude_mcq=[bad_held]), tmp_path / "out")
    with pytest.raises(DataError, match="no document survived"):
        build_corpus(CorpusOptions(korean=sources["korean"], min_chars=10_000, progress=False), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "report.json").exists()


def test_exclude_set_matching():
    ex = ExcludeSet([HELD_OUT_Q, "짧은 질문?"])
    assert ex.matches_question("  다음 중 당뇨병 환자에게서   가장 먼저 시행해야 할 검사로 옳은 것은? ")
    assert ex.matches_text("앞 문장.\n" + HELD_OUT_Q.replace(" ", "\n", 1) + " 뒤")
    assert not ex.matches_text("짧은 질문? 이 문장은 짧은 질문을 담지만 빼지 않는다.")  # too short to match inside text
    assert ex.matches_question("짧은 질문?")
    assert not ex.matches_text(HELD_OUT_Q[:-3])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "build_shards.py"), "--corpus-only", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_good_run_writes_both_files(sources, tmp_path):
    out = tmp_path / "out"
    res = _cli("--korean", *sources["korean"], "--mcq", sources["mcq"], "--medical-dict", sources["medical_dict"],
               "--char-dict", sources["char_dict"], "--exclude-mcq", sources["held"], "--seed", "3", "--out", out)
    assert res.returncode == 0, res.stderr
    assert (out / "raw_text_mixed.jsonl").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["output"]["lines"] == 13 + 5 * 5


@pytest.mark.parametrize("case", ["strict", "missing", "empty", "broken_array"])
def test_cli_bad_input_is_one_line_error_exit_2(sources, tmp_path, case):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "broken.json").write_text('[{"text": "a"},\n{"text": ]', encoding="utf-8")
    args = {
        "strict": ["--mcq", sources["mcq"], "--strict"],
        "missing": ["--korean", tmp_path / "missing.json"],
        "empty": ["--mcq", tmp_path / "empty.jsonl"],
        "broken_array": ["--korean", tmp_path / "broken.json"],
    }[case]
    res = _cli(*args, "--out", tmp_path / "out")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    expected = {"strict": "train.jsonl:5", "missing": "missing.json", "empty": "empty.jsonl", "broken_array": "broken.json:2"}[case]
    assert expected in lines[0]


def test_project_sample_data_if_present(tmp_path):
    sample = ROOT / "data" / "sample"
    if not (sample / "korean").is_dir():
        pytest.skip(f"project sample data not found at {sample}")
    report = build_corpus(CorpusOptions(
        korean=[sample / "korean"], mcq=sample / "kormedmcqa" / "train.jsonl", medical_dict=sample / "medical_dict.json",
        char_dict=sample / "char_dict.json", exclude_mcq=[sample / "kormedmcqa" / "test.jsonl"], progress=False,
    ), tmp_path / "out")
    for name, c in report["sources"].items():
        assert c["read"] == c["kept"] + c["dropped"] + c["rejected"] > 0, name
        assert c["rejected"] == 0, c["rejects"]
    assert report["sources"]["korean"]["dropped_by_reason"]["redirect"] >= 1
    lines = _lines(tmp_path / "out")
    korean = [x["text"] for x in lines if x["source"] == "korean"]
    assert korean and not [t for t in korean if any(s in t for s in ("[[", "]]", "'''", "[목차]", "[include(", "[Include(", "||", "{{{", "<ref"))]
    assert any(x["text"].startswith("당뇨병은 혈당 조절 장애로 인한 대사 질환이다") for x in lines)


def test_validation_files_become_val_documents_for_the_shard_stage(sources, tmp_path):
    from korcpt.corpus.validation import VAL_NAME, write_val_documents

    val = tmp_path / "val.jsonl"
    records = [{"text": _doc(90)}, {"text": "#redirect 당뇨병"}, {"text": "짧은 문서", "source": "held"}]
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "val.txt").write_text("  텍스트   검증  문서  ", encoding="utf-8")
    build_corpus(_opts(sources, val_korean=[val, tmp_path / "val.txt", f"{val}:namu"]), tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / VAL_NAME).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5  # the redirect left out; no length filter for chosen documents
    assert lines[0]["text"].startswith("문서 90 라벨 90") and lines[0]["raw"] == _doc(90)  # cleaned, and as given
    assert lines[1] == {"text": "짧은 문서", "source": "held"}  # unchanged by cleaning: no "raw"
    assert lines[2]["source"] == "val_korean" and lines[2]["text"] == "텍스트 검증 문서"
    assert lines[3:] == lines[:2]  # PATH:namu (the README's form) reads the same file as Namu markup
    val.write_text('{"text": "좋은 문서"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="val.jsonl:2"):
        write_val_documents([val], tmp_path / "again.jsonl")
    assert not list(tmp_path.glob("*again.jsonl*"))  # nothing half-written


# Digest of the fixture's corpus as build.py wrote it before the shuffle's memory was bounded
# (commit 02ad3f2): the output must stay byte-identical for the same inputs and seed.
PINNED_SHA256 = "65926a3e23d8941cfbe185be1511b308ba5b50da91eff34c49eb5506e0ad55e7"


def test_output_is_byte_identical_to_the_pre_bounded_memory_code(sources, tmp_path, monkeypatch):
    import korcpt.corpus.build as build

    build_corpus(_opts(sources, workers=1), tmp_path / "a")
    assert _sha(tmp_path / "a" / "raw_text_mixed.jsonl") == PINNED_SHA256
    monkeypatch.setattr(build, "_CHUNK", 2)  # many slices: the same bytes
    build_corpus(_opts(sources, workers=1), tmp_path / "b")
    assert _sha(tmp_path / "b" / "raw_text_mixed.jsonl") == PINNED_SHA256


def test_permutation_in_int32_is_numpys_permutation():
    import numpy as np

    from korcpt.corpus.build import _permutation

    for n in (0, 1, 2, 17, 100_003):
        for seed in (0, 42):
            perm = _permutation(n, seed)
            assert perm.dtype == np.int32
            assert np.array_equal(perm, np.random.default_rng(seed).permutation(n))


@pytest.mark.parametrize("max_samples", [0, 7, 10_000])
def test_mixed_write_matches_the_whole_array_shuffle(tmp_path, monkeypatch, max_samples):
    """_Spool + _write_mixed against the shuffle as it was written before (every line in one array),
    over documents with duplicates, several sources and copies, in slices smaller than the data."""
    import random

    import numpy as np

    import korcpt.corpus.build as build

    rnd = random.Random(3)
    docs = [(rnd.choice(build.SOURCES), f"문서 {rnd.randrange(60)} " + "가" * rnd.randrange(5)) for _ in range(300)]
    copies = {"korean": 1, "mcq": 3, "medical_dict": 3, "char_dict": 3}
    monkeypatch.setattr(build, "_CHUNK", 16)
    spool = build._Spool(tmp_path / "spool", copies)
    with spool.file:
        for source, text in docs:
            spool.add(text, source)
    counts = {s: build.SourceCounts(kept=sum(d[0] == s for d in docs)) for s in build.SOURCES}
    opts = CorpusOptions(korean=[tmp_path], seed=5, max_samples=max_samples)
    lines, final = build._write_mixed(spool, tmp_path / "out.jsonl", opts, counts)

    seen, kept = set(), []  # the reference: first copy of each (source, text), repeated, permuted
    for source, text in docs:
        if (source, text) not in seen:
            seen.add((source, text))
            kept.append((source, text))
    index = np.repeat(np.arange(len(kept)), [copies[s] for s, _ in kept])
    order = index[np.random.default_rng(5).permutation(index.size)]
    order = order[:max_samples] if max_samples else order
    expected = [json.dumps({"text": kept[k][1], "source": kept[k][0]}, ensure_ascii=False) for k in order.tolist()]
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == "".join(line + "\n" for line in expected)
    assert lines == len(expected)
    assert final == {s: sum(kept[k][0] == s for k in order.tolist()) for s in build.SOURCES}
    assert {s: c.kept for s, c in counts.items()} == {s: sum(k[0] == s for k in kept) for s in build.SOURCES}
    assert sum(c.dropped["duplicate"] for c in counts.values()) == len(docs) - len(kept)
