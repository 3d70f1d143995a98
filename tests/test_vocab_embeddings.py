"""Embedding initialisation for new tokens (korcpt.model.embeddings) on a tiny random Gemma 3."""

from __future__ import annotations

import pytest
import torch

from korcpt.errors import ModelError
from korcpt.model.embeddings import new_token_ids, pieces_of, resize_and_init_embeddings
from korcpt.vocab.extend import build_extended_tokenizer, learn_extension
from tinyrun import tiny_model

LINES = [
    "오늘 아침에 우리는 학교에 갔다.",
    "그 사람은 책을 읽고 나서 잠을 잤다.",
    "친구와 함께 시장에 가서 과일을 샀다.",
    "The quick brown fox jumps over the lazy dog.",
] * 3
EXTENSION = [f"어제 당뇨병{p} 검진 결과를 들었다." for p in ["은", "이", "을", "의", ""]] * 2 + ["고혈압 고혈압 폐렴"] * 2


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    from korcpt.assets import train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "base.txt").write_text("\n".join(LINES) + "\n", encoding="utf-8")
    train_tiny_tokenizer([tmp / "base.txt"], tmp / "base", vocab_size=300)
    base = AutoTokenizer.from_pretrained(tmp / "base")
    ext = learn_extension(base, EXTENSION, max_new_tokens=30)
    new = build_extended_tokenizer(base, ext, tmp / "new")
    assert len(new) > len(base)
    return base, new


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_means_of_base_pieces_and_old_rows_identical(tokenizers, tied):
    base, new = tokenizers
    model = tiny_model(len(base), tie_word_embeddings=tied)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = resize_and_init_embeddings(model, base, new)

    assert ids == new_token_ids(len(base), new) == list(range(len(base), len(new)))
    target = -(-len(new) // 64) * 64
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == target and target % 64 == 0
    assert (emb is head) == tied
    assert torch.equal(emb[: len(base)], old_in) and torch.equal(head[: len(base)], old_out)
    checked = 0
    for i, pieces in pieces_of(base, new, ids).items():
        assert pieces and all(p < len(base) for p in pieces)
        assert torch.allclose(emb[i], old_in[pieces].mean(0), atol=1e-6)
        assert torch.allclose(head[i], old_out[pieces].mean(0), atol=1e-6)
        checked += 1
    assert checked == len(new) - len(base)
    assert torch.allclose(emb[len(new):], old_in.mean(0).expand(target - len(new), -1), atol=1e-6)
    # the model runs on a new id and is unchanged on base ids
    with torch.no_grad():
        logits = model(torch.tensor([[2, ids[0], 5]])).logits
    assert logits.shape == (1, 3, target) and torch.isfinite(logits).all()


def test_pieces_are_what_the_base_makes_of_the_text(tokenizers):
    base, new = tokenizers
    token = "▁당뇨병"
    i = new.convert_tokens_to_ids(token)
    assert i >= len(base)
    assert pieces_of(base, new, [i]) == {i: base.encode(" 당뇨병", add_special_tokens=False)}


def test_resize_is_idempotent_and_model_larger_than_tokenizer_kept(tokenizers):
    base, new = tokenizers
    model = tiny_model(len(base))
    resize_and_init_embeddings(model, base, new)
    snapshot = model.get_input_embeddings().weight.detach().clone()
    resize_and_init_embeddings(model, base, new)  # already large enough: rows rewritten to the same values
    assert torch.equal(model.get_input_embeddings().weight, snapshot)


def test_moved_base_ids_and_short_models_are_rejected(tokenizers):
    base, new = tokenizers
    with pytest.raises(ModelError, match="fewer than the base tokenizer"):
        resize_and_init_embeddings(tiny_model(len(base) - 10), base, new)
    with pytest.raises(ModelError, match="another id"):
        resize_and_init_embeddings(tiny_model(len(new)), new, base)  # "base" ids shrink: not an extension
