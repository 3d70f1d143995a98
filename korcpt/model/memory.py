"""Parameter counts and a per-GPU memory estimate for a run, from the architecture alone (meta device).

Nothing is downloaded and no weight is allocated: the architecture config (``configs/models/<preset>.json``,
a ``.json`` file or a directory holding ``config.json``) is read and built on the ``meta`` device with
the run's vocabulary size by the loader's own functions (:mod:`korcpt.model.load`), and LoRA is counted
on exactly the linears :func:`korcpt.model.lora.lora_targets` says it wraps.

Byte accounting per GPU (N = GPUs, ZeRO stage z; bf16 training as DeepSpeed and the loop do it):

    frozen weights        2 B/param                         / N under z = 3
    trainable weights     2 B/param (bf16 copy the forward uses)   / N under z = 3
    gradients             2 B/param                         / N under z >= 2
    optimizer             12 B/param (fp32 master, Adam m, v)      / N under z >= 1
    ZeRO-3 working set    the largest gathered tensors (two decoder layers in flight, or the
                          [vocab, hidden] embedding/head while it runs), bf16
    activations           per token and layer, see :func:`activation_bytes`
    logits / loss         plain: 3 float32 [tokens, vocab] buffers (measured: logits, log-softmax,
                          their gradient); chunked: 3 x [chunk, vocab] plus a float32 [vocab, hidden]
                          gradient accumulator when the head trains
    reserve               1 GiB (CUDA context, allocator fragmentation)

Without DeepSpeed (stage 0: one GPU, or DDP) every trainable tensor is its own float32 master
(korcpt.model.lora): 4 B weight + 4 B gradient + 8 B Adam m, v = 16 B per trainable parameter, and
in ``full`` mode the output head casts the [vocab, hidden] table to bf16 for each forward, a copy
kept for the backward (2 B/param of the embedding, ``master_cast``). MedGemma 4B in ``full`` mode:
0.67B float32 rows = 2.7 GB, their gradient 2.7 GB, Adam 5.4 GB, the cast 1.3 GB.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from korcpt.config import RunConfig
from korcpt.errors import ConfigError
from korcpt.model.embeddings import padded_vocab
from korcpt.model.load import arch_config, build_meta_model, read_arch_config
from korcpt.model.lora import lora_targets

GIB = 2**30
BYTES_FROZEN = 2
BYTES_WEIGHT = 2
BYTES_GRAD = 2
BYTES_OPTIM = 12
BYTES_MASTER = 4  # stage 0: the float32 master is the weight, its gradient float32, Adam 8 B
BYTES_ADAM = 8
RESERVE_BYTES = 1 * GIB


@dataclass
class ArchInfo:
    """What the estimate needs from an architecture (text model of a multimodal one)."""

    model_type: str
    vocab_rows: int  # embedding rows after resizing (padded)
    base_vocab: int  # rows of the architecture as published
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None
    sliding_layers: int


@dataclass
class ParamCounts:
    """Parameter counts as :func:`korcpt.model.lora.count_parameters` reports them on the PEFT model."""

    total: int
    trainable: int
    base: int  # the resized base model (vision tower included for MedGemma 4B)
    lora: int
    embedding_trainable: int
    lora_modules: int
    largest_layer: int  # parameters of the largest decoder layer (ZeRO-3 gathers one at a time)
    embedding: int  # vocab_rows * hidden


@dataclass
class MemoryPlan:
    """The estimate of one run on ``gpus`` GPUs of ``gpu_mem_gib`` GiB; all byte figures per GPU."""

    model: str
    embeddings: str
    vocab: int
    zero_stage: int
    gpus: int
    gpu_mem_gib: float
    seq_len: int
    micro_batch_size: int
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    params: ParamCounts
    breakdown: dict[str, int]
    activations_no_checkpointing: int
    activations_checkpointing: int
    per_gpu_bytes: int
    fits: bool
    suggestions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_params"] = self.params.total
        out["trainable_params"] = self.params.trainable
        out["trainable_percent"] = 100.0 * self.params.trainable / self.params.total
        out["per_gpu_gib"] = self.per_gpu_bytes / GIB
        return out


def arch_info(arch: dict[str, Any], vocab_rows: int) -> ArchInfo:
    text = arch_config(arch).get_text_config()
    layer_types = list(getattr(text, "layer_types", None) or [])
    return ArchInfo(
        model_type=arch["model_type"], vocab_rows=vocab_rows, base_vocab=text.vocab_size, hidden=text.hidden_size,
        intermediate=text.intermediate_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        sliding_window=getattr(text, "sliding_window", None), sliding_layers=layer_types.count("sliding_attention"),
    )


def count_params(cfg: RunConfig, vocab: int | None = None, base_vocab: int | None = None,
                 model: torch.nn.Module | None = None) -> tuple[ParamCounts, ArchInfo]:
    """Exact total and trainable parameter counts of the run's PEFT model, from the meta architecture.

    Args:
        cfg: the run config (model.name, lora.r, lora.target_modules, lora.embeddings).
        vocab: tokenizer size after extension; the embedding gets ``padded_vocab(vocab)`` rows (as
            the loader resizes); None keeps the architecture's vocabulary.
        base_vocab: rows of the base model; ``new_tokens`` trains ``vocab - base_vocab`` rows
            (default: the architecture's vocab_size).
        model: an already built meta model (the base, without PEFT) to reuse.
    """
    arch = read_arch_config(cfg.model.name)
    arch_vocab = arch_config(arch).get_text_config().vocab_size
    rows = padded_vocab(vocab) if vocab else arch_vocab
    base_vocab = base_vocab or arch_vocab
    if model is None:
        model = build_meta_model(arch, rows)
    info = arch_info(arch, rows)
    info.base_vocab = base_vocab
    base = _unique_numel(model)
    targets = lora_targets(model, cfg.lora)
    lora = sum(cfg.lora.r * (m.in_features + m.out_features) for m in targets)
    mode = cfg.lora.embeddings
    if mode == "full":
        emb = rows * info.hidden
    elif mode == "new_tokens":
        new = (vocab or rows) - base_vocab
        if new <= 0:
            raise ConfigError(f"lora.embeddings new_tokens: vocabulary {vocab or rows} adds no rows to the base's "
                              f"{base_vocab} (pass the extended tokenizer's size, e.g. --vocab 282738)")
        emb = new * info.hidden
    else:
        emb = 0
    layers = _decoder_layers(model)
    largest = max((_unique_numel(layer) for layer in layers), default=0)
    counts = ParamCounts(total=base + lora, trainable=lora + emb, base=base, lora=lora, embedding_trainable=emb,
                         lora_modules=len(targets), largest_layer=largest, embedding=rows * info.hidden)
    return counts, info


def _unique_numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and re.search(r"(language_model|^model)\.layers$|^model\.layers$", name):
            return list(module)
    return []


def activation_bytes(info: ArchInfo, tokens: int, seq_len: int, micro_batch: int, *, checkpointing: bool,
                     lora_dropout: float = 0.0, eager_attention: bool = False) -> int:
    """Activation bytes held for backward (bf16), for ``tokens = micro_batch * seq_len``.

    Per decoder layer and token, the tensors autograd saves in a Gemma 3 layer (SDPA/flash kernels,
    which keep no [T, T] scores): the 4 RMSNorm inputs and the residual (5 H), the normed input of
    q/k/v and of gate/up (2 H), q and k before and after norm and RoPE (4 q + 4 kv widths), v, the
    attention output and its log-sum-exp (q + kv widths), gate, up, gelu(gate) and their product (4 I).
    LoRA dropout saves each adapted linear's dropped input and a mask (3 bytes per element).
    With checkpointing only each layer's input (H) is kept, plus one layer recomputed at a time.
    """
    h, i_ = info.hidden, info.intermediate
    q, kv = info.heads * info.head_dim, info.kv_heads * info.head_dim
    per_token_layer = 2 * (7 * h + 5 * q + 5 * kv + 4 * i_)
    if lora_dropout > 0:
        per_token_layer += 3 * (3 * h + q + 2 * h + i_)
    per_layer = per_token_layer * tokens
    if eager_attention:  # scores and probabilities, float32 softmax, per head
        per_layer += micro_batch * info.heads * seq_len * seq_len * (2 + 4 + 2)
    embed_and_norm = tokens * h * 2 * 3
    if checkpointing:
        return info.layers * tokens * h * 2 + per_layer + embed_and_norm
    return info.layers * per_layer + embed_and_norm


def loss_bytes(info: ArchInfo, tokens: int, chunk_tokens: int, head_trains: bool) -> int:
    """Logits and cross-entropy temporaries: 3 float32 [n, vocab] buffers, n = tokens or the chunk."""
    n = min(chunk_tokens, tokens) if chunk_tokens > 0 else tokens
    out = 3 * n * info.vocab_rows * 4
    if chunk_tokens > 0 and head_trains:
        out += info.vocab_rows * info.hidden * 4  # float32 gradient accumulator of the head
    return out


@dataclass
class Setup:
    """The knobs the estimate depends on (and that a suggestion may change)."""

    zero_stage: int
    gpus: int
    seq_len: int
    micro_batch_size: int
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    embeddings: str
    offload_optimizer: bool = False


def estimate(counts: ParamCounts, info: ArchInfo, s: Setup, *, lora_dropout: float, eager: bool,
             counts_by_mode: dict[str, ParamCounts] | None = None) -> tuple[dict[str, int], int, int]:
    """(breakdown, activations without checkpointing, with checkpointing) in bytes per GPU."""
    if counts_by_mode is not None:
        counts = counts_by_mode[s.embeddings]
    n, z = max(s.gpus, 1), s.zero_stage
    # new_tokens keeps the whole base table (frozen) and adds a separate [new, hidden] trainable copy;
    # full trains the table itself.
    trainable = counts.trainable
    frozen = counts.base - (counts.embedding_trainable if s.embeddings == "full" else 0)
    frozen_weights = frozen * BYTES_FROZEN / (n if z >= 3 else 1)
    if z == 0:
        weights, grads, optim = trainable * BYTES_MASTER, trainable * BYTES_MASTER, trainable * BYTES_ADAM
        master_cast = counts.embedding_trainable * BYTES_WEIGHT if s.embeddings == "full" else 0
    else:
        weights = trainable * BYTES_WEIGHT / (n if z >= 3 else 1)
        grads = trainable * BYTES_GRAD / (n if z >= 2 else 1)
        optim = trainable * BYTES_OPTIM / (n if z >= 1 else 1)
        master_cast = 0
    optim = 0 if s.offload_optimizer else optim
    working = 0
    if z >= 3:
        working = max(2 * counts.largest_layer, counts.embedding) * BYTES_FROZEN
    tokens = s.seq_len * s.micro_batch_size
    act_kw = dict(lora_dropout=lora_dropout, eager_attention=eager)
    act_no = activation_bytes(info, tokens, s.seq_len, s.micro_batch_size, checkpointing=False, **act_kw)
    act_ck = activation_bytes(info, tokens, s.seq_len, s.micro_batch_size, checkpointing=True, **act_kw)
    breakdown = {
        "frozen_weights": int(frozen_weights),
        "trainable_weights": int(weights),
        "gradients": int(grads),
        "optimizer_states": int(optim),
        "master_cast": int(master_cast),
        "zero3_gathered": int(working),
        "activations": act_ck if s.gradient_checkpointing else act_no,
        "logits_loss": loss_bytes(info, tokens, s.loss_chunk_tokens, s.embeddings == "full"),
        "reserve": RESERVE_BYTES,
    }
    return breakdown, act_no, act_ck


def plan(cfg: RunConfig, *, gpus: int = 1, gpu_mem_gib: float = 80.0, zero_stage: int = 0, seq_len: int = 2048,
         vocab: int | None = None, base_vocab: int | None = None) -> MemoryPlan:
    """Count the run's parameters and estimate its per-GPU memory; suggest a change when it does not fit."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage must be 0, 1, 2 or 3, found {zero_stage}")
    arch = read_arch_config(cfg.model.name)
    rows = padded_vocab(vocab) if vocab else None
    base_model = build_meta_model(arch, rows)
    by_mode = {}
    info = None
    for mode in ("frozen", "new_tokens", "full"):
        mcfg = replace(cfg, lora=replace(cfg.lora, embeddings=mode))
        try:
            by_mode[mode], info = count_params(mcfg, vocab, base_vocab, model=base_model)
        except ConfigError:
            if mode == cfg.lora.embeddings:
                raise
    counts = by_mode[cfg.lora.embeddings]
    setup = Setup(zero_stage=zero_stage, gpus=gpus, seq_len=seq_len, micro_batch_size=cfg.train.micro_batch_size,
                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                  loss_chunk_tokens=cfg.train.loss_chunk_tokens, embeddings=cfg.lora.embeddings)
    kw = dict(lora_dropout=cfg.lora.dropout, eager=cfg.model.attn_implementation == "eager", counts_by_mode=by_mode)
    breakdown, act_no, act_ck = estimate(counts, info, setup, **kw)
    total = sum(breakdown.values())
    limit = gpu_mem_gib * GIB
    fits = total <= limit
    suggestions = [] if fits else _suggest(counts, info, setup, limit, kw)
    return MemoryPlan(
        model=cfg.model.name, embeddings=cfg.lora.embeddings, vocab=info.vocab_rows, zero_stage=zero_stage, gpus=gpus,
        gpu_mem_gib=gpu_mem_gib, seq_len=seq_len, micro_batch_size=cfg.train.micro_batch_size,
        gradient_checkpointing=cfg.model.gradient_checkpointing, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
        params=counts, breakdown=breakdown, activations_no_checkpointing=act_no,
        activations_checkpointing=act_ck, per_gpu_bytes=total, fits=fits, suggestions=suggestions,
    )


def _suggest(counts, info, setup: Setup, limit: float, kw) -> list[str]:
    """Single changes, cheapest first, that make the estimate fit; else the smallest combination found."""
    candidates: list[tuple[str, dict[str, Any]]] = []
    if setup.loss_chunk_tokens == 0:
        candidates.append(("set train.loss_chunk_tokens=1024 (chunked cross-entropy)", {"loss_chunk_tokens": 1024}))
    if not setup.gradient_checkpointing:
        candidates.append(("set model.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if setup.micro_batch_size > 1:
        mb = setup.micro_batch_size // 2
        candidates.append((f"set train.micro_batch_size={mb} and double train.grad_accum (same batch)",
                           {"micro_batch_size": mb}))
    if setup.embeddings == "full" and "new_tokens" in kw["counts_by_mode"]:
        candidates.append(("set lora.embeddings=new_tokens (train only the added rows)", {"embeddings": "new_tokens"}))
    if setup.gpus > 1 and setup.zero_stage < 3:
        candidates.append((f"use ZeRO-3 (configs/accelerate/zero3.yaml) instead of stage {setup.zero_stage}",
                           {"zero_stage": 3}))
    if setup.zero_stage >= 1:
        candidates.append(("offload optimizer states to CPU (deepspeed offload_optimizer.device=cpu)",
                           {"offload_optimizer": True}))

    def total(changes: dict[str, Any]) -> int:
        return sum(estimate(counts, info, replace(setup, **changes), **kw)[0].values())

    singles = [(text, total(ch)) for text, ch in candidates]
    fitting = [f"{text} -> {t / GIB:.1f} GiB" for text, t in singles if t <= limit]
    if fitting:
        return fitting
    combined: dict[str, Any] = {}
    applied = []
    for text, ch in candidates:
        combined.update(ch)
        applied.append(text)
        t = total(combined)
        if t <= limit:
            return [" and ".join(applied) + f" -> {t / GIB:.1f} GiB"]
    return ["does not fit even with " + " and ".join(applied) + f" ({total(combined) / GIB:.1f} GiB): "
            "use more GPUs or GPUs with more memory"]


def format_plan(p: MemoryPlan) -> str:
    """A human-readable table of one plan."""
    c = p.params
    lines = [
        f"model {p.model}: vocab rows {p.vocab:,}, embeddings {p.embeddings}, ZeRO-{p.zero_stage} on {p.gpus} GPU(s) "
        f"of {p.gpu_mem_gib:g} GiB, micro-batch {p.micro_batch_size} x {p.seq_len} tokens, "
        f"checkpointing {'on' if p.gradient_checkpointing else 'off'}, loss chunk {p.loss_chunk_tokens or 'off'}",
        f"  total params      {c.total:>16,}",
        f"  trainable params  {c.trainable:>16,}  ({100.0 * c.trainable / c.total:.2f}%: LoRA {c.lora:,} in "
        f"{c.lora_modules} modules + embedding {c.embedding_trainable:,})",
        "  per-GPU memory (GiB):",
    ]
    for key, value in p.breakdown.items():
        lines.append(f"    {key:<18}{value / GIB:>9.2f}")
    lines.append(f"    {'total':<18}{p.per_gpu_bytes / GIB:>9.2f}  of {p.gpu_mem_gib:g}  -> "
                 f"{'fits' if p.fits else 'does NOT fit'}")
    lines.append(f"  activations: {p.activations_no_checkpointing / GIB:.2f} GiB without checkpointing, "
                 f"{p.activations_checkpointing / GIB:.2f} GiB with")
    for s in p.suggestions:
        lines.append(f"  to fit: {s}")
    return "\n".join(lines)


def zero_stage_of_accelerate_config(path: str | Path) -> tuple[int, int]:
    """(ZeRO stage, num_processes) named by an accelerate config (stage 0 without DeepSpeed)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    procs = int(data.get("num_processes", 1) or 1)
    if data.get("distributed_type") != "DEEPSPEED":
        return 0, procs
    ds = data.get("deepspeed_config", {}) or {}
    if "zero_stage" in ds:
        return int(ds["zero_stage"]), procs
    ds_file = ds.get("deepspeed_config_file")
    if ds_file:
        p = Path(ds_file)
        if not p.is_absolute():
            from korcpt.assets import ROOT

            p = ROOT / p
        stage = json.loads(p.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
        return int(stage), procs
    return 0, procs


def seq_len_of_shards(cfg: RunConfig, default: int = 2048) -> int:
    """The shard set's sequence length (manifest.json), or ``default`` when the shards are not built."""
    try:
        manifest = json.loads((Path(cfg.data.shards).expanduser() / "manifest.json").read_text(encoding="utf-8"))
        return int(manifest["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


__all__ = [
    "ArchInfo", "MemoryPlan", "ParamCounts", "activation_bytes", "arch_info", "count_params", "estimate",
    "format_plan", "loss_bytes", "plan", "seq_len_of_shards", "zero_stage_of_accelerate_config",
]
