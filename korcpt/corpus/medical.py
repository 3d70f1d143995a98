"""The three medical sources as training sentences, exactly in the forms train_raw_korean_text.md shows.

Each converter takes one decoded JSON value and returns the text, or raises :class:`RecordError`
whose ``reason`` is a rejection reason of :mod:`korcpt.corpus.readers` (``missing_field``,
``bad_answer``). Particles come from :func:`korcpt.corpus.particles.attach`.
"""

from __future__ import annotations

import re
from typing import Any

from korcpt.corpus.mcq import MCQItem, MCQRecordError, parse_mcq_record
from korcpt.corpus.particles import attach
from korcpt.corpus.readers import BAD_ANSWER, MISSING_FIELD
from korcpt.corpus.text import HANGUL_CLASS, collapse_spaces, normalize_text

# A trailing parenthetical that holds Latin letters and no Hangul: "항문열창(anal fissure)".
_ENGLISH_PAREN = re.compile(rf"\s*\((?=[^()]*[A-Za-z])[^(){HANGUL_CLASS}]*\)\s*$")
_HANGUL = re.compile(f"[{HANGUL_CLASS}]")


class RecordError(ValueError):
    """One record that cannot be converted; ``reason`` names the rejection, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def strip_english(option: str) -> str:
    """``"항문열창(anal fissure)"`` -> ``"항문열창"``; text without such a parenthetical is unchanged."""
    stripped = _ENGLISH_PAREN.sub("", option)
    return stripped if stripped else option


def parse_mcq(value: Any) -> MCQItem:
    """Validate a KorMedMCQA record, mapping its problems to rejection reasons.

    Raises:
        RecordError: ``bad_answer`` for an answer outside 1..5 (0, 6, "B", null...), else ``missing_field``.
    """
    try:
        return parse_mcq_record(value)
    except MCQRecordError as exc:
        reason = BAD_ANSWER if str(exc).startswith("answer") else MISSING_FIELD
        raise RecordError(reason, str(exc)) from None


def mcq_text(item: MCQItem) -> str:
    """A KorMedMCQA item as question, choices and answer.

    The choices and the answer lose a trailing English parenthetical; a last sentence repeats the
    full answer, English included, only when the answer has one.

    Example:
        항문압 측정 검사에서 항문 압력이 증가하는 경우는?
        선택지: 직장질루, 항문열창, 대변실금, 대변메막힘, 직장탈출증
        정답: 항문열창

        항문열창(anal fissure)은 의학적으로 중요한 개념이다.
    """
    question = normalize_text(item.question)
    options = [collapse_spaces(o) for o in item.options]
    answer = options[item.answer]
    short = strip_english(answer)
    text = f"{question}\n선택지: {', '.join(strip_english(o) for o in options)}\n정답: {short}"
    if short != answer:
        text += f"\n\n{attach(answer, '은')} 의학적으로 중요한 개념이다."
    return text


def _term_definition(value: Any) -> tuple[str, str]:
    if not isinstance(value, dict):
        raise RecordError(MISSING_FIELD, f"expected a JSON object, found {type(value).__name__}")
    out = []
    for key in ("term", "definition"):
        field = value.get(key)
        if not isinstance(field, str) or not field.strip():
            raise RecordError(MISSING_FIELD, f"missing or empty field {key!r}")
        out.append(collapse_spaces(field))
    return out[0], out[1]


def split_definition(definition: str) -> tuple[str | None, str]:
    """Split ``"English. 한국어 설명"`` into ``("English", "한국어 설명")``.

    The English part is everything before the first Hangul character when that stretch holds Latin
    letters and ends with a period; otherwise there is no English part.

    Returns:
        ``(english or None, description)``; the description keeps no trailing period.
    """
    m = _HANGUL.search(definition)
    head = definition[: m.start()].rstrip() if m else ""
    if m and head.endswith(".") and re.search(r"[A-Za-z]", head):
        english, korean = head[:-1].strip(), definition[m.start():]
    else:
        english, korean = None, definition
    return english or None, korean.rstrip(" .")


def medical_dict_text(value: Any) -> str:
    """A medical dictionary entry as one definition sentence.

    Example:
        ``{"term": "고혈압", "definition": "Hypertension. 혈압이 정상 범위보다 높은 상태"}`` becomes
        ``고혈압(Hypertension)은 혈압이 정상 범위보다 높은 상태를 의미한다.``; without an English part,
        ``고혈압은 혈압이 정상 범위보다 높은 상태를 의미한다.``

    Raises:
        RecordError: ``missing_field`` when ``term`` or ``definition`` is missing or empty.
    """
    term, definition = _term_definition(value)
    english, korean = split_definition(definition)
    subject = f"{term}({english})" if english else term
    if not korean:
        raise RecordError(MISSING_FIELD, "field 'definition' holds no description")
    return f"{attach(subject, '은')} {attach(korean, '을')} 의미한다."


def char_dict_text(value: Any) -> str:
    """A medical symbol entry as one sentence.

    Example:
        ``{"term": "↑", "definition": "increased, elevated, or upward trend"}`` becomes
        ``의학 기호 ↑는 increased, elevated, or upward trend를 나타낸다.``

    Raises:
        RecordError: ``missing_field`` when ``term`` or ``definition`` is missing or empty.
    """
    term, definition = _term_definition(value)
    definition = definition.rstrip(" .")
    if not definition:
        raise RecordError(MISSING_FIELD, "field 'definition' holds no description")
    return f"의학 기호 {attach(term, '은')} {attach(definition, '을')} 나타낸다."
