"""The conversion examples of train_raw_korean_text.md, exactly, and the particle rule in both cases of every pair."""

from __future__ import annotations

import pytest

from korcpt.corpus.medical import (
    RecordError, char_dict_text, mcq_text, medical_dict_text, parse_mcq, split_definition, strip_english,
)
from korcpt.corpus.particles import attach, has_final_consonant
from korcpt.corpus.wiki import clean_wiki

SEED_MCQ = {
    "question": "항문압 측정 검사에서 항문 압력이 증가하는 경우는?",
    "A": "직장질루(rectovaginal fistula)",
    "B": "항문열창(anal fissure)",
    "C": "대변실금(fecal incontinence)",
    "D": "대변메막힘(fecal impaction)",
    "E": "직장탈출증(rectal prolapse)",
    "answer": 2,
}


def test_spec_wiki_example():
    assert clean_wiki("[목차] '''당뇨병'''은 [[혈당]] 조절 장애로 인한 [[대사 질환]]이다.") == \
        "당뇨병은 혈당 조절 장애로 인한 대사 질환이다."


def test_spec_mcq_example():
    assert mcq_text(parse_mcq(SEED_MCQ)) == (
        "항문압 측정 검사에서 항문 압력이 증가하는 경우는?\n"
        "선택지: 직장질루, 항문열창, 대변실금, 대변메막힘, 직장탈출증\n"
        "정답: 항문열창\n\n"
        "항문열창(anal fissure)은 의학적으로 중요한 개념이다."
    )


def test_mcq_last_sentence_only_when_answer_has_english():
    record = {**SEED_MCQ, "B": "항문열창", "answer": 2}
    text = mcq_text(parse_mcq(record))
    assert text.endswith("정답: 항문열창")
    assert "개념이다" not in text


def test_mcq_last_sentence_particle_follows_answer():
    record = {**SEED_MCQ, "C": "치매(dementia)", "answer": 3}
    assert mcq_text(parse_mcq(record)).endswith("\n\n치매(dementia)는 의학적으로 중요한 개념이다.")


def test_spec_medical_dict_example():
    assert medical_dict_text({"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태"}) == \
        "고혈압(Hypertension)은 혈압이 정상 범위보다 높은 상태를 의미한다."


def test_spec_char_dict_example():
    assert char_dict_text({"term": "↑", "definition": "increased, elevated, or upward trend"}) == \
        "의학 기호 ↑는 increased, elevated, or upward trend를 나타낸다."


@pytest.mark.parametrize(("record", "expected"), [
    ({"term": "고혈압", "definition": "혈압이 정상 범위보다 높은 상태"}, "고혈압은 혈압이 정상 범위보다 높은 상태를 의미한다."),
    ({"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태."}, "고혈압(Hypertension)은 혈압이 정상 범위보다 높은 상태를 의미한다."),
    ({"term": "두통", "definition": "Headache. 머리에 느끼는 통증."}, "두통(Headache)은 머리에 느끼는 통증을 의미한다."),
    ({"term": "치매", "definition": "Dementia. 인지 기능이 떨어지는 상태"}, "치매(Dementia)는 인지 기능이 떨어지는 상태를 의미한다."),
    ({"term": "빈혈", "definition": "Anemia.  혈액 속 적혈구가   부족한 증상 "}, "빈혈(Anemia)은 혈액 속 적혈구가 부족한 증상을 의미한다."),
])
def test_medical_dict_forms(record, expected):
    assert medical_dict_text(record) == expected


def test_char_dict_trailing_period_not_doubled():
    assert char_dict_text({"term": "↓", "definition": "decreased."}) == "의학 기호 ↓는 decreased를 나타낸다."


@pytest.mark.parametrize(("word", "consonant"), [
    ("두통", True), ("치매", False), ("통증", True), ("상태", False),  # Hangul by 받침
    ("고혈압(Hypertension)", True), ("치매(Dementia)", False),  # the parenthetical is skipped
    ("↑", False), ("increased, elevated, or upward trend", False),  # non-Hangul: vowel form (spec)
    ("10", True), ("B12", False), ("3", True),  # digits as read in Korean
    ("LDL", True), ("CT", False), ("HbA1c", False),  # acronyms by letter name
    ("상태.", False), ("통증 ", True),  # trailing punctuation and space ignored
])
def test_final_consonant_rule(word, consonant):
    assert has_final_consonant(word) is consonant


@pytest.mark.parametrize(("particle", "after_consonant", "after_vowel"), [("은", "은", "는"), ("이", "이", "가"), ("을", "을", "를")])
def test_every_particle_pair_both_cases(particle, after_consonant, after_vowel):
    for given in (after_consonant, after_vowel):  # either form of the pair may be asked for
        assert attach("두통", given) == "두통" + after_consonant
        assert attach("치매", given) == "치매" + after_vowel


def test_split_definition():
    assert split_definition("Hypertension. 혈압이 높은 상태") == ("Hypertension", "혈압이 높은 상태")
    assert split_definition("혈압이 높은 상태.") == (None, "혈압이 높은 상태")
    assert split_definition("BMI 지수가 높은 상태") == (None, "BMI 지수가 높은 상태")  # no period: not an English part
    assert split_definition("Diabetes mellitus, type 2. 혈당이 높은 질환") == ("Diabetes mellitus, type 2", "혈당이 높은 질환")


def test_strip_english_only_latin_parentheticals():
    assert strip_english("항문열창(anal fissure)") == "항문열창"
    assert strip_english("위암 (gastric cancer)") == "위암"
    assert strip_english("제2형 당뇨병(성인형)") == "제2형 당뇨병(성인형)"
    assert strip_english("5 mg") == "5 mg"


@pytest.mark.parametrize("answer", [0, 6, "B", None, True, 2.0])
def test_mcq_bad_answer(answer):
    with pytest.raises(RecordError) as err:
        parse_mcq({**SEED_MCQ, "answer": answer})
    assert err.value.reason == "bad_answer"


def test_mcq_missing_option_and_dict_missing_field():
    record = dict(SEED_MCQ)
    del record["E"]
    with pytest.raises(RecordError) as err:
        parse_mcq(record)
    assert err.value.reason == "missing_field"
    for bad in ({"term": "고혈압"}, {"definition": "x"}, {"term": "", "definition": "x"}, ["고혈압", "x"]):
        with pytest.raises(RecordError) as err:
            medical_dict_text(bad)
        assert err.value.reason == "missing_field"
