"""The shipped sample data in data/sample/ keeps the four raw formats of train_raw_korean_text.md.

These checks pin the shapes and counts so the data cannot silently rot: other
modules and their tests read these files as fixtures.
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
NAMU = SAMPLE / "korean" / "namu_medical.json"
MCQ_DIR = SAMPLE / "kormedmcqa"
MEDICAL_DICT = SAMPLE / "medical_dict.json"
CHAR_DICT = SAMPLE / "char_dict.json"

NAMU_RECORDS = 47
MCQ_COUNTS = {"train": 80, "test": 60, "fewshot": 20}
MCQ_PER_EXAM = {"train": 20, "test": 15, "fewshot": 5}
EXAM_TYPES = {"doctor", "nurse", "pharm", "dentist"}
MEDICAL_DICT_ENTRIES = 229
CHAR_DICT_ENTRIES = 46

DIABETES_START = "[목차] '''당뇨병'''은 [[혈당]] 조절 장애로 인한 [[대사 질환]]이다."
HANGUL = re.compile(r"[가-힣]")


def _load_json(path: Path):
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _load_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.strip(), f"{path.name}:{n} is blank"
            rows.append(json.loads(line))
    return rows


def _rough_clean(text: str) -> str:
    """A deliberately crude markup stripper, only to size articles (not the project's cleaner)."""
    text = re.sub(r"<ref>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"\[\*[^\]]*\]", "", text)
    text = re.sub(r"\[\[(?:파일|분류):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[(?:목차|각주|clearfix|[Ii]nclude\([^)]*\))\]", "", text)
    text = re.sub(r"\{\{\{(?:#!html|#\w+|\+\d)\s?", "", text).replace("}}}", "")
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    for mark in ("'''", "''", "__", "~~", "||"):
        text = text.replace(mark, "")
    text = re.sub(r"^=+ (.*?) =+$", r"\1", text, flags=re.M)
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- Namu Wiki


@pytest.fixture(scope="module")
def namu() -> list[dict]:
    return _load_json(NAMU)


def test_namu_is_array_of_records(namu):
    assert isinstance(namu, list)
    assert len(namu) == NAMU_RECORDS
    for rec in namu:
        assert set(rec) == {"namespace", "title", "text", "id"}, rec.get("title")
        assert isinstance(rec["title"], str) and rec["title"]
        assert isinstance(rec["text"], str) and rec["text"]
        assert isinstance(rec["id"], str) and rec["id"]
    assert len({r["id"] for r in namu}) == len(namu)
    assert len({r["title"] for r in namu}) == len(namu)


def test_namu_first_article_is_the_spec_example(namu):
    assert namu[0]["title"] == "당뇨병"
    assert namu[0]["namespace"] == 0
    assert namu[0]["text"].startswith(DIABETES_START)


def test_namu_namespaces(namu):
    kinds = Counter(repr(r["namespace"]) for r in namu)
    assert kinds == {"0": NAMU_RECORDS - 1, "'0'": 1}


def test_namu_exactly_one_redirect(namu):
    redirects = [r for r in namu if r["text"].lstrip().lower().startswith("#redirect")]
    assert len(redirects) == 1
    assert redirects[0]["text"] == "#redirect 당뇨병"


def test_namu_article_sizes(namu):
    articles = [r for r in namu if not r["text"].startswith("#redirect")]
    stubs = [r for r in articles if len(_rough_clean(r["text"])) < 100]
    assert [r["title"] for r in stubs] == ["저혈당"]
    full = [r for r in articles if r not in stubs]
    assert len(full) == NAMU_RECORDS - 2
    for rec in full:
        assert 1200 <= len(rec["text"]) <= 2500, (rec["title"], len(rec["text"]))
        assert "== " in rec["text"], rec["title"]
        cleaned = _rough_clean(rec["text"])
        assert len(HANGUL.findall(cleaned)) / len(cleaned) > 0.5, rec["title"]
    medical = [r for r in full if "[[분류:의학]]" in r["text"]]
    assert len(medical) == 30


@pytest.mark.parametrize(
    "markup",
    [
        "[목차]", "[각주]", "[clearfix]", "'''", "''", "__", "~~", "[* ", "||", "<ref>", "</ref>", "<br>",
        "[[분류:의학]]", "[include(틀:의학 정보)]", "[Include(틀:", "{{{+1 ", "{{{#!html", "{{{#red ",
        "\n== ", "\n=== ", "|width=300]]", "[[파일:",
    ],
)
def test_namu_exercises_markup(namu, markup):
    assert any(markup in r["text"] for r in namu)


def test_namu_exercises_links_and_templates(namu):
    text = "\n".join(r["text"] for r in namu)
    assert re.search(r"\[\[[^\]|:]+\]\]", text)  # [[target]]
    assert re.search(r"\[\[[^\]|:]+\|[^\]]+\]\]", text)  # [[target|label]]
    assert re.search(r"(?<!\{)\{\{[^{}]+\}\}(?!\})", text)  # {{template}}


# ---------------------------------------------------------------- KorMedMCQA


@pytest.fixture(scope="module")
def mcq() -> dict[str, list[dict]]:
    return {name: _load_jsonl(MCQ_DIR / f"{name}.jsonl") for name in MCQ_COUNTS}


MCQ_KEYS = {"subject", "year", "period", "q_number", "question", "A", "B", "C", "D", "E", "answer", "cot", "exam_type"}


@pytest.mark.parametrize("split", sorted(MCQ_COUNTS))
def test_mcq_rows(mcq, split):
    rows = mcq[split]
    assert len(rows) == MCQ_COUNTS[split]
    for row in rows:
        assert set(row) == MCQ_KEYS, row.get("question")
        assert row["subject"] in EXAM_TYPES and row["exam_type"] == row["subject"]
        assert type(row["answer"]) is int and 1 <= row["answer"] <= 5
        assert type(row["year"]) is int and type(row["period"]) is int and type(row["q_number"]) is int
        assert row["cot"] == ""
        assert row["question"].strip() and HANGUL.search(row["question"])
        options = [row[k] for k in "ABCDE"]
        assert all(isinstance(o, str) and o.strip() for o in options)
        assert len(set(options)) == 5, row["question"]
    per_exam = Counter(r["exam_type"] for r in rows)
    assert per_exam == {e: MCQ_PER_EXAM[split] for e in EXAM_TYPES}
    assert len({r["question"] for r in rows}) == len(rows)


@pytest.mark.parametrize("split", sorted(MCQ_COUNTS))
def test_mcq_answer_positions_are_spread(mcq, split):
    positions = Counter(r["answer"] for r in mcq[split])
    assert set(positions) == {1, 2, 3, 4, 5}
    assert max(positions.values()) - min(positions.values()) <= 2


def test_mcq_splits_share_no_question(mcq):
    seen: dict[str, str] = {}
    for split, rows in mcq.items():
        for row in rows:
            assert row["question"] not in seen, (row["question"], seen.get(row["question"]), split)
            seen[row["question"]] = split


def test_mcq_first_train_row_is_the_spec_example(mcq):
    row = mcq["train"][0]
    assert row["question"] == "항문압 측정 검사에서 항문 압력이 증가하는 경우는?"
    assert [row[k] for k in "ABCDE"] == [
        "직장질루(rectovaginal fistula)",
        "항문열창(anal fissure)",
        "대변실금(fecal incontinence)",
        "대변메막힘(fecal impaction)",
        "직장탈출증(rectal prolapse)",
    ]
    assert row["answer"] == 2


def test_mcq_option_styles(mcq):
    options = [r[k] for rows in mcq.values() for r in rows for k in "ABCDE"]
    with_english = [o for o in options if re.search(r"\([A-Za-z][^)]*\)$", o)]
    assert len(with_english) > len(options) / 2
    assert len(options) - len(with_english) >= 20  # some options carry no English parenthetical


# ---------------------------------------------------------------- dictionaries


def test_medical_dict():
    entries = _load_json(MEDICAL_DICT)
    assert isinstance(entries, list) and len(entries) == MEDICAL_DICT_ENTRIES
    for e in entries:
        assert set(e) == {"term", "definition"}
        assert e["term"].strip() == e["term"] and e["term"]
        assert e["definition"].strip() == e["definition"] and HANGUL.search(e["definition"])
    assert len({e["term"] for e in entries}) == len(entries)
    assert {"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태"} in entries

    english = [e for e in entries if re.match(r"[A-Za-z][^가-힣]*?\. ", e["definition"])]
    korean_only = [e for e in entries if ". " not in e["definition"]]
    assert len(english) + len(korean_only) == len(entries)
    assert len(korean_only) == 10
    trailing = [e for e in entries if e["definition"].endswith(".")]
    assert 5 <= len(trailing) < len(entries) / 4

    last = [e["term"][-1] for e in entries]
    hangul_last = [c for c in last if "가" <= c <= "힣"]
    assert any((ord(c) - 0xAC00) % 28 for c in hangul_last)  # ends with a final consonant
    assert any((ord(c) - 0xAC00) % 28 == 0 for c in hangul_last)  # ends with an open syllable
    assert {"비타민 B12", "HbA1c", "CT"} <= {e["term"] for e in entries}


def test_char_dict():
    entries = _load_json(CHAR_DICT)
    assert isinstance(entries, list) and len(entries) == CHAR_DICT_ENTRIES
    for e in entries:
        assert set(e) == {"term", "definition"}
        assert e["term"] and e["definition"].strip()
        assert not HANGUL.search(e["term"])
    assert len({e["term"] for e in entries}) == len(entries)
    assert {"term": "↑", "definition": "increased, elevated, or upward trend"} in entries
    terms = {e["term"] for e in entries}
    expected = {"↓", "±", "Δ", "→", "←", "≥", "≤", "≈", "♂", "♀", "μ", "°C", "×", "÷", "∞", "℞", "Ⓡ", "#", "@", "~"}
    assert expected <= terms


def test_sample_size_stays_small():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 400_000
