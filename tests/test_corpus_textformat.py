"""Namu rules for Namu records only: detection, the PATH:FORMAT option both ways, web prose kept (issue 16).

Every sentence here was written for this test (none comes from ../shared/data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from korcpt.corpus.build import CorpusOptions, build_corpus, validate_options
from korcpt.corpus.text import normalize_text
from korcpt.corpus.textformat import clean_as, detect_markup, record_format, split_format
from korcpt.corpus.validation import val_documents
from korcpt.corpus.wiki import clean_mediawiki, clean_wiki
from korcpt.errors import DataError

from tinyrun import ROOT

# Web prose: ## heading and hashtags, ^^ and ~~ emoticons, text between two ~~ on different lines,
# __ and ,, as punctuation. Already normalised, so the plain cleaner must give it back unchanged.
WEB = (
    "## 오늘 병원 다녀온 후기\n"
    "아침 일찍 접수했어요~~ 간호사 선생님이 정말 친절하셨어요^^\n"
    "대기실은 붐볐지만~~\n"
    "진료는 금방 끝났답니다~~ 다음 달에 또 가요^^\n"
    "정말 감사합니다^^ 또 올게요^^\n"
    "\n"
    "##건강관리 #병원후기 #감기조심\n"
    "__메모__ 약은 하루 세 번,, 식후에 먹기^^"
)
WEB_LINES = WEB.split("\n")
NAMU = "[목차]\n== 개요 ==\n'''감기'''는 [[바이러스|바이러스]] 때문에 생기는 흔한 병이다.~~지운 문장~~\n[* 각주 내용] 쉬면 낫는다."


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _build(tmp_path: Path, korean: list, **kw) -> tuple[dict, list[str]]:
    out = tmp_path / "out"
    opts = CorpusOptions(**{"korean": korean, "min_chars": 10, "workers": 1, "progress": False, **kw})
    report = build_corpus(opts, out)
    texts = [json.loads(x)["text"] for x in (out / "raw_text_mixed.jsonl").read_text(encoding="utf-8").splitlines()]
    return report, texts


def test_web_prose_is_what_namu_rules_would_eat():
    assert normalize_text(WEB) == WEB  # the fixture is already normalised: "unchanged" means equal
    eaten = clean_wiki(WEB)
    # what issue 16 saw: text between two ~~ lines deleted, ## lines dropped, ^^ pairs unwrapped
    assert "대기실은 붐볐지만" not in eaten and "## 오늘" not in eaten and "#병원후기" not in eaten
    assert "감사합니다 또 올게요" in eaten


@pytest.mark.parametrize("text", [WEB, *WEB_LINES[1:4], "좋아요~~ 내일 봐요~~", "감사합니다^^", "#태그 ##태그", "첫 줄~~\n둘째 줄~~"])
def test_text_record_without_markup_is_plain_and_kept(text):
    assert record_format({"text": text}, is_text=False) == "plain"
    assert clean_as(text, "plain") == normalize_text(text)


def test_jsonl_text_records_keep_their_prose_through_build(tmp_path):
    rows = [{"text": WEB}, {"text": "첫 줄 끝에 물결~~\n가운데 줄\n마지막 줄도 물결~~ 끝^^", "url": "https://example.com"}]
    report, texts = _build(tmp_path, [_write(tmp_path / "web.jsonl", rows)])
    assert sorted(texts) == sorted(normalize_text(r["text"]) for r in rows)
    assert WEB in texts
    k = report["sources"]["korean"]
    assert (k["read"], k["kept"]) == (2, 2) and report["options"]["korean_formats"] == {}


@pytest.mark.parametrize(("value", "expected"), [
    ({"namespace": 0, "title": "t", "text": "평범한 문장~~ 뿐^^"}, "namu"),  # the dump's keys alone say Namu
    ({"namespace": "0", "title": "t", "text": "#redirect 다른 문서"}, "namu"),
    ({"text": "[include(틀:안내)] 본문"}, "namu"),
    ({"text": "본문 {{{+1 큰 글}}}"}, "namu"),
    ({"text": "[목차]\n본문"}, "namu"),
    ({"text": "본문[* 각주] 끝"}, "namu"),
    ({"text": "|| 칸 || 칸 ||"}, "namu"),
    ({"text": "'''굵게''' 쓴 문장~~"}, "wiki"),
    ({"text": "[[서울|수도]]에 간다"}, "wiki"),
    ({"text": "#넘겨주기 문서"}, "wiki"),
    ({"text": "본문 {{인용 필요}}"}, "wiki"),
    ({"text": WEB}, "plain"),
    ({"text": "[*중요*] 표시와 [링크] 괄호"}, "plain"),
    ("맨 문자열 레코드^^", "plain"),
    ({"text": 5}, "plain"),
])
def test_detection(value, expected):
    assert record_format(value, is_text=False) == expected


def test_txt_files_stay_plain_unless_told():
    assert record_format(NAMU, is_text=True) == "plain"
    assert record_format(NAMU, is_text=True, given="namu") == "namu"
    assert detect_markup(NAMU) == "namu"


def test_namu_records_are_cleaned_exactly_as_before(tmp_path):
    rows = [{"namespace": 0, "title": "감기", "text": NAMU}, {"text": NAMU}]  # by keys, and by markup alone
    path = tmp_path / "namu.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    _, texts = _build(tmp_path, [path])
    expected = "개요\n\n감기는 바이러스 때문에 생기는 흔한 병이다.\n쉬면 낫는다."
    assert clean_wiki(NAMU) == expected
    assert texts == [expected]  # the second is a duplicate of the first: same cleaning


def test_explicit_format_overrides_detection_both_ways(tmp_path):
    web = _write(tmp_path / "web.jsonl", [{"text": WEB}])
    namu = tmp_path / "namu.json"
    namu.write_text(json.dumps([{"namespace": 0, "title": "감기", "text": NAMU}], ensure_ascii=False), encoding="utf-8")
    txt = tmp_path / "doc.txt"
    txt.write_text(NAMU, encoding="utf-8")
    report, texts = _build(tmp_path, [Path(f"{web}:namu"), Path(f"{namu}:plain"), f"{txt}:namu"])
    assert texts.count(clean_wiki(WEB)) == 1 and WEB not in texts  # plain-looking text forced through Namu
    assert normalize_text(NAMU) in texts  # a Namu record kept as written
    assert texts.count(clean_wiki(NAMU)) == 1  # a .txt file forced through Namu
    assert report["options"]["korean_formats"] == {str(web): "namu", str(namu): "plain", str(txt): "namu"}
    assert report["sources"]["korean"]["files"] == [str(web), str(namu), str(txt)]


def test_wiki_format_strips_shared_markup_and_keeps_emoticons(tmp_path):
    raw = "'''감기''' 조심하세요^^ [[감기|코감기]]는 흔해요~~\n[https://example.com 안내] {{틀}}<ref>출처</ref>\n##태그"
    expected = "감기 조심하세요^^ 코감기는 흔해요~~\n안내\n##태그"
    assert clean_mediawiki(raw) == expected
    _, texts = _build(tmp_path, [f"{_write(tmp_path / 'w.jsonl', [{'text': raw}])}:wiki"])
    assert texts == [expected]
    assert clean_as("#REDIRECT 문서", "wiki") is None and clean_as("#redirect 문서", "plain") == "#redirect 문서"


def test_split_format():
    assert split_format("data/a.jsonl") == (Path("data/a.jsonl"), "auto")
    assert split_format(Path("data/a.jsonl:namu")) == (Path("data/a.jsonl"), "namu")
    assert split_format("d/:Plain") == (Path("d/"), "plain")
    assert split_format("C:\\data\\a.json") == (Path("C:\\data\\a.json"), "auto")


def test_a_path_that_exists_is_never_split(tmp_path):
    odd = tmp_path / "notes:plain"
    odd.write_text(json.dumps({"text": "'''굵게''' 쓴 문장이다"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert split_format(odd) == (odd, "auto")


def test_bad_format_name_is_one_line_with_found_and_expected(tmp_path):
    with pytest.raises(DataError) as err:
        split_format("a.jsonl:nmau")
    msg = str(err.value)
    assert "\n" not in msg and "'nmau'" in msg and "auto, namu, wiki, plain" in msg and msg.startswith("a.jsonl:nmau")
    with pytest.raises(DataError, match="'nmau'.*; .*'txet'"):  # validate_options lists every bad one at once
        validate_options(CorpusOptions(korean=[Path("a.jsonl:nmau")], val_korean=[Path("b.json:txet")]))


def test_report_balances_with_mixed_formats(tmp_path):
    rows = [{"text": WEB}, {"text": NAMU}, {"text": "#redirect 감기"}, {"title": "글 없음"}, {"text": "짧다^^"},
            {"namespace": 0, "title": "감기", "text": NAMU}]
    path = _write(tmp_path / "mix.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"text": "broken\n')
    for i, korean in enumerate(([path], [f"{path}:plain"], [f"{path}:namu"], [f"{path}:wiki"])):
        report, _ = _build(tmp_path / str(i), korean, min_chars=0 if i else 10)
        k = report["sources"]["korean"]
        assert k["read"] == len(rows) + 1 == k["kept"] + k["dropped"] + k["rejected"], k
        assert k["rejected_by_reason"]["missing_field"] == 1 and k["rejected_by_reason"]["malformed_json"] == 1
        assert k["dropped_by_reason"]["redirect"] == (0 if "plain" in str(korean[0]) else 1)


def test_validation_files_use_the_same_formats(tmp_path):
    val = _write(tmp_path / "val.jsonl", [{"text": WEB}])
    assert [d["text"] for d in val_documents([val])] == [WEB]
    assert [d["text"] for d in val_documents([Path(f"{val}:namu")])] == [clean_wiki(WEB)]


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "build_shards.py"), "--corpus-only", "--min-chars", "10", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_cli_takes_path_format_and_refuses_a_bad_name_in_one_line(tmp_path):
    web = _write(tmp_path / "web.jsonl", [{"text": WEB}])
    res = _cli("--korean", web, f"{web}:namu", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "out" / "raw_text_mixed.jsonl").read_text(encoding="utf-8").splitlines()
    texts = {json.loads(x)["text"] for x in lines}
    assert texts == {WEB, clean_wiki(WEB)}
    res = _cli("--korean", f"{web}:nmau", "--out", tmp_path / "bad")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "'nmau'" in lines[0] and "expected one of" in lines[0] and "Traceback" not in res.stderr


def test_formats_reach_the_worker_processes(tmp_path):
    web = _write(tmp_path / "web.jsonl", [{"text": WEB}, {"text": NAMU}])
    korean = [web, f"{web}:namu", f"{web}:plain"]
    _, serial = _build(tmp_path / "serial", korean)
    _, parallel = _build(tmp_path / "pool", korean, workers=2, parallel_min_bytes=0)
    assert parallel == serial and set(serial) == {WEB, clean_wiki(NAMU), clean_wiki(WEB), normalize_text(NAMU)}
