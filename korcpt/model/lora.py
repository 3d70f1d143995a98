"""LoRA (rsLoRA) on the language model, plus the trainable embedding rows of ``lora.embeddings``.

Embedding modes:
    frozen      only LoRA trains.
    new_tokens  only the rows of tokens added by vocabulary extension train. They live in a separate
                parameter (:class:`NewTokenRows`) that the input embedding and, since Gemma ties them,
                the output head both read, so original rows stay bit-identical and no [vocab, hidden]
                gradient or optimizer state is ever allocated. PEFT's own ``trainable_token_indices``
                gathers rows on a hard-coded CUDA device under ZeRO-3 and fails on CPU ZeRO-3 (seen
                with peft 0.21: "only CUDA is implemented" in peft/tuners/trainable_tokens/layer.py,
                from huggingface/peft#2605); this module works under every ZeRO stage (the head
                registers the shared parameter with DeepSpeed as an external parameter).
    full        the whole input embedding trains; Gemma's head is the same tensor, so it stays tied and
                is saved once (PEFT ``modules_to_save`` on both would untie them).

Precision: every trainable tensor is stored in float32 whatever ``model.dtype`` is (its master
weight), and cast to the model dtype where it is used, so forward and backward run in the model
dtype. A bfloat16 weight cannot take an AdamW step below half its ulp: at lr 2e-5, 6 steps on the
tiny Gemma 3 moved 30.4% of the embedding entries in bfloat16 against 100% in float32
(``bench/bench_precision.py``). PEFT already keeps LoRA in float32 (``autocast_adapter_dtype``); the
new rows and the full embedding are kept so here. Under DeepSpeed with ``bf16.enabled`` the engine
casts the module to bfloat16 and keeps the float32 masters itself (the casts here are then no-ops);
a ZeRO-3-partitioned weight is left to it.

Saved adapters use PEFT's own format, so ``PeftModel.from_pretrained`` loads them: trained rows are
written as PEFT trainable tokens (``trainable_token_indices``: the new ids, or every id in ``full``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from korcpt.config import LoraConfig
from korcpt.model.load import is_multimodal
from korcpt.model.zero3 import full_numel, is_partitioned, register_external

def language_model_linear_names(model: nn.Module) -> list[str]:
    """Names of every linear projection of the language model (vision tower, projector and head excluded)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or "lm_head" in name.split("."):  # the head, or a Linear inside it
            continue
        if "vision" in name or "multi_modal_projector" in name:
            continue
        names.append(name.rsplit(".", 1)[-1])
    return sorted(set(names))


def target_modules(model: nn.Module, lcfg: LoraConfig) -> list[str] | str:
    """PEFT target_modules: explicit names, or every language-model linear for ``all-linear``."""
    if lcfg.target_modules != "all-linear":
        return list(lcfg.target_modules)
    leaves = "|".join(language_model_linear_names(model))
    if is_multimodal(model):
        return rf".*language_model.*\.({leaves})"
    return rf".*\.({leaves})"


def lora_targets(model: nn.Module, lcfg: LoraConfig) -> list[nn.Linear]:
    """The linears :func:`apply_lora` wraps: PEFT's own matching of :func:`target_modules` (the planner counts these)."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    config = peft.LoraConfig(target_modules=target_modules(model, lcfg))
    return [module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and check_target_module_exists(config, name)]


class NewTokenRows(nn.Module):
    """Input embedding whose rows ``first .. first+n-1`` come from a separate trainable parameter.

    Worked example: base vocabulary 262,144, 300 new tokens -> ``first = 262144``, ``rows`` is
    [300, hidden]; an input id 262150 reads ``rows[6]`` (times Gemma's embedding scale), an id 17 reads
    the frozen base row 17.
    """

    def __init__(self, base: nn.Embedding, first: int, count: int):
        super().__init__()
        self.base = base
        self.first = first
        self.count = count
        self.rows = nn.Parameter(base.weight.detach()[first:first + count].to(torch.float32, copy=True))  # master

    @property
    def weight(self) -> torch.Tensor:  # what get_input_embeddings().weight callers expect
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        is_new = (input_ids >= self.first) & (input_ids < self.first + self.count)
        rows = F.embedding((input_ids - self.first).clamp(0, self.count - 1), self.rows)
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:
            rows = rows * scale.to(rows.dtype)
        return torch.where(is_new.unsqueeze(-1), rows.to(out.dtype), out)


class NewTokenHead(nn.Module):
    """Output head whose logits for ids ``first .. first+count-1`` come from new-token rows: the input rows
    of a :class:`NewTokenRows` (tied, as Gemma ties its head to its embedding), or rows of its own
    (untied: distilled rows, :mod:`korcpt.model.distill`, whose input row is a poor output row)."""

    def __init__(self, base: nn.Module, first: int, count: int, rows_owner: NewTokenRows | None = None,
                 rows: torch.Tensor | None = None):
        super().__init__()
        if (rows_owner is None) == (rows is None):
            raise ValueError("NewTokenHead takes either the input rows' owner (tied) or rows of its own")
        self.base = base
        self.first = first
        self.count = count
        self._owner = [rows_owner] if rows_owner is not None else []  # a list keeps it out of the state dict
        if rows is not None:
            self.rows = nn.Parameter(rows.detach().to(torch.float32, copy=True), requires_grad=False)  # master
            return
        register_external(self, [rows_owner.rows])  # ZeRO-3 fetches a module's own parameters only

    @property
    def tied(self) -> bool:
        return bool(self._owner)

    @property
    def new_rows(self) -> torch.Tensor:
        return self._owner[0].rows if self._owner else self.rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        new = F.linear(hidden, self.new_rows.to(hidden.dtype))
        lo, hi = self.first, self.first + self.count
        return torch.cat([logits[..., :lo], new.to(logits.dtype), logits[..., hi:]], dim=-1)


class CastHead(nn.Module):
    """A tied output head whose (float32 master) weight is cast to the hidden states' dtype at use."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.base.weight.to(hidden.dtype))


def _cast_output(dtype: torch.dtype):
    def hook(module, inputs, output):
        return output.to(dtype)
    return hook


def _train_full_embedding_in_fp32(inner: nn.Module, emb: nn.Embedding) -> None:
    """Store the (tied) embedding in float32 and cast it to the model dtype at both points of use:
    the input lookup's output and the output head's weight."""
    weight = emb.weight
    if weight.dtype == torch.float32 or is_partitioned(weight):  # nothing to do, or DeepSpeed's job
        return
    compute = weight.dtype
    weight.data = weight.data.float()
    emb.register_forward_hook(_cast_output(compute))
    head = inner.get_output_embeddings()
    if isinstance(head, NewTokenHead):  # untied new rows: the shared base part is cast, its own rows as they are
        head.base = CastHead(head.base)
    elif head is not None and head.weight is weight:
        replace_module(inner, module_name(inner, head), CastHead(head))


def replace_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    """Put ``module`` where ``model`` has the submodule named ``dotted``."""
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The dotted name of ``target`` inside ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("module not found in model")


def apply_lora(model: nn.Module, lcfg: LoraConfig, new_token_ids: list[int], seed: int = 0):
    """Wrap ``model`` with PEFT LoRA and make the configured embedding rows trainable.

    Returns:
        The PeftModel; every base weight is frozen except what ``lora.embeddings`` trains.
    """
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, use_rslora=lcfg.use_rslora,
        target_modules=target_modules(model, lcfg), bias="none",
    )
    peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=True)  # LoRA in float32
    inner = peft_model.get_base_model()
    emb = inner.get_input_embeddings()
    head = inner.get_output_embeddings()
    if isinstance(head, NewTokenHead) and lcfg.embeddings != "frozen":  # untied new output rows (model.new_rows)
        head.rows.requires_grad_(True)
    if lcfg.embeddings == "full":
        emb.weight.requires_grad_(True)
        _train_full_embedding_in_fp32(inner, emb)
        # rows past the tokenizer's last id are padding (a multiple of 64): the adapter leaves them out, so
        # it fits the embedding PEFT's AutoPeftModelForCausalLM grows to len(tokenizer)
        emb.korcpt_token_rows = max(new_token_ids) + 1 if new_token_ids else None
    elif lcfg.embeddings == "new_tokens" and new_token_ids:
        first, count = min(new_token_ids), len(new_token_ids)
        if sorted(new_token_ids) != list(range(first, first + count)):
            raise ValueError("new token ids must be contiguous")
        rows = NewTokenRows(emb, first, count)
        replace_module(inner, module_name(inner, emb), rows)
        if head is not None and not isinstance(head, NewTokenHead):
            if head.weight is not emb.weight:
                raise NotImplementedError("new_tokens with an untied output head is not supported yet")
            replace_module(inner, module_name(inner, head), NewTokenHead(head, first, count, rows_owner=rows))
    return peft_model


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable embedding parameters (new rows or the full tied embedding), for their own lr group."""
    out = []
    for module in model.modules():
        if isinstance(module, NewTokenRows):
            out.append(module.rows)
        elif isinstance(module, NewTokenHead) and not module.tied and module.rows.requires_grad:
            out.append(module.rows)
        elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
            out.append(module.weight)
    return out


def trained_rows(model: nn.Module, lcfg: LoraConfig, vocab_size: int) -> tuple[list[int], nn.Parameter | None]:
    """The token ids whose input embedding rows train and the parameter that holds them (for saving)."""
    for module in model.modules():
        if isinstance(module, NewTokenRows):
            return list(range(module.first, module.first + module.count)), module.rows
    if lcfg.embeddings == "full":
        emb = model.get_input_embeddings()
        return list(range(getattr(emb, "korcpt_token_rows", None) or vocab_size)), emb.weight
    return [], None


def untied_head(model: nn.Module) -> NewTokenHead | None:
    """The output head when it holds new-token rows of its own (distilled, untied), else None."""
    head = model.get_output_embeddings()
    return head if isinstance(head, NewTokenHead) and not head.tied else None


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model inside the DDP/DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once; ZeRO-3 aware."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    # NewTokenRows duplicates rows that already exist (frozen) in the base table: do not count them twice.
    for module in model.modules():
        if isinstance(module, NewTokenRows) or (isinstance(module, NewTokenHead) and not module.tied):
            total -= full_numel(module.rows)
    return trainable, total
