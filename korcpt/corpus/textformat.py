"""Which cleaner a Korean record gets: ``namu``, ``wiki`` or ``plain``, given per input or detected.

Why this exists: the Namu rules are destructive on ordinary prose. ``~~(.+?)~~`` deletes everything
between two ``~~`` (across lines), and Korean web text uses ``~~`` and ``^^`` as emoticons
("좋아요~~", "감사합니다^^") and ``##`` for hashtags; so only Namu text may go through them.

An input is given as ``PATH`` (``auto``) or ``PATH:FORMAT`` (:func:`split_format`). With ``auto``:

* a ``.txt`` file is ``plain`` (wiki rules would eat its ``1.`` and ``*`` list markers);
* a record with the Namu dump's keys (``namespace``, ``title``, ``text``) is ``namu``;
* otherwise the text decides: Namu-only markup (``{{{``, ``[include(``, ``[목차]``, ``[각주]``,
  ``[clearfix]``, ``[* footnote]``, a ``||`` table row) -> ``namu``; markup Namu shares with MediaWiki
  (``[[link]]``, ``'''bold'''``, ``{{template}}``, ``<ref>``, a ``#redirect``) -> ``wiki``;
  none -> ``plain``. Detection is per record: a Namu export without its keys whose record shows only
  links and bold gets the ``wiki`` cleaner (its ``~~struck~~`` text kept); say ``:namu`` to be sure.

Every format ends in :func:`~korcpt.corpus.text.normalize_text`; ``plain`` is only that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from korcpt.corpus.readers import expand_inputs
from korcpt.corpus.text import normalize_text
from korcpt.corpus.wiki import clean_mediawiki, clean_wiki, is_redirect
from korcpt.errors import DataError

AUTO, NAMU, WIKI, PLAIN = "auto", "namu", "wiki", "plain"
TEXT_FORMATS = (AUTO, NAMU, WIKI, PLAIN)

_NAMU_KEYS = frozenset({"namespace", "title", "text"})  # a Namu dump record (contributors may be removed)
_NAMU_MARKUP = re.compile(
    r"\{\{\{"  # {{{+1 ...}}}, {{{#!wiki ...}}}, {{{#!syntax ...}}}
    r"|\[(?:include|목차|tableofcontents|각주|footnote|clearfix)[(\]]"  # macros
    r"|\[\*[^\s\[\]]*\s"  # [* footnote] / [*name footnote]
    r"|^[ \t]*\|\|",  # ||table|| rows
    re.IGNORECASE | re.MULTILINE,
)
_WIKI_MARKUP = re.compile(r"\[\[[^\[\]\n]+\]\]|'''[^'\n]+'''|\{\{[^{}\n]+\}\}|<ref[\s>/]", re.IGNORECASE)
_SPEC = re.compile(r"^(?P<path>.+):(?P<fmt>[A-Za-z]+)$")


def split_format(spec: str | Path) -> tuple[Path, str]:
    """An input as given (``PATH`` or ``PATH:FORMAT``) -> the path and its format (``auto`` if none).

    A string that names an existing path is never split, so every command line that worked before
    still does (even for a file whose name ends in ``:word``).

    Raises:
        DataError: the suffix is not one of :data:`TEXT_FORMATS` (and the whole is no existing path).
    """
    text = str(spec)
    m = _SPEC.match(text)
    if m is None or Path(text).exists():
        return Path(text), AUTO
    fmt = m["fmt"].lower()
    if fmt not in TEXT_FORMATS:
        raise DataError(f"{text}: unknown text format {m['fmt']!r}, expected one of {', '.join(TEXT_FORMATS)} "
                        f"(or no such file or directory)")
    return Path(m["path"]), fmt



def resolve_inputs(specs: list[str | Path]) -> list[tuple[Path, str]]:
    """Every input file behind ``specs`` (``PATH[:FORMAT]``, a file or a directory) with its text format,
    all resolved before any is read, so that a typo in the last one fails at once.

    Raises:
        DataError: an unknown format, a missing path or a directory with nothing readable.
    """
    return [(path, fmt) for given, fmt in map(split_format, specs) for path in expand_inputs([given])]

def detect_markup(text: str) -> str:
    """``namu``, ``wiki`` or ``plain``: the markup ``text`` shows (see the module docstring)."""
    if _NAMU_MARKUP.search(text):
        return NAMU
    if is_redirect(text) or _WIKI_MARKUP.search(text):
        return WIKI
    return PLAIN


def record_format(value: Any, is_text: bool, given: str = AUTO) -> str:
    """The format a record is cleaned as: ``given``, or for ``auto`` what its shape and markup show.

    Args:
        value: the record (a JSON value, or the text of a ``.txt`` file).
        is_text: the record is a whole ``.txt`` file.
        given: the input's format, one of :data:`TEXT_FORMATS`.

    Returns:
        ``namu``, ``wiki`` or ``plain``.
    """
    if given != AUTO:
        return given
    if is_text:
        return PLAIN  # .txt files were always plain text; wiki rules would eat "1." and "*" markers
    if isinstance(value, dict) and _NAMU_KEYS <= value.keys():
        return NAMU
    text = value.get("text") if isinstance(value, dict) else value
    return detect_markup(text) if isinstance(text, str) else PLAIN


def clean_as(text: str, fmt: str) -> str | None:
    """``text`` cleaned as ``fmt`` (``namu``, ``wiki`` or ``plain``); ``None`` for a wiki redirect page.

    Example:
        >>> clean_as("좋아요~~ 내일 봐요~~", "plain")
        '좋아요~~ 내일 봐요~~'
        >>> clean_as("좋아요~~ 내일 봐요~~", "namu")
        '좋아요'
    """
    if fmt == PLAIN:
        return normalize_text(text)  # no redirect check: "#넘겨주기" opening prose is still prose
    if is_redirect(text):
        return None
    return clean_wiki(text) if fmt == NAMU else clean_mediawiki(text)
