"""The training loop: Accelerate (+ DeepSpeed ZeRO) over packed shards, LoRA plus embedding rows.

Two clocks: a *micro-step* is one forward/backward of ``micro_batch_size`` sequences on each rank; an
*optimizer step* is ``grad_accum`` micro-steps. The loss of an optimizer step is the mean over every
target token of its micro-batches on every rank (token-weighted, not a mean of per-batch means): each
micro-batch contributes ``sum(token NLL) / N`` where ``N`` counts the step's target tokens on all ranks.

    train(cfg)
      build_accelerator -> load model/tokenizer -> open shards -> LoRA -> optimizer/schedule -> prepare
      resume (optional) -> baseline evaluation
      for each optimizer step: train_step -> log -> maybe evaluate / early-stop -> maybe save
      final evaluation -> save adapter, tokenizer, training_info.json
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from korcpt.config import RunConfig, config_json, save_config
from korcpt.errors import TrainingError
from korcpt.log import get_logger, progress
from korcpt.model.load import is_multimodal, load_model_and_tokenizer, resolve_dtype
from korcpt.model.lora import NewTokenHead, apply_lora, count_parameters, embedding_parameters, unwrap_base
from korcpt.train import checkpoint as ckpt
from korcpt.train.loss import causal_lm_loss
from korcpt.train.metrics import Metrics, mfu, model_flops_per_token, peak_tflops, versions
from korcpt.train.outputs import save_outputs

log = get_logger(__name__)


# ---------------------------------------------------------------- construction


def visible_devices_for(device: str, env: dict) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` that makes ``model.device: cuda:N`` the one GPU of this process.

    ``N`` counts the GPUs this process can see, as torch numbers them: with ``CUDA_VISIBLE_DEVICES=2,3``
    already set (SLURM does), ``cuda:1`` is physical GPU 3. Returns None for any other device. Under a
    multi-process launcher (accelerate launch, torchrun, srun) each rank's GPU is the launcher's
    choice (``LOCAL_RANK``), so ``cuda:N`` is refused there rather than ignored.
    """
    if not device.startswith("cuda:"):
        return None
    index = int(device.split(":", 1)[1])
    if int(env.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError(f"model.device {device} picks the GPU of a single process, but this is rank "
                            f"{env.get('RANK', '?')} of {env['WORLD_SIZE']}: the launcher assigns each rank its GPU "
                            "(LOCAL_RANK); drop --device, or narrow CUDA_VISIBLE_DEVICES for the whole launch")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or None
    if visible is None:
        return str(index)
    if index >= len(visible):
        raise TrainingError(f"model.device {device}: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
                            f"shows {len(visible)} GPU(s), numbered from cuda:0")
    return visible[index].strip()


def _select_cuda_device(device: str) -> None:
    visible = visible_devices_for(device, dict(os.environ))
    if visible is not None:
        if torch.cuda.is_initialized() and os.environ.get("CUDA_VISIBLE_DEVICES") != visible:
            raise TrainingError(f"model.device {device}: CUDA is already initialised in this process; "
                                f"set CUDA_VISIBLE_DEVICES={visible} before it starts instead")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # read when CUDA initialises: that GPU is then "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"model.device {device}: no CUDA device is available here")


def build_accelerator(cfg: RunConfig):
    """An Accelerator whose DeepSpeed settings that depend on the run come from the run config."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    _select_cuda_device(cfg.model.device)
    # Without a GPU, DDP needs cpu=True to use gloo; DeepSpeed must not get it (it would be dropped).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kwargs = {"cpu": True} if cfg.model.device == "cpu" or (not torch.cuda.is_available() and not deepspeed) else {}
    if deepspeed:  # DeepSpeed's bf16 mode (bf16 weights, float32 masters in its optimizer) follows model.dtype
        kwargs["mixed_precision"] = deepspeed_precision(cfg)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        # the schedule counts optimizer steps; by default Accelerate would step it once per process
        step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=cfg.output.dir, automatic_checkpoint_naming=False),
        **kwargs,
    )
    _record_cpu_deepspeed_ranks(accelerator)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # one source of truth: batch, accumulation and clipping come from the run config
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
        ds["gradient_clipping"] = cfg.train.grad_clip
        for key in ("bf16", "fp16"):
            found, wanted = _ds_enabled(ds, key), kwargs.get("mixed_precision") == key
            if found != wanted:
                raise TrainingError(f"the DeepSpeed config sets {key}.enabled={found} but model.dtype "
                                    f"{cfg.model.dtype!r} needs {wanted}: set it to \"auto\" (derived from model.dtype)")
    return accelerator


def fill_deepspeed_buckets(accelerator, model) -> None:
    """Resolve the ZeRO bucket sizes left "auto" from the language model's hidden size, with
    Accelerate's own formulas. Accelerate reads ``model.config.hidden_size``, which a multimodal
    config (MedGemma 4B's Gemma3Config) does not have: prepare() then fails on the shipped configs."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    hidden = unwrap_base(model).config.get_text_config().hidden_size
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def cast_for_deepspeed(accelerator, model) -> None:
    """Under DeepSpeed's bf16 mode, give the parameters created after ``zero.Init`` (LoRA, new rows:
    float32 masters in :mod:`korcpt.model.lora`) the bfloat16 dtype of the partitioned ones. The
    engine keeps the float32 masters itself, and casts a model that was not partitioned at load the
    same way; a partitioned one it leaves as it is, and ZeRO-3 then fails on mixed dtypes
    (``assert len(set(t.dtype for t in tensors)) == 1`` in ``defragment``)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not _ds_enabled(plugin.deepspeed_config, "bf16"):
        return
    for param in model.parameters():
        if param.is_floating_point() and not hasattr(param, "ds_id"):
            param.data = param.data.to(torch.bfloat16)


def _ds_enabled(ds: dict, key: str) -> bool:
    """Whether a DeepSpeed config turns ``bf16`` or ``fp16`` on (True, "true" or "True")."""
    return str(ds.get(key, {}).get("enabled", False)).lower() == "true"


def deepspeed_precision(cfg: RunConfig) -> str:
    """Accelerate's mixed_precision for a DeepSpeed run: its bf16 (or fp16) mode when the model trains in it."""
    dtype = resolve_dtype(cfg.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def _record_cpu_deepspeed_ranks(accelerator) -> None:
    """Make Accelerate's rank bookkeeping match DeepSpeed's process group on CPU.

    Accelerate 1.x lets DeepSpeed initialise a gloo process group when there is no GPU but, finding no
    device backend, records one process of rank 0 in every process: every rank then believes it is
    the main one (all write the same files) and would read the same data. Measured here with
    `accelerate launch --config_file configs/accelerate/cpu_zero3.yaml`: both processes reported
    process_index 0 and num_processes 1 while torch.distributed had world size 2.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if accelerator.state.deepspeed_plugin is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if not dist.is_initialized():  # ZeRO-1/2 on CPU: Accelerate left it to deepspeed.initialize
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    if accelerator.num_processes == dist.get_world_size():
        return
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["num_processes"] = dist.get_world_size()
        shared["process_index"] = dist.get_rank()
        shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def build_model(cfg: RunConfig, accelerator):
    """The run's model and tokenizer (see :func:`korcpt.model.load.load_model_and_tokenizer`).

    A random init is built whole on every rank, outside ZeRO-3's ``zero.Init``: there each partition
    is initialised from another random stream, so the same seed gave another model than one process
    (baseline validation loss 7.633 against 7.615 on the same sequences). DeepSpeed partitions it when
    the engine starts. A pretrained model loads partitioned, and equals the one-process model.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not cfg.model.random_init:
        return load_model_and_tokenizer(cfg.model, accelerator.device, cfg.train.seed)
    # Accelerate's zero3_init_context_manager(enable=False) leaves transformers' ZeRO-3 switch on
    # (accelerate 1.15: the config it re-registers still says stage 3), so switch it off here.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return load_model_and_tokenizer(cfg.model, accelerator.device, cfg.train.seed)
    finally:
        plugin.set_deepspeed_weakref()


def build_optimizer(model, cfg: RunConfig, total_steps: int):
    """AdamW with its own learning rate for embedding rows; warmup then cosine decay to min_lr_ratio."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    emb = {id(p) for p in embedding_parameters(model)}
    lora = [p for p in model.parameters() if p.requires_grad and id(p) not in emb]
    groups = [{"params": lora, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}]
    if emb:
        groups.append({"params": [p for p in model.parameters() if id(p) in emb],
                       "lr": cfg.lora.embedding_lr or cfg.train.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total_steps)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1), min_lr_rate=cfg.train.min_lr_ratio
    )
    return optimizer, scheduler


def open_data(cfg: RunConfig, tokenizer, accelerator):
    """Train and validation shard sets, checked against the run's tokenizer."""
    from korcpt.shards.reader import open_shards
    from korcpt.shards.format import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    train_set = open_shards(cfg.data.shards, "train", tokenizer_fingerprint=fingerprint,
                            verify=cfg.data.verify_checksums)
    val_set = None
    if any(s["split"] == "val" for s in train_set.manifest["shards"]):
        val_set = open_shards(cfg.data.shards, "val", tokenizer_fingerprint=fingerprint, verify=cfg.data.verify_checksums)
    return train_set, val_set


def plan_steps(cfg: RunConfig, sequences_per_epoch: int, world: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or whole steps over ``epochs`` epochs (a last partial
    step is dropped). Worked example: 1,000 sequences, 2 ranks, micro-batch 2, accumulation 4 -> each
    rank sees 500 per epoch = 250 micro-steps = 62 optimizer steps (62.5, the half step dropped)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_rank = sequences_per_epoch // world
    micro_steps = math.ceil(per_rank / cfg.train.micro_batch_size)
    return (micro_steps * cfg.train.epochs) // cfg.train.grad_accum


# ---------------------------------------------------------------- data


class MicroBatches:
    """Endless micro-batches of this rank across epochs; ``state`` says where the stream stands."""

    def __init__(self, stream, cfg: RunConfig, state: ckpt.TrainerState, world: int):
        self.stream, self.cfg, self.state, self.world = stream, cfg, state, world

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        while True:
            self.stream.load_state_dict({"seed": self.cfg.train.seed, "epoch": self.state.epoch,
                                         "consumed": self.state.consumed,
                                         "num_sequences": self.stream.shards.num_sequences})
            loader = DataLoader(self.stream, batch_size=self.cfg.train.micro_batch_size,
                                num_workers=self.cfg.data.num_workers)
            for batch in loader:
                self.state.consumed += len(batch["sample_id"]) * self.world
                yield batch
            self.state.epoch += 1
            self.state.consumed = 0


def model_inputs(model, batch: dict, cfg: RunConfig, device) -> dict:
    """Forward kwargs: ids, and per-document positions/masks when packing is document-masked;
    ``token_type_ids`` (zeros: text) for Gemma3ForConditionalGeneration."""
    ids = batch["input_ids"].to(device)
    kwargs = {"input_ids": ids, "use_cache": False}
    base = getattr(model, "module", model)  # DDP and DeepSpeed wrap the model
    if cfg.data.document_mask:
        from korcpt.model.packing import document_mask_kwargs

        kwargs.update(document_mask_kwargs(base, batch["position_ids"].to(device)))
    if is_multimodal(base):
        kwargs["token_type_ids"] = torch.zeros_like(ids)
    return kwargs


class HeadLoss(torch.nn.Module):
    """The chunked head loss (``train.loss_chunk_tokens``) as a module of the model.

    It reads the output head outside the head's own forward. DeepSpeed ZeRO-3 gathers a partitioned
    parameter only around the forward and backward of a module that owns or declares it, so the head
    weight (and the new-token rows) are declared to this module as external parameters, and the module
    is attached to the model before ``accelerator.prepare`` (:func:`attach_head_loss`) so that the
    engine hooks it like any layer.
    """

    def __init__(self, base, chunk_tokens: int):
        super().__init__()
        self._base = [base]  # a list keeps the model out of this module's children
        self.chunk_tokens = chunk_tokens
        self.softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        head = base.get_output_embeddings()
        params = [head.base.weight, head._owner[0].rows] if isinstance(head, NewTokenHead) else [head.weight]
        try:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        except ImportError:  # no DeepSpeed, no partitioning: nothing to declare
            return
        for param in params:
            register_external_parameter(self, param)

    def head_weight(self) -> torch.Tensor:
        """The output head as one [vocab, hidden] matrix (new-token rows spliced in when they train apart)."""
        head = self._base[0].get_output_embeddings()
        if isinstance(head, NewTokenHead):
            rows = head._owner[0]
            weight = head.base.weight
            return torch.cat([weight[:rows.first], rows.rows.to(weight.dtype), weight[rows.first + rows.count:]])
        return head.weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a float32 master (the full embedding) is used in the model dtype, as the head does
        return causal_lm_loss(hidden, self.head_weight().to(hidden.dtype), labels, chunk_tokens=self.chunk_tokens,
                              final_logit_softcapping=self.softcap)


class FinalHidden:
    """Catches the final hidden states (the output of the decoder's last norm) during a forward, so the
    loss can run over the output head in chunks (:class:`HeadLoss`) while the model itself computes
    logits for one position only (``logits_to_keep=1``).

    Build it after ``accelerator.prepare``: under ZeRO-3 the norm's output must be caught after the
    engine's own forward hook has wrapped it, or the norm's backward runs without its gathered weight.
    """

    def __init__(self, model, loss: HeadLoss):
        self.loss = loss
        self.value = None
        self.handle = unwrap_base(model).get_decoder().norm.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output

    def nll_sum(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value, self.value = self.value, None
        return self.loss(value, labels)


def nll_sum(model, batch: dict, cfg: RunConfig, device, hidden: FinalHidden | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token NLL (float32) and number of target tokens of one micro-batch."""
    labels = batch["labels"].to(device)
    inputs = model_inputs(model, batch, cfg, device)
    if hidden is not None:
        model(**inputs, logits_to_keep=1)
        return hidden.nll_sum(labels)
    logits = model(**inputs).logits
    return causal_lm_loss_from_logits(logits, labels, labels.numel())


def causal_lm_loss_from_logits(logits, labels, chunk):
    """Cross-entropy over logits in chunks of ``chunk`` tokens, upcasting one chunk at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk):
        total = total + torch.nn.functional.cross_entropy(
            flat[start:start + chunk].float(), flat_labels[start:start + chunk], ignore_index=-100, reduction="sum"
        )
    return total, (labels != -100).sum()


# ---------------------------------------------------------------- one optimizer step


def train_step(model, optimizer, scheduler, accelerator, batches: Iterator[dict], cfg: RunConfig,
               state: ckpt.TrainerState, trainable: list, hidden: FinalHidden | None = None) -> dict:
    """Accumulate ``grad_accum`` micro-batches and take one optimizer step (or skip it if non-finite).

    The host waits for the device once per optimizer step, to learn whether the step is finite: the
    token count, the loss and the finite flag stay on the device until then (tests/test_train.py
    counts the synchronising ops).
    """
    micro = [next(batches) for _ in range(cfg.train.grad_accum)]
    device = accelerator.device
    local_tokens = torch.stack([(b["labels"] != -100).sum() for b in micro]).sum()  # on the host: no sync
    tokens = accelerator.reduce(local_tokens.to(device), "sum")
    # backward() divides by grad_accum and DDP/DeepSpeed average over ranks: undo both so the gradient
    # is that of sum(NLL over the step's tokens on all ranks) / tokens.
    scale = cfg.train.grad_accum * accelerator.num_processes / tokens.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.float32, device=device)
    for batch in micro:
        with accelerator.accumulate(model):
            nll, _ = nll_sum(model, batch, cfg, device, hidden)
            finite = finite * torch.isfinite(nll)
            accelerator.backward(nll * scale)
            loss_sum += nll.detach().double()
            state.micro_step += 1
    loss_sum = accelerator.reduce(loss_sum, "sum")
    finite = accelerator.reduce(finite, "min")
    # the norm is computed even without clipping (max_norm inf): a non-finite gradient skips the step
    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.grad_clip or float("inf"))
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips inside its engine
        grad_norm = model.get_global_grad_norm()
    norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64, device=device)
    loss_total, token_count, all_finite, norm = torch.stack(  # the step's one host sync
        [loss_sum, tokens.double(), finite.double(), norm.double()]).tolist()
    grad_norm = None if grad_norm is None else norm
    ok = bool(all_finite) and math.isfinite(loss_total) and (grad_norm is None or math.isfinite(grad_norm))
    if ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(token_count)
    return {"loss": loss_total / max(tokens, 1), "tokens": tokens, "grad_norm": grad_norm, "finite": ok,
            "sample_ids": [i for b in micro for i in b["sample_id"].tolist()]}


# ---------------------------------------------------------------- evaluation hooks


def evaluate(model, tokenizer, val_set, mcq, cfg: RunConfig, accelerator, with_mcq: bool) -> dict:
    """Validation loss/perplexity (token-weighted over all ranks) and, if asked, KorMedMCQA accuracy."""
    from korcpt.eval.perplexity import evaluate_perplexity
    from korcpt.shards.reader import SequenceStream

    result: dict = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if val_set is not None:
            stream = SequenceStream(val_set, seed=0, rank=accelerator.process_index,
                                    world_size=accelerator.num_processes, shuffle=False,
                                    limit=cfg.eval.max_val_sequences)
            stream.load_state_dict({"seed": 0, "epoch": 0, "consumed": 0, "num_sequences": val_set.num_sequences})
            loader = torch.utils.data.DataLoader(stream, batch_size=cfg.eval.batch_size)
            batches = (val_batch(model, b, val_set, cfg, accelerator.device) for b in loader)
            ppl = evaluate_perplexity(model, batches, reduce=lambda t: accelerator.reduce(t, "sum"),
                                      source_names=val_set.sources or None)
            for name, part in ppl.get("by_source", {}).items():
                result[f"val_loss_{name}"] = part["loss"]
            result.update(val_loss=ppl["loss"], val_ppl=ppl["ppl"], val_tokens=ppl["tokens"])
        if with_mcq and mcq is not None:
            from accelerate.utils import gather_object

            from korcpt.eval.mcq import score_mcq

            items, fewshot, skipped = mcq
            scored = score_mcq(model, tokenizer, items, mode=cfg.eval.mcq_mode, fewshot=fewshot,
                               shots=cfg.eval.mcq_shots, batch_size=cfg.eval.batch_size,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               gather=gather_object, skipped=skipped)
            result.update(mcq_accuracy=scored["accuracy"], mcq_n=scored["n"], mcq_skipped=scored["n_skipped"],
                          mcq_ci95=scored["ci95"], mcq_by_group=scored["by_group"])
    if was_training:
        model.train()
    return result


def attach_head_loss(model, cfg: RunConfig) -> HeadLoss | None:
    """The chunked head loss when ``train.loss_chunk_tokens`` asks for it, attached to the model as a
    module (it holds no parameters, so state dicts are unchanged). Call before ``accelerator.prepare``:
    the DeepSpeed engine hooks the modules it finds there."""
    if not cfg.train.loss_chunk_tokens:
        return None
    base = unwrap_base(model)
    loss = HeadLoss(base, cfg.train.loss_chunk_tokens)
    base.add_module("korcpt_head_loss", loss)
    return loss


def val_batch(model, batch: dict, val_set, cfg: RunConfig, device) -> dict:
    """A validation batch with model inputs, labels and, for per-source losses, each target's source."""
    sources = torch.stack([torch.from_numpy(val_set.source_ids(int(i))[1:].astype("int64"))
                           for i in batch["sample_id"]])
    # only what the training forward gets: restarting position_ids alone would make transformers
    # mask attention per document during validation but not during training
    return {**model_inputs(model, batch, cfg, device), "labels": batch["labels"].to(device),
            "token_source": sources.to(device)}


def load_mcq_for_run(cfg: RunConfig):
    if not cfg.eval.mcq_file:
        return None
    from korcpt.eval.mcq import load_mcq

    items, skipped = load_mcq(cfg.eval.mcq_file)
    for message in skipped[:5]:
        log.warning("MCQ item skipped: %s", message)
    if cfg.eval.mcq_max_questions:
        items = items[: cfg.eval.mcq_max_questions]
    fewshot = load_mcq(cfg.eval.mcq_fewshot_file)[0] if cfg.eval.mcq_fewshot_file else None
    return items, fewshot, skipped


def early_stop_reason(state: ckpt.TrainerState, result: dict, cfg: RunConfig) -> str | None:
    """Update the best validation loss and say why to stop, if it is time to."""
    loss = result.get("val_loss")
    if loss is None:
        return None
    if state.best_val_loss is None or loss < state.best_val_loss - cfg.eval.min_delta:
        state.best_val_loss = loss if state.best_val_loss is None else min(loss, state.best_val_loss)
        state.evals_without_improvement = 0
    else:
        state.best_val_loss = min(loss, state.best_val_loss)
        state.evals_without_improvement += 1
    if cfg.eval.target_ppl and result["val_ppl"] <= cfg.eval.target_ppl:
        return f"target_ppl: validation perplexity {result['val_ppl']:.3f} <= {cfg.eval.target_ppl}"
    if cfg.eval.patience and state.evals_without_improvement >= cfg.eval.patience:
        return (f"early_stopping: validation loss did not improve by {cfg.eval.min_delta} "
                f"for {cfg.eval.patience} evaluations")
    return None


# ---------------------------------------------------------------- the run


def train(cfg: RunConfig, resume: str = "") -> dict:
    """Run continued pretraining as ``cfg`` describes; returns the training_info record."""
    from accelerate.utils import set_seed

    from korcpt.shards.reader import SequenceStream

    out_dir = Path(cfg.output.dir)
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    model, tokenizer, new_ids = build_model(cfg, accelerator)
    train_set, val_set = open_data(cfg, tokenizer, accelerator)
    model = apply_lora(model, cfg.lora, new_ids, seed=cfg.train.seed)
    if cfg.model.gradient_checkpointing:
        # non-reentrant: with reentrant checkpointing and no input requiring grad LoRA gets no gradient
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    trainable_n, total_n = count_parameters(model)
    log.info("trainable parameters: %s / %s (%.2f%%)", f"{trainable_n:,}", f"{total_n:,}", 100 * trainable_n / total_n)

    stream = SequenceStream(train_set, seed=cfg.train.seed, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, shuffle=True, limit=cfg.train.max_samples,
                            batch_size=cfg.train.micro_batch_size)
    per_epoch = min(train_set.num_sequences, cfg.train.max_samples or train_set.num_sequences)
    total_steps = plan_steps(cfg, per_epoch, accelerator.num_processes)
    if total_steps < 1:
        raise TrainingError(
            f"no optimizer step fits: {per_epoch} training sequences over {accelerator.num_processes} process(es) "
            f"with micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum}; "
            "lower train.grad_accum or set train.max_steps"
        )
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    head_loss = attach_head_loss(model, cfg)
    fill_deepspeed_buckets(accelerator, model)
    cast_for_deepspeed(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    hidden = FinalHidden(model, head_loss) if head_loss is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops_per_token = model_flops_per_token(model, trainable_n, train_set.seq_len)
    peak = peak_tflops(cfg.train.peak_tflops)

    state = ckpt.TrainerState()
    ckpt_root = out_dir / "checkpoints"
    start = ckpt.find_resume(ckpt_root, resume)
    if start is not None:
        state, _ = ckpt.load_checkpoint(accelerator, start)
        log.info("resumed from %s at step %d (epoch %d, %d sequences consumed)", start, state.step, state.epoch, state.consumed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    metrics = Metrics(out_dir / "tensorboard", accelerator.is_main_process)
    metrics.text("config", f"```\n{config_json(cfg)}\n```")
    mcq = load_mcq_for_run(cfg)
    sample_log = _sample_log(out_dir, accelerator.process_index)

    if start is None:
        state.baseline = evaluate(model, tokenizer, val_set, mcq, cfg, accelerator, with_mcq=True)
        _record_eval(state, metrics, 0, state.baseline)
        early_stop_reason(state, state.baseline, cfg)
    batches = iter(MicroBatches(stream, cfg, state, accelerator.num_processes))
    stop_reason = "max_steps" if cfg.train.max_steps else "epochs"
    bad_in_a_row = 0
    bar = progress(total=total_steps, initial=state.step, desc="train", unit="step")
    while state.step < total_steps:
        t0 = time.perf_counter()
        result = train_step(model, optimizer, scheduler, accelerator, batches, cfg, state, trainable, hidden)
        dt = time.perf_counter() - t0
        state.train_seconds += dt
        if not result["finite"]:
            bad_in_a_row += 1
            state.bad_steps_total += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", state.step + 1, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                stop_reason = f"non_finite: {bad_in_a_row} consecutive optimizer steps with a non-finite loss or gradient"
                break
            continue
        bad_in_a_row = 0
        state.step += 1
        state.tokens_seen += result["tokens"]
        state.losses.append({"step": state.step, "loss": result["loss"]})
        sample_log.write(f'{{"step": {state.step}, "ids": {result["sample_ids"]}}}\n')
        sample_log.flush()
        per_device = result["tokens"] / dt / accelerator.num_processes
        if state.step % cfg.train.log_steps == 0:
            metrics.scalars(state.step, {
                "train/tokens_per_sec_per_device": per_device,
                "train/mfu": mfu(per_device, flops_per_token, peak),
                "train/loss": result["loss"], "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": result["grad_norm"], "train/tokens_per_sec": result["tokens"] / dt,
                "train/tokens_seen": state.tokens_seen,
            })
        bar.update(1)
        bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{result['tokens'] / dt:.0f}")
        last = state.step >= total_steps
        reason = None
        want_ppl = cfg.eval.steps and state.step % cfg.eval.steps == 0 and not last
        want_mcq = cfg.eval.mcq_steps and state.step % cfg.eval.mcq_steps == 0 and not last
        if want_ppl or want_mcq:
            evaluated = evaluate(model, tokenizer, val_set if want_ppl else None, mcq, cfg, accelerator, with_mcq=bool(want_mcq))
            _record_eval(state, metrics, state.step, evaluated)
            reason = early_stop_reason(state, evaluated, cfg)
        if cfg.train.save_steps and state.step % cfg.train.save_steps == 0 and not last:
            ckpt.save_checkpoint(accelerator, ckpt_root, state, {"config": cfg.to_dict()}, cfg.train.keep_last)
        if reason:
            stop_reason = reason
            break
    bar.close()
    sample_log.close()

    final = evaluate(model, tokenizer, val_set, mcq, cfg, accelerator, with_mcq=True)
    # saved before the final evaluation is recorded: a run killed while writing its outputs resumes from
    # this checkpoint, evaluates again and records it once (recorded here too, history held it twice)
    ckpt.save_checkpoint(accelerator, ckpt_root, state, {"config": cfg.to_dict()}, cfg.train.keep_last)
    _record_eval(state, metrics, state.step, final)
    if final.get("val_loss") is not None:
        state.best_val_loss = min(final["val_loss"], state.best_val_loss or final["val_loss"])
    info = _training_info(cfg, state, final, stop_reason, trainable_n, total_n)
    per_device = info["tokens_per_sec"] / accelerator.num_processes
    info.update(new_tokens=len(new_ids), flops_per_token=flops_per_token, tokens_per_sec_per_device=per_device,
                peak_tflops=peak, mfu=mfu(per_device, flops_per_token, peak))
    save_outputs(accelerator, model, tokenizer, cfg, info)
    metrics.close()
    accelerator.end_training()
    return info


def _sample_log(out_dir: Path, rank: int):
    path = out_dir / "samples" / f"rank{rank:03d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def _record_eval(state: ckpt.TrainerState, metrics: Metrics, step: int, result: dict) -> None:
    if not result:
        return
    entry = {"step": step, "val_loss": result.get("val_loss"), "val_ppl": result.get("val_ppl"),
             "mcq_accuracy": result.get("mcq_accuracy")}
    entry.update({k: v for k, v in result.items() if k.startswith("val_loss_") or k.startswith("mcq_")})
    state.history.append(entry)
    metrics.scalars(step, {"val/loss": entry["val_loss"], "val/ppl": entry["val_ppl"],
                           "eval/kormedmcqa_acc": entry["mcq_accuracy"],
                           **{f"val/loss_{k[len('val_loss_'):]}": v for k, v in result.items()
                              if k.startswith("val_loss_")}})
    log.info("eval at step %d: %s", step, {k: v for k, v in entry.items() if v is not None and k != "mcq_by_group"})


def _training_info(cfg: RunConfig, state: ckpt.TrainerState, final: dict, stop_reason: str,
                   trainable_n: int, total_n: int) -> dict:
    base = state.baseline
    best = state.best_val_loss
    return {
        "config": cfg.to_dict(),
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.train_seconds, 3),
        "tokens_per_sec": state.tokens_seen / state.train_seconds if state.train_seconds else 0.0,
        "trainable_params": trainable_n,
        "total_params": total_n,
        "trainable_percent": 100.0 * trainable_n / total_n,
        "val_loss_baseline": base.get("val_loss"),
        "val_loss_final": final.get("val_loss"),
        "val_loss_best": best,
        "val_ppl_baseline": base.get("val_ppl"),
        "val_ppl_final": final.get("val_ppl"),
        "val_ppl_best": math.exp(best) if best is not None else None,
        "mcq_accuracy_baseline": base.get("mcq_accuracy"),
        "mcq_accuracy_final": final.get("mcq_accuracy"),
        "history": state.history,
        "losses": state.losses,
        "bad_steps": state.bad_steps_total,
        "stop_reason": stop_reason,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "versions": versions(),
    }
