"""The model of a run: loaded (around DeepSpeed's ZeRO-3 init), LoRA and the trainable rows applied,
then prepared by Accelerate into the :class:`~korcpt.train.step.Engine` an optimizer step uses."""

from __future__ import annotations

from korcpt.config import RunConfig
from korcpt.log import get_logger
from korcpt.model.load import load_model_and_tokenizer
from korcpt.model.lora import apply_lora, count_parameters
from korcpt.model.loss import FinalHidden, attach_head_loss
from korcpt.train.distributed import cast_for_deepspeed, fill_deepspeed_buckets
from korcpt.train.step import Engine

log = get_logger(__name__)


def build_model(cfg: RunConfig, accelerator):
    """The run's model and tokenizer (see :func:`korcpt.model.load.load_model_and_tokenizer`).

    A random init is built whole on every rank, outside ZeRO-3's ``zero.Init``: there each partition
    is initialised from another random stream, so the same seed gave another model than one process
    (figures in bench/README.md). DeepSpeed partitions it when the engine starts. A pretrained model
    loads partitioned, and equals the one-process model.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not cfg.model.random_init:
        return load_model_and_tokenizer(cfg.model, accelerator.device, cfg.train.seed)
    # Accelerate's zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 switch on
    # (seen with accelerate 1.15: DeepSpeedPlugin.zero3_init_context_manager in accelerate/utils/
    # dataclasses.py re-registers a config that still says stage 3), so switch it off here.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return load_model_and_tokenizer(cfg.model, accelerator.device, cfg.train.seed)
    finally:
        plugin.set_deepspeed_weakref()


def build_peft_model(model, cfg: RunConfig, new_ids: list[int]):
    """LoRA (and the embedding mode's trainable rows) on ``model``, with gradient checkpointing if asked;
    returns the PEFT model and its (trainable, total) parameter counts."""
    model = apply_lora(model, cfg.lora, new_ids, seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        # non-reentrant: with reentrant checkpointing and no input requiring grad LoRA gets no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable_n, total_n = count_parameters(model)
    log.info("trainable parameters: %s / %s (%.2f%%)", f"{trainable_n:,}", f"{total_n:,}", 100 * trainable_n / total_n)
    return model, (trainable_n, total_n)


def build_engine(accelerator, model, optimizer, scheduler, cfg: RunConfig) -> Engine:
    """``accelerator.prepare`` with what must happen around it: the chunked head loss attached before
    (the DeepSpeed engine hooks the modules it finds), buckets and dtypes set for DeepSpeed, and the
    final-hidden hook registered after (see :class:`korcpt.model.loss.FinalHidden`)."""
    head_loss = attach_head_loss(model, cfg.train.loss_chunk_tokens)
    fill_deepspeed_buckets(accelerator, model)
    cast_for_deepspeed(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    hidden = FinalHidden(model, head_loss) if head_loss is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Engine(accelerator, model, optimizer, scheduler, trainable, hidden)
