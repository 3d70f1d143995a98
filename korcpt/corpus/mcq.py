"""KorMedMCQA records: one validated shape shared by the corpus builder and the evaluator.

A record is ``{"question", "A".."E", "answer"}`` with ``answer`` the 1-based index of the right
option (2 means B) and optional ``subject``, ``year``, ``period``, ``q_number``, ``cot``, ``exam_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LETTERS = ("A", "B", "C", "D", "E")
OPTIONAL_KEYS = ("subject", "year", "period", "q_number", "cot", "exam_type")


class MCQRecordError(ValueError):
    """A record that cannot be used; the message says which field and why (one line)."""


@dataclass(frozen=True)
class MCQItem:
    question: str
    options: tuple[str, ...]  # the five option texts, A..E
    answer: int  # 0-based index into options
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


def parse_mcq_record(obj: Any) -> MCQItem:
    """Validate one decoded JSON value as a KorMedMCQA record.

    Raises:
        MCQRecordError: not an object, a missing or non-string question/option, or an answer that is
            not an integer in 1..5 (booleans, strings like "B" and null included).
    """
    if not isinstance(obj, dict):
        raise MCQRecordError(f"expected a JSON object, found {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise MCQRecordError("missing or empty field 'question'")
    options = []
    for letter in LETTERS:
        value = obj.get(letter)
        if not isinstance(value, str) or not value.strip():
            raise MCQRecordError(f"missing or empty option {letter!r}")
        options.append(value.strip())
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 1 <= answer <= 5:
        raise MCQRecordError(f"answer must be an integer in 1..5, found {answer!r}")
    meta = {k: obj[k] for k in OPTIONAL_KEYS if k in obj}
    return MCQItem(question=question.strip(), options=tuple(options), answer=answer - 1, meta=meta)
