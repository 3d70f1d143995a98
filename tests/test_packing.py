"""Document masking: a packed a|b gives the same per-token losses as a and b run separately."""

from __future__ import annotations

import pytest
import torch

from korcpt.model.packing import document_attention_mask, document_ids, document_mask_kwargs, varlen_kwargs
from tinyrun import tiny_model


def packing_model(attn: str):
    """A sliding window of 4 tokens, so that the window and the document mask both bite."""
    return tiny_model(256, attn_implementation=attn, sliding_window=4, max_position_embeddings=256,
                      layer_types=["sliding_attention", "full_attention"])


def token_losses(model, input_ids, **kwargs) -> torch.Tensor:
    """Loss of predicting token t+1 from position t, per position ([B, T-1])."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, **kwargs).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
    )


def test_document_ids_restart_at_row_start_and_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [5, 6, 0, 1, 2, 3, 0, 0]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 2, 3]]
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 10, 14, 15, 16]
    assert kw["max_length_q"] == 4


def test_mask_is_causal_same_document_and_windowed():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    allowed = document_attention_mask(pos, torch.bool)[0, 0]
    additive = document_attention_mask(pos, torch.float32, sliding_window=2)[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False, False, False]
    assert (additive[7] == 0).tolist() == [False] * 6 + [True, True]
    assert additive.min().item() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_separate_losses(attn):
    model = packing_model(attn)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (1, 11), generator=g)
    b = torch.randint(0, 256, (1, 9), generator=g)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(11), torch.arange(9)])[None]

    separate_a = token_losses(model, a)
    separate_b = token_losses(model, b)
    masked = token_losses(model, packed, **document_mask_kwargs(model, pos))
    # Position 10 predicts b's first token from a: a boundary target, not part of either document.
    diff_a = (masked[:, :10] - separate_a).abs().max().item()
    diff_b = (masked[:, 11:] - separate_b).abs().max().item()
    assert diff_a < 1e-5 and diff_b < 1e-5, (diff_a, diff_b)

    # Without masking (continuous positions, plain causal attention) b sees a: losses differ.
    unmasked = token_losses(model, packed, position_ids=torch.arange(20)[None], use_cache=False)
    assert (unmasked[:, :10] - separate_a).abs().max().item() < 1e-5  # a comes first: unaffected
    assert (unmasked[:, 11:] - separate_b).abs().max().item() > 1e-3


def test_batch_of_two_rows_with_different_boundaries():
    model = packing_model("sdpa")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 256, (1, n), generator=g) for n in (5, 7, 12)]
    rows = torch.cat([torch.cat(docs[:2], 1), docs[2]], 0)  # row 0: 5|7, row 1: one document of 12
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    masked = token_losses(model, rows, **document_mask_kwargs(model, pos))
    assert (masked[0:1, 5:] - token_losses(model, docs[1])).abs().max().item() < 1e-5
    assert (masked[1:2] - token_losses(model, docs[2])).abs().max().item() < 1e-5


def test_kwargs_per_attention_implementation():
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    model = packing_model("sdpa")
    kw = document_mask_kwargs(model, pos)
    assert set(kw["attention_mask"]) == {"full_attention", "sliding_attention"}
    assert kw["attention_mask"]["full_attention"].dtype == torch.bool and kw["use_cache"] is False
    model.config._attn_implementation = "flash_attention_2"
    kw = document_mask_kwargs(model, pos)
    assert "attention_mask" not in kw and kw["cu_seq_lens_k"].tolist() == [0, 2, 5]


def test_multimodal_gemma3_takes_the_same_masks():
    """MedGemma 4B is Gemma3ForConditionalGeneration: the dict mask passes through to its language model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 290, (1, 10), generator=g), torch.randint(0, 290, (1, 8), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(8)])[None]
    masked = token_losses(model, torch.cat([a, b], 1), **document_mask_kwargs(model, pos))
    assert (masked[:, 10:] - token_losses(model, b)).abs().max().item() < 1e-5
    assert (masked[:, :9] - token_losses(model, a)).abs().max().item() < 1e-5
