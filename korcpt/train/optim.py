"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from korcpt.config import RunConfig
from korcpt.model.lora import embedding_parameters


def lr_multiplier(cfg: RunConfig, steps: int):
    """Step -> learning-rate multiplier of a run of ``steps``: linear warmup, then cosine decay to
    ``min_lr_ratio`` (transformers' ``cosine_with_min_lr`` schedule; tests/test_train.py checks they agree)."""
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * steps)
    steps, floor = max(steps, 1), cfg.train.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, steps - warmup)
        return max(0.0, floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return multiplier


def build_optimizer(model, cfg: RunConfig, total_steps: int):
    """AdamW with its own learning rate for embedding rows; warmup then cosine decay to min_lr_ratio.

    With ``lora.embeddings_first_steps = N`` (staged training) LoRA's learning rate is 0 for the first
    N steps, and its warmup and decay then run over the remaining steps; the rows keep the whole-run
    schedule. Worked example: 20 steps, N 5, warmup 3: the rows warm up over steps 0-2; LoRA is 0 over
    0-4, warms up over 5-7 and decays to step 20.
    """
    from torch.optim.lr_scheduler import LambdaLR

    emb = {id(p) for p in embedding_parameters(model)}
    lora = [p for p in model.parameters() if p.requires_grad and id(p) not in emb]
    groups = [{"params": lora, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}]
    if emb:
        groups.append({"params": [p for p in model.parameters() if id(p) in emb],
                       "lr": cfg.lora.embedding_lr or cfg.train.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)
    first = cfg.lora.embeddings_first_steps if emb else 0
    whole = lr_multiplier(cfg, total_steps)
    later = lr_multiplier(cfg, total_steps - first)
    lora_lr = (lambda step: 0.0 if step < first else later(step - first)) if first else whole
    scheduler = LambdaLR(optimizer, [lora_lr, whole] if emb else [whole])
    return optimizer, scheduler
