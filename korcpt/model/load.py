"""Load the base model and tokenizer of a run: presets, local directories, GGUF files, random init.

Nothing is downloaded when a local path or a local preset is given (``local_files_only``); hub ids
(the MedGemma presets) load from the HuggingFace cache and download only if the user's environment
allows it. Custom code in a model directory runs only with ``model.trust_remote_code: true``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from korcpt.config import ModelConfig
from korcpt.errors import ModelError
from korcpt.log import get_logger
from korcpt import assets
from korcpt.model.embeddings import VOCAB_MULTIPLE, apply_new_rows, padded_vocab, resize_and_init_embeddings

log = get_logger(__name__)


def resolve_dtype(mcfg: ModelConfig, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and float32 elsewhere unless the config names a dtype."""
    if mcfg.dtype != "auto":
        return getattr(torch, mcfg.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_tokenizer(mcfg: ModelConfig):
    """The run's tokenizer: ``model.tokenizer`` if set, else the model's own."""
    name = mcfg.tokenizer or mcfg.name
    if mcfg.random_init and not mcfg.tokenizer:
        raise ModelError("model.random_init needs model.tokenizer (the vocabulary size comes from it)")
    return assets.load_tokenizer(name, trust_remote_code=mcfg.trust_remote_code)


def read_arch_config(name: str) -> dict[str, Any]:
    """The architecture config of ``model.name``: a .json/.yaml file, a directory holding config.json,
    or a preset in configs/models (for random init and the memory planner; nothing is downloaded).

    Raises:
        ModelError: no such file or preset, or the file has no ``model_type``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = assets.ARCH_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in assets.ARCH_DIR.glob("*.json")))
        raise ModelError(f"no architecture config for model.name {name!r}: expected a file, a directory with "
                         f"config.json, or one of {known}")
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelError(f"{path}: an architecture config needs a 'model_type' key")
    return data


def arch_config(arch: dict[str, Any], vocab_rows: int | None = None):
    """The transformers config of ``arch``, its text model's vocabulary set to ``vocab_rows`` when given."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**arch)
    if vocab_rows is not None:
        config.get_text_config().vocab_size = vocab_rows
    return config


def model_from_arch(arch: dict[str, Any], vocab_rows: int | None, dtype: torch.dtype,
                    attn_implementation: str | None = None):
    """A freshly initialised model of ``arch`` on the current default device (see :func:`arch_config`)."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    config = arch_config(arch, vocab_rows)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if config.model_type == "gemma3":  # multimodal: no Auto*ForCausalLM builds it
        return Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_meta_model(arch: dict[str, Any], vocab_rows: int | None = None, dtype: torch.dtype = torch.bfloat16):
    """The architecture on the meta device (no memory), its embedding sized to ``vocab_rows``."""
    with torch.device("meta"):
        return model_from_arch(arch, vocab_rows, dtype)


def build_random_model(mcfg: ModelConfig, vocab_size: int, dtype: torch.dtype, seed: int):
    """A randomly initialised model from an architecture config, its vocabulary sized for the tokenizer."""
    arch = read_arch_config(mcfg.name)
    torch.manual_seed(seed)
    return model_from_arch(arch, padded_vocab(vocab_size), dtype, mcfg.attn_implementation)


def load_pretrained(mcfg: ModelConfig, dtype: torch.dtype):
    """A pretrained model from a preset, a local directory, a GGUF file or a (cached) hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForConditionalGeneration

    source = assets.resolve(mcfg.name)
    kwargs = dict(dtype=dtype, attn_implementation=mcfg.attn_implementation, trust_remote_code=mcfg.trust_remote_code)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file not found: {path}")
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    local = path.is_dir()
    if not local and (source.startswith((".", "/", "~")) or path.suffix):
        raise ModelError(f"model.name: {mcfg.name!r} is neither a preset, a directory nor a hub id")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local, trust_remote_code=mcfg.trust_remote_code)
        cls = Gemma3ForConditionalGeneration if config.model_type == "gemma3" else AutoModelForCausalLM
        return cls.from_pretrained(source, local_files_only=local, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {mcfg.name!r} ({source}): {str(exc).splitlines()[0]}") from None


def is_multimodal(model) -> bool:
    """Gemma3ForConditionalGeneration (MedGemma 4B): trains text-only and wants token_type_ids."""
    return getattr(model.config, "model_type", "") == "gemma3"


def vocab_size_of(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def load_model_and_tokenizer(mcfg: ModelConfig, device: torch.device, seed: int = 0):
    """The run's model (resized and initialised for an extended tokenizer) and tokenizer.

    Returns:
        (model, tokenizer, new_token_ids): ``new_token_ids`` are the rows added for tokens the base
        model did not have (empty when the tokenizer is the model's own or the model is random).
    """
    tokenizer = run_tokenizer(mcfg)
    dtype = resolve_dtype(mcfg, device)
    if mcfg.random_init:
        return build_random_model(mcfg, len(tokenizer), dtype, seed), tokenizer, []
    model = load_pretrained(mcfg, dtype)
    base_vocab = vocab_size_of(model)
    if len(tokenizer) <= base_vocab:
        return model, tokenizer, []
    base_tokenizer = assets.load_tokenizer(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    new_ids = resize_and_init_embeddings(model, base_tokenizer, tokenizer, pad_to_multiple_of=VOCAB_MULTIPLE)
    if mcfg.new_rows:
        apply_new_rows(model, mcfg.new_rows, list(new_ids))
    log.info("extended vocabulary %d -> %d rows (%d new tokens)", base_vocab, vocab_size_of(model), len(new_ids))
    return model, tokenizer, list(new_ids)
