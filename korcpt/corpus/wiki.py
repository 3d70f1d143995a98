"""Namu Wiki (and light MediaWiki) markup -> plain text, as a chain of small regex passes.

Why regex and not a parser. Two maintained candidates were measured on the real Namu sample
(``shared/data/namu/namuwiki_sample.json``, 5 records) and the real plain text (``shared/data/plain``):

* ``mwparserfromhell`` 0.7.2 parses MediaWiki, not Namu markup: ``strip_code()`` keeps
  ``[include(...)]``, ``[목차]``, ``[* footnotes]``, ``{{{+1 ...}}}`` and every ``||table||`` cell
  marker, so 4 of the 4 non-redirect records still held forbidden markup afterwards.
* ``namu-wiki-extractor`` 0.3.0 (the only Namu parser on PyPI; last release 2022) is itself a list
  of regexes. On the sample it left no forbidden markup, but it collapses every run of equal
  whitespace (``(\\s)\\1+``), so paragraph breaks are lost (0 blank lines survive in 4 records),
  it deletes text between any two ``$`` or ``--`` (rigveda math and strike syntax that Namu dropped),
  and its ``age``/``dday`` macros insert today's date, which breaks byte-identical reruns.

This module keeps what is right in both (innermost-first unwrapping, link labels, footnotes dropped)
and adds paragraph breaks and determinism; ``tests/test_corpus_wiki.py`` checks every rule on the
real sample. Measured here (``bench/bench_corpus.py`` machine, 4 non-redirect records):

==========================  =====================  ================  ==========
cleaner                     records with markup    paragraph breaks  ms/record
==========================  =====================  ================  ==========
this module (regex)         0/4                    4/4               0.38
namu-wiki-extractor 0.3.0   0/4                    0/4               0.49
mwparserfromhell 0.7.2      4/4                    4/4               1.04
==========================  =====================  ================  ==========

Which records get these rules is decided in :mod:`korcpt.corpus.textformat`: Namu records get
:func:`clean_wiki`, MediaWiki-style records :func:`clean_mediawiki` (the rules the two share, none of
Namu's ``~~``/``^^``/``##``/``||`` rules that would eat web prose), plain text
only normalisation (and ``.txt`` files by default: wiki rules would eat their ``1.`` and ``*`` markers).

Rules, in order: ``{{{...}}}`` blocks unwrapped innermost first (``#!syntax`` code dropped,
``#!html`` tags stripped, ``+1``/``#color`` prefixes dropped); ``<ref>``, HTML comments and tags;
macros (``[include(...)]``, ``[목차]``, ``[각주]``, ``[clearfix]``, ``[br]``, media, dates);
``[[target|label]]`` -> label, ``[[target]]`` -> target, files and categories dropped; ``[* footnotes]``
dropped; ``{{templates}}`` dropped; headings kept as a line of text; tables become one line per row
with cells joined by a space; list and quote markers; ``'''``/``''``/``__``/``^^``/``,,`` unwrapped;
``~~deleted~~`` dropped; Namu backslash escapes resolved; finally :func:`normalize_text`.
"""

from __future__ import annotations

import re

from korcpt.corpus.text import normalize_text

_REDIRECT = re.compile(r"^\s*#(?:redirect|넘겨주기)\b", re.IGNORECASE)

_TRIPLE = re.compile(r"\{\{\{((?:(?!\{\{\{|\}\}\}).)*)\}\}\}", re.DOTALL)  # innermost {{{...}}}
_TRIPLE_PREFIX = re.compile(
    r"^(?:#!wiki(?:\s+style\s*=\s*\"[^\"]*\")?\s*"  # {{{#!wiki style="..." content}}}
    r"|#!folding[^\n]*\n?"  # {{{#!folding title\n content}}}
    r"|[+-][1-5]\s"  # {{{+1 bigger text}}}
    r"|#(?:[0-9a-fA-F]{3,6}|[a-zA-Z]+)(?:,#(?:[0-9a-fA-F]{3,6}|[a-zA-Z]+))?\s"  # {{{#red text}}}
    r")"
)
_REF = re.compile(r"<ref\b[^>]*?(?:/>|>.*?</ref\s*>)", re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BR = re.compile(r"<br\s*/?>|\[br\]|\[\[br\]\]", re.IGNORECASE)
_MACRO = re.compile(
    r"\[\[?(?:include|목차|tableofcontents|각주|footnote|clearfix|date|datetime|pagecount|youtube|"
    r"nicovideo|kakaotv|vimeo|navertv|age|dday|ruby|anchor|math|wikicommons)(?:\([^)\]]*\))?\]\]?",
    re.IGNORECASE,
)
_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*?)\]\]", re.DOTALL)  # innermost [[...]]
_DROPPED_LINK = re.compile(r"^\s*:?\s*(?:파일|이미지|file|image|분류|category)\s*:", re.IGNORECASE)
_FOOTNOTE = re.compile(r"\[\*[^\[\]]*\]")  # innermost [* ...] / [*name ...]
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.DOTALL)
_HEADING = re.compile(r"^(={1,6})#?\s*(.*?)\s*#?\1\s*$", re.MULTILINE)
_HR = re.compile(r"^-{4,9}\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^##.*$", re.MULTILINE)
_TABLE_ATTR = re.compile(r"<[^<>\s]*>")
_LIST = re.compile(r"^[ \t]+\*[ \t]*", re.MULTILINE)  # bullets only: "1." numbers read well as text
_QUOTE = re.compile(r"^>+[ \t]?", re.MULTILINE)
_BOLD = re.compile(r"'''(.+?)'''")
_ITALIC = re.compile(r"''(.+?)''")
_DELETED = re.compile(r"~~(.+?)~~", re.DOTALL)
_UNDERLINE = re.compile(r"__(.+?)__")
_SUP = re.compile(r"\^\^(.+?)\^\^")
_SUB = re.compile(r",,(.+?),,")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_ESCAPE = re.compile(r"\\(.)")
_LEFTOVER = re.compile(r"\[\[|\]\]|\{\{\{|\}\}\}|'''|\|\|")
# MediaWiki only: [https://x label] external links and __TOC__ magic words; its leftovers keep "||"
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]\n]*))?\]")
_MAGIC = re.compile(r"__[A-Z]+__")
_WIKI_LEFTOVER = re.compile(r"\[\[|\]\]|'''")


def is_redirect(text: str) -> bool:
    """True for a Namu/MediaWiki redirect page (``#redirect 문서`` or ``#넘겨주기 문서``)."""
    return _REDIRECT.match(text) is not None


def _sub_until_stable(pattern: re.Pattern[str], repl, text: str) -> str:
    # innermost-first patterns: each pass peels one level of nesting
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _unwrap_triple(m: re.Match[str]) -> str:
    body = m.group(1)
    if body.startswith("#!syntax"):
        return ""
    if body.startswith("#!html"):
        return _TAG.sub("", body[len("#!html"):])
    return _TRIPLE_PREFIX.sub("", body, count=1)


def _link(m: re.Match[str]) -> str:
    inner = m.group(1)
    if _DROPPED_LINK.match(inner):
        return ""
    target, bar, label = inner.partition("|")
    if bar:
        return label
    if target.startswith(("http://", "https://")):
        return ""
    target = target.split("#", 1)[0] if not target.startswith("#") else target[1:]
    return target.removeprefix(":")


def _table_row(line: str) -> str:
    if not line.lstrip().startswith("||"):
        return line
    cells = [c.strip() for c in _TABLE_ATTR.sub("", line).split("||")]
    return " ".join(c for c in cells if c)


def clean_wiki(text: str) -> str:
    """Strip Namu Wiki / MediaWiki markup, keeping sentence text and paragraph breaks.

    Args:
        text: a raw wiki document (not a redirect: check :func:`is_redirect` first).

    Returns:
        Plain text, NFC, whitespace normalised (possibly empty).

    Example:
        >>> clean_wiki("[목차] '''당뇨병'''은 [[혈당]] 조절 장애로 인한 [[대사 질환]]이다.")
        '당뇨병은 혈당 조절 장애로 인한 대사 질환이다.'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _sub_until_stable(_TRIPLE, _unwrap_triple, text)
    text = _REF.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _BR.sub("\n", text)
    text = _MACRO.sub("", text)
    text = _sub_until_stable(_LINK, _link, text)
    text = _sub_until_stable(_FOOTNOTE, "", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _COMMENT_LINE.sub("", text)
    text = _HEADING.sub(r"\n\2\n", text)
    text = _HR.sub("", text)
    text = "\n".join(_table_row(line) for line in text.split("\n"))
    text = _LIST.sub("", text)
    text = _QUOTE.sub("", text)
    text = _DELETED.sub("", text)
    for pattern in (_BOLD, _ITALIC, _UNDERLINE, _SUP, _SUB):
        text = pattern.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _LEFTOVER.sub("", text)
    return normalize_text(text)


def clean_mediawiki(text: str) -> str:
    """Strip the markup MediaWiki shares with Namu, and apply none of Namu's own rules.

    Kept from :func:`clean_wiki`: ``<ref>``, comments, ``<br>``, ``[[links]]`` (files and categories
    dropped), ``{{templates}}``, headings, rules, ``'''bold'''``/``''italic''``, HTML tags. Added:
    ``[https://x label]`` -> label, ``__TOC__``-style magic words dropped. Left alone, because they
    are prose outside Namu: ``~~``, ``^^``, ``__x__``, ``,,``, ``##`` lines, ``||``, backslashes,
    ``>`` and ``*`` line starts. Tables (``{| |}``) are not parsed.

    Example:
        >>> clean_mediawiki("'''서울'''은 [[대한민국|한국]]의 수도다^^ {{인용 필요}}")
        '서울은 한국의 수도다^^'
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _REF.sub("", text)
    text = _HTML_COMMENT.sub("", text)
    text = _BR.sub("\n", text)
    text = _sub_until_stable(_LINK, _link, text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _MAGIC.sub("", text)
    text = _HEADING.sub(r"\n\2\n", text)
    text = _HR.sub("", text)
    for pattern in (_BOLD, _ITALIC):
        text = pattern.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _WIKI_LEFTOVER.sub("", text)
    return normalize_text(text)
