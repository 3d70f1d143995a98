"""Korean particles (조사) that agree with the word before them: 은/는, 이/가, 을/를.

The rule, applied to the word's last sounding character after dropping a trailing parenthetical
(``고혈압(Hypertension)`` is read as ``고혈압``) and trailing punctuation or spaces:

* a Hangul syllable: the consonant form (은/이/을) when it has a final consonant (받침), else the
  vowel form (는/가/를): ``두통은``, ``치매는``, ``통증을``, ``상태를``;
* a digit: as it is read in Korean, 0 영, 1 일, 3 삼, 6 육, 7 칠, 8 팔 end in a consonant (so ``10은``,
  ``B12는``); this is exact, because 십/백/천/만 end in a consonant too;
* an acronym (a run of at most 5 capital Latin letters): by the letter's Korean name; L 엘, M 엠, N 엔,
  R 알 end in a consonant (``LDL은``, ``CT는``);
* anything else (an English word, a symbol): the vowel form. English spelling does not tell the
  Korean reading, and the vowel form is what train_raw_korean_text.md shows: ``↑는``, ``...upward trend를``.

Why not a library. Measured on 14 words (train_raw_korean_text.md's, the ones above, and ``HbA1c``, ``pain``):
``tossi`` 0.3.1 (last release 2018) agrees on Hangul, parentheticals and digits but writes the
undecided form ``↑은(는)`` / ``trend을(를)`` / ``LDL은(는)`` for every other non-Hangul ending, which
breaks both of its examples;
``pyjosa`` 1.0.3 raises on any non-Hangul character, ``고혈압(Hypertension)`` included; ``josa`` 0.0.8
does not install (Python 2 setup). The rule above is 30 lines and does its cases right.
"""

from __future__ import annotations

import re

from korcpt.corpus.text import HANGUL_FIRST, is_hangul_syllable

PAIRS = {"은": ("은", "는"), "는": ("은", "는"), "이": ("이", "가"), "가": ("이", "가"), "을": ("을", "를"), "를": ("을", "를")}
_CONSONANT_DIGITS = set("013678")
_CONSONANT_LETTERS = set("LMNR")
_TRAILING_PAREN = re.compile(r"\s*[(\[{（][^()\[\]{}（）]*[)\]}）]\s*$")
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?·…'\"”’」』》〉)\]}]+$")
_ACRONYM = re.compile(r"(?:^|[^A-Za-z])([A-Z]{1,5})$")


def has_final_consonant(word: str) -> bool:
    """Whether ``word`` is read with a final consonant at its end (see the module docstring's rule).

    Args:
        word: any term or phrase; may end in a parenthetical, digits, Latin letters or symbols.

    Returns:
        True when the consonant form (은/이/을) follows, False for the vowel form (는/가/를).
    """
    stripped = word
    while True:  # drop trailing parentheticals, then punctuation, until nothing changes
        new = _TRAILING_PUNCT.sub("", _TRAILING_PAREN.sub("", stripped))
        if new == stripped or not new:
            break
        stripped = new
    if not stripped:
        return False
    last = stripped[-1]
    if is_hangul_syllable(last):
        return (ord(last) - ord(HANGUL_FIRST)) % 28 != 0  # 28 finals per initial+vowel; 0 is none
    if last.isdigit() and last.isascii():
        return last in _CONSONANT_DIGITS
    acronym = _ACRONYM.search(stripped)
    if acronym:
        return acronym.group(1)[-1] in _CONSONANT_LETTERS
    return False


def attach(word: str, particle: str) -> str:
    """``word`` followed by the right form of ``particle`` (any form of 은/는, 이/가, 을/를).

    Example:
        >>> attach("고혈압(Hypertension)", "는"), attach("상태", "을"), attach("↑", "은")
        ('고혈압(Hypertension)은', '상태를', '↑는')
    """
    consonant_form, vowel_form = PAIRS[particle]
    return word + (consonant_form if has_final_consonant(word) else vowel_form)
