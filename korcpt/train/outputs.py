"""The run's outputs in the layout of train_raw_korean_text.md ("Output"): adapter (PEFT format),
tokenizer/, training_info.json.

Under DeepSpeed ZeRO-3 every parameter is partitioned across ranks; saving without gathering is how
public reports end up with empty or zero-shaped adapters. Only the trainable parameters are gathered
(never the frozen base), one at a time, and rank 0 writes them.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from korcpt import assets
from korcpt.config import ModelConfig, RunConfig
from korcpt.files import atomic_path, atomic_write_json
from korcpt.model.lora import module_name, trained_rows, untied_head
from korcpt.model.zero3 import full_shape, gathered, is_partitioned
from korcpt.train.metrics import mfu, versions


def gathered_trainable_state(model) -> dict[str, torch.Tensor]:
    """name -> full float32 CPU tensor of every trainable parameter of the unwrapped ``model``: the
    trained value itself, i.e. DeepSpeed's float32 master where it keeps one (gathered from ZeRO-3
    partitions), not the bfloat16 copy the forward uses."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            out[name] = _master_value(param).detach().float().cpu().clone()
    return out


def _master_value(param: torch.nn.Parameter) -> torch.Tensor:
    if not (is_partitioned(param) or hasattr(param, "_hp_mapping")):
        return param  # no DeepSpeed: the parameter is its own float32 master (korcpt.model.lora)
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)  # collective under ZeRO-3: every rank calls it
    if master is not None:
        return master
    if not is_partitioned(param):
        return param
    with gathered([param], modifier_rank=None):  # no optimizer (yet)
        return param.detach().clone()


def _param_name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def adapter_state(unwrapped, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """PEFT adapter tensors (LoRA, plus trained embedding rows as PEFT trainable tokens), the input rows'
    ids and the untied output rows' ids, from the PEFT model outside its DDP/DeepSpeed wrapper (every
    rank calls this under ZeRO-3).

    Untied output rows (``model.new_rows``) are PEFT trainable tokens of the head, their ids in
    descending order: PEFT ties the head's trainable tokens to the embedding's when a tied model lists
    the same indices for both (``indices_mismatch`` in peft/utils/other.py, 0.21), and this order is
    what keeps them apart when ``AutoPeftModelForCausalLM`` loads the adapter onto the tied base.
    """
    from peft import get_peft_model_state_dict

    full = gathered_trainable_state(unwrapped)
    lora = {k: v for k, v in full.items() if "lora_" in k}
    state = get_peft_model_state_dict(unwrapped, state_dict=lora, save_embedding_layers=False)  # rows: below
    base = unwrapped.get_base_model()
    vocab = full_shape(base.get_input_embeddings().weight)[0]
    ids, rows = trained_rows(base, cfg.lora, vocab)
    if ids:
        rows = full[_param_name(unwrapped, rows)][:len(ids)]
        path = module_name(base, base.get_input_embeddings())
        state[f"base_model.model.{path}.token_adapter.trainable_tokens_delta"] = rows.contiguous()
    head = untied_head(base)
    out_ids: list[int] = []
    if head is not None:
        out_ids = list(range(head.first + head.count - 1, head.first - 1, -1))
        rows = full[_param_name(unwrapped, head.rows)].flip(0)
        state[f"base_model.model.{module_name(base, head)}.token_adapter.trainable_tokens_delta"] = rows.contiguous()
    return state, ids, out_ids


def base_model_reference(mcfg: ModelConfig) -> str:
    """What adapter_config.json names as ``base_model_name_or_path``: something PEFT's
    ``AutoPeftModelForCausalLM.from_pretrained`` can load without korcpt.

    A preset becomes the directory korcpt converted/cached it into (or its hub id), a local directory
    its absolute path (a relative one would only resolve from the run's working directory), a hub id
    stays as given. There is no loadable base for a GGUF file (transformers wants ``gguf_file=``) or a
    random-init run (an architecture file, random weights): their absolute path is written as a record
    of what the base was, and such an adapter loads only onto a base built by hand (PeftModel).
    """
    if mcfg.random_init:  # never the preset a name may also mean: these weights were random
        path = Path(mcfg.name).expanduser()
        path = path if path.exists() else assets.ARCH_DIR / f"{mcfg.name}.json"
        return str(path.resolve()) if path.exists() else mcfg.name
    source = assets.resolve(mcfg.name)
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def save_adapter(accelerator, model, cfg: RunConfig, out_dir: Path) -> None:
    """Write adapter_model.safetensors and adapter_config.json loadable by PeftModel.from_pretrained."""
    import copy

    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(model)
    state, ids, out_ids = adapter_state(unwrapped, cfg)
    if not accelerator.is_main_process:
        return
    config = copy.deepcopy(unwrapped.peft_config["default"])
    if ids:
        config.trainable_token_indices = {"embed_tokens": ids}
    if out_ids:
        config.trainable_token_indices["lm_head"] = out_ids
    config.base_model_name_or_path = base_model_reference(cfg.model)  # not a preset alias: PEFT cannot resolve one
    out_dir.mkdir(parents=True, exist_ok=True)
    # korcpt's LoRA config has no task type, so AutoPeftModel* builds the base from auto_mapping, which
    # PEFT's own save_pretrained writes in that case: the base's transformers class.
    base_cls = type(unwrapped.get_base_model())
    auto_mapping = None if config.task_type else {"base_model_class": base_cls.__name__,
                                                  "parent_library": base_cls.__module__}
    config.save_pretrained(str(out_dir), auto_mapping_dict=auto_mapping)
    # written beside and renamed: a run killed mid-write never leaves a truncated adapter behind
    with atomic_path(out_dir / "adapter_model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def save_outputs(accelerator, model, tokenizer, cfg: RunConfig, info: dict, adapter_from: Path | None = None) -> None:
    """Adapter, tokenizer/ and training_info.json into output.dir (all ranks call; rank 0 writes). The
    adapter is ``model``'s, or the one kept in ``adapter_from`` (``checkpoints/best``), copied."""
    out_dir = Path(cfg.output.dir)
    if adapter_from is None:
        save_adapter(accelerator, model, cfg, out_dir)
    elif accelerator.is_main_process:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with atomic_path(out_dir / name) as tmp:  # copied beside and renamed, as save_adapter writes
                shutil.copyfile(adapter_from / name, tmp)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        # beside the adapter too: PEFT's AutoPeftModelForCausalLM grows the base's embedding for an
        # extended vocabulary only when it finds a tokenizer in the adapter directory (peft/auto.py)
        tokenizer.save_pretrained(str(out_dir))
        atomic_write_json(out_dir / "training_info.json", info)
    accelerator.wait_for_everyone()


def training_info(cfg: RunConfig, state, last: dict, best_record: dict | None, record, counts: tuple[int, int],
                  new_tokens: int, workarounds: list[str]) -> dict:
    """The run record of ``training_info.json``: figures at the baseline, of the saved adapter
    (``*_final``: the best evaluation's when ``best_record`` says the kept best adapter is saved, else
    the last step's ``last``), of the last step and the best, the evaluation history and per-step
    losses (read back from ``metrics.jsonl``), throughput, versions and the upstream workarounds."""
    trainable_n, total_n = counts
    base = state.baseline
    final = best_record["result"] if best_record else last
    best = state.best_val_loss
    history = record.history()
    tokens_per_sec = state.tokens_seen / state.train_seconds if state.train_seconds else 0.0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = tokens_per_sec / record.world
    return {
        "config": cfg.to_dict(),
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_sec": tokens_per_sec,
        "trainable_params": trainable_n,
        "total_params": total_n,
        "trainable_percent": 100.0 * trainable_n / total_n,
        "val_loss_baseline": base.get("val_loss"),
        "val_loss_final": final.get("val_loss"),
        "val_loss_best": best,
        "val_ppl_baseline": base.get("val_ppl"),
        "val_ppl_final": final.get("val_ppl"),
        "val_ppl_best": math.exp(best) if best is not None else None,
        "val_bpc_baseline": base.get("val_bpc"),
        "val_bpc_final": final.get("val_bpc"),
        "val_bpc_best": min((h["val_bpc"] for h in history if h.get("val_bpc") is not None), default=None),
        "heldout_bpc_baseline": base.get("heldout_bpc"),
        "heldout_bpc_final": final.get("heldout_bpc"),
        "mcq_accuracy_baseline": base.get("mcq_accuracy"),
        "mcq_accuracy_final": final.get("mcq_accuracy"),
        "adapter": cfg.output.adapter,
        "adapter_step": best_record["step"] if best_record else state.step,
        "best_step": state.best_step,
        "val_loss_last": last.get("val_loss"),
        "val_ppl_last": last.get("val_ppl"),
        "mcq_accuracy_last": last.get("mcq_accuracy"),
        "history": history,
        "losses": record.losses(),
        "bad_steps": state.bad_steps_total,
        "stop_reason": state.stop_reason or ("max_steps" if cfg.train.max_steps else "epochs"),
        "world_size": world,
        "versions": versions(),
        "workarounds": workarounds,
        "new_tokens": new_tokens,
        "flops_per_token": record.flops_per_token,
        "tokens_per_sec_per_device": per_device,
        "processed_tokens_per_sec_per_device": record.processed_per_device(state),
        "peak_tflops": record.peak,
        "mfu": mfu(record.processed_per_device(state), record.flops_per_token, record.peak),
    }
