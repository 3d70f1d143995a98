"""Every wiki cleaning rule: on small examples, and on the real Namu sample and plain text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from korcpt.corpus.text import drop_reason, hangul_ratio, normalize_text
from korcpt.corpus.wiki import clean_wiki, is_redirect

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAMU = SHARED_DATA / "namu" / "namuwiki_sample.json"
PLAIN = SHARED_DATA / "plain"
FORBIDDEN = ("[[", "]]", "'''", "[목차]", "[include(", "[Include(", "||", "{{{", "<ref", "[*", "~~", "[clearfix]")


@pytest.mark.parametrize(("raw", "expected"), [
    ("[[대상|보이는 글]]과 [[대상]]", "보이는 글과 대상"),
    ("[[문서#s-1.2|절]] 및 [[문서#개요]]", "절 및 문서"),
    ("앞[[파일:a.jpg|width=100]]뒤 [[분류:의학]]", "앞뒤"),
    ("[include(틀:다른 뜻1, other1=x)][Include(틀:y)]본문", "본문"),
    ("[목차]\n[각주]\n[clearfix]\n본문", "본문"),
    ("'''굵게''' ''기울임'' __밑줄__ ^^위^^ ,,아래,,", "굵게 기울임 밑줄 위 아래"),
    ("남는다~~지운다~~", "남는다"),
    ("{{{+1 큰 글씨}}} {{{#red 빨강}}} {{{#!wiki style=\"color:red\"\n안쪽 {{{+2 중첩}}}}}}", "큰 글씨 빨강 안쪽 중첩"),
    ("{{{#!syntax python\nprint(1)}}}코드 뒤", "코드 뒤"),
    ("본문[* 각주 [[링크]] 포함] 계속", "본문 계속"),
    ("앞{{틀|인자={{안}}}}뒤", "앞뒤"),
    ("본문<ref>출처</ref> 끝<br>다음 줄<!-- 주석 -->", "본문 끝\n다음 줄"),
    ("== 개요 ==\n내용\n=== 하위 ===\n더", "개요\n\n내용\n\n하위\n\n더"),
    ("|| '''이름''' || 값 ||\n||<-2><tablealign=right> 합친 칸 ||", "이름 값\n합친 칸"),
    (" * 항목 하나\n * 항목 둘", "항목 하나\n항목 둘"),
    ("[[\\\\]]을 치면", "\\을 치면"),
])
def test_rules(raw, expected):
    assert clean_wiki(raw) == expected


def test_redirect_detection():
    assert is_redirect("#redirect 느낌표\n")
    assert is_redirect("  #REDIRECT 문서")
    assert is_redirect("#넘겨주기 문서")
    assert not is_redirect("본문 #redirect 아님")


def test_normalize_keeps_paragraphs_and_nfc():
    decomposed = "\u1112\u1161\u11ab"  # 한 as conjoining jamo
    text = normalize_text(f"  {decomposed}글\r\n줄  둘\t셋\r\n\r\n\r\n\r\n다음\u200b 문단  ")
    assert text == "한글\n줄 둘 셋\n\n다음 문단"


def test_filters():
    assert drop_reason("", 100, 0.1) == "empty"
    assert drop_reason("가" * 99, 100, 0.1) == "too_short"
    assert drop_reason("a" * 95 + "가" * 5, 100, 0.1) == "low_hangul_ratio"
    assert drop_reason("a" * 90 + "가" * 10, 100, 0.1) is None  # exactly 10% passes
    assert hangul_ratio("가 a") == 0.5  # spaces do not count


@pytest.fixture(scope="module")
def namu_records():
    if not NAMU.is_file():
        pytest.skip(f"real Namu sample not found at {NAMU} (../shared/data is beside a project checkout only)")
    return json.loads(NAMU.read_text(encoding="utf-8"))


def test_real_namu_sample(namu_records):
    assert len(namu_records) == 5
    assert {type(r["namespace"]) for r in namu_records} == {int, str}
    redirects = [r for r in namu_records if is_redirect(r["text"])]
    assert [r["title"] for r in redirects] == ["!"]
    cleaned = [clean_wiki(r["text"]) for r in namu_records if not is_redirect(r["text"])]
    assert len(cleaned) == 4
    for text in cleaned:
        left = [s for s in FORBIDDEN if s in text]
        assert not left, left
        assert "\n\n" in text  # paragraph breaks kept
        assert drop_reason(text, 100, 0.1) is None
    joined = "\n".join(cleaned)
    # link labels kept, link targets of labelled links gone, plain link targets kept
    for label in ("김희원", "눈치가 없는지라", "팬텀 페인", "레인저", "2편 제왕의 성배", "말줄임표", "라틴 문자"):
        assert label in joined, label
    assert "눈치 없는 새끼" not in joined and "유방(신체)" not in joined
    # files, categories, footnotes, deleted text and include macros are dropped
    for gone in ("파일:", "분류:", "어색한 상황을 수습해보려는", "캔 유 필 마 핫빗", "틀:다른 뜻1", "넘겨주기1"):
        assert gone not in joined, gone
    assert "！！ああっと！！" in joined and "{{{+1" not in joined  # {{{+1 ...}}} unwrapped, text kept


def test_real_plain_text_only_normalised():
    files = sorted(PLAIN.glob("*.txt")) if PLAIN.is_dir() else []
    if not files:
        pytest.skip(f"real plain text not found at {PLAIN}")
    checked = 0
    for path in files:
        raw = path.read_text(encoding="utf-8")
        text = normalize_text(raw)
        assert "\r" not in text and "\n\n\n" not in text and "  " not in text
        assert "".join(raw.split()) == "".join(text.split())  # only whitespace changed
        assert drop_reason(text, 100, 0.1) is None
        checked += 1
    assert checked == 11


@given(st.text(alphabet=st.sampled_from("가힣ㄱㅣ\u1100\u11ffa1 \n\t\u3000\u2003\xa0\U0001f600!·"), max_size=60) | st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_hangul_ratio_matches_a_plain_loop(text):
    hangul = sum("\uac00" <= c <= "\ud7a3" or "\u3131" <= c <= "\u318e" or "\u1100" <= c <= "\u11ff" for c in text)
    non_space = sum(not c.isspace() for c in text)
    assert hangul_ratio(text) == (hangul / non_space if non_space else 0.0)
