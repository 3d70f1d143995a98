"""LoRA and the embedding modes on a tiny Gemma 3: what trains, what stays bit-identical, and that the
saved adapter loads with PeftModel.from_pretrained and reproduces the trained model's logits."""

import pytest
import torch

from korcpt.config import LoraConfig, RunConfig
from korcpt.model.lora import NewTokenRows, apply_lora, count_parameters, embedding_parameters
from tinyrun import tiny_model

BASE_VOCAB, NEW = 300, 20


def lora_base(seed: int = 0):
    """The tiny model with NEW rows past a base vocabulary of BASE_VOCAB."""
    return tiny_model(BASE_VOCAB + NEW, seed)


def train_a_little(model, steps: int = 5) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, BASE_VOCAB + NEW, (2, 16), generator=g)
        ids[:, ::3] = BASE_VOCAB + 3  # new tokens appear in inputs and targets
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["frozen", "new_tokens", "full"])
def test_what_trains_per_embedding_mode(mode):
    base = lora_base()
    emb_before = base.get_input_embeddings().weight.detach().clone()
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, embeddings=mode),
                       list(range(BASE_VOCAB, BASE_VOCAB + NEW)))
    inner = model.get_base_model()
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_a_little(model)
    lora_changed = sum(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert lora_changed == len(lora_before) > 0
    for name, param in model.named_parameters():  # every frozen weight bit-identical
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), name
    emb_after = inner.get_input_embeddings().weight.detach()
    head = inner.get_output_embeddings()
    if mode == "frozen":
        assert torch.equal(emb_after, emb_before)
        assert embedding_parameters(model) == []
    elif mode == "new_tokens":
        rows = inner.get_input_embeddings()
        assert isinstance(rows, NewTokenRows)
        assert torch.equal(emb_after, emb_before)  # the base table, original and new rows, untouched
        assert not torch.equal(rows.rows.detach(), emb_before[BASE_VOCAB:])  # the new rows trained
        assert embedding_parameters(model) == [rows.rows]
    else:
        assert not torch.equal(emb_after, emb_before)
        assert head.weight is inner.get_input_embeddings().weight  # still tied: one tensor


def test_trainable_counts_for_new_tokens_are_the_rows_and_lora():
    model = apply_lora(lora_base(), LoraConfig(r=4, alpha=8, embeddings="new_tokens"),
                       list(range(BASE_VOCAB, BASE_VOCAB + NEW)))
    trainable, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora + NEW * 64
    assert total == sum(p.numel() for p in lora_base().parameters()) + lora


def test_new_rows_feed_the_tied_head():
    model = apply_lora(lora_base(), LoraConfig(r=4, alpha=8, dropout=0.0, embeddings="new_tokens"),
                       list(range(BASE_VOCAB, BASE_VOCAB + NEW)))
    inner = model.get_base_model()
    with torch.no_grad():
        inner.get_input_embeddings().rows.add_(1.0)
        ids = torch.tensor([[2, 5, BASE_VOCAB + 1]])
        hidden = inner.model(input_ids=ids).last_hidden_state
        logits = inner.lm_head(hidden)
        expected = hidden @ torch.cat([inner.model.embed_tokens.base.weight[:BASE_VOCAB],
                                       inner.model.embed_tokens.rows]).T
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("mode", ["frozen", "new_tokens", "full"])
def test_saved_adapter_reloads_with_peft_and_reproduces_logits(tmp_path, mode):
    from accelerate import Accelerator
    from peft import PeftModel

    from korcpt.train.outputs import save_adapter

    cfg = RunConfig()
    cfg.lora = LoraConfig(r=4, alpha=8, dropout=0.0, embeddings=mode)
    cfg.model.name = "tiny"
    model = apply_lora(lora_base(), cfg.lora, list(range(BASE_VOCAB, BASE_VOCAB + NEW)))
    train_a_little(model)
    model.eval()
    ids = torch.tensor([[2, 7, BASE_VOCAB + 3, 11, BASE_VOCAB + 19, 4]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(Accelerator(cpu=True), model, cfg, tmp_path / "out")
    loaded = PeftModel.from_pretrained(lora_base(), tmp_path / "out").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["frozen", "new_tokens", "full"])
def test_a_bfloat16_model_trains_float32_masters_and_computes_in_bfloat16(mode):
    """Trainable tensors are float32 (a bfloat16 weight drops AdamW steps below half its ulp), frozen
    ones stay bfloat16, the forward runs in bfloat16, and one step at lr 2e-5 moves (nearly) every
    embedding entry."""
    model = apply_lora(lora_base().to(torch.bfloat16), LoraConfig(r=4, alpha=8, dropout=0.0, embeddings=mode),
                       list(range(BASE_VOCAB, BASE_VOCAB + NEW)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids = torch.arange(BASE_VOCAB - 8, BASE_VOCAB + 8)[None]  # old and new tokens
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=2e-5, weight_decay=0.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    embedding = [n for n in trainable if "embed" in n]
    assert len(embedding) == (0 if mode == "frozen" else 1)
    for name in embedding:  # the tied head gives every row a gradient (without masters: about 30% move)
        assert (trainable[name] != before[name]).float().mean() > 0.999, name
