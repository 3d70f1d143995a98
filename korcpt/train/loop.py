"""The training loop: Accelerate (+ DeepSpeed ZeRO) over packed shards, LoRA plus embedding rows.

Two clocks: a *micro-step* is one forward/backward of ``micro_batch_size`` sequences on each rank; an
*optimizer step* is ``grad_accum`` micro-steps. The loss of an optimizer step is the mean over every
target token of its micro-batches on every rank (token-weighted, not a mean of per-batch means): each
micro-batch contributes ``sum(token NLL) / N`` where ``N`` counts the step's target tokens on all ranks.

    train(cfg)
      build_accelerator -> build_model -> open_data -> build_peft_model -> build_stream -> plan_steps
      -> build_optimizer -> build_engine (prepare) -> Checkpointer.restore -> baseline evaluation
      for each optimizer step: train_step -> count and record -> maybe evaluate / early-stop -> maybe save
      final save -> final evaluation -> save adapter, tokenizer, training_info.json

Who owns what: the stream knows where the data stands (checkpointed by :class:`Checkpointer`), the
:class:`TrainerState` counts steps, :class:`Evaluator` and :class:`EarlyStopper` decide their own
cadence and stop rule, and :class:`RunRecord` reports (TensorBoard, metrics.jsonl, sample logs).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from korcpt.config import RunConfig
from korcpt.errors import TrainingError
from korcpt.log import get_logger
from korcpt.model.load import load_model_and_tokenizer, resolve_dtype
from korcpt.model.lora import apply_lora, count_parameters, embedding_parameters, unwrap_base
from korcpt.model.loss import FinalHidden, attach_head_loss, model_batch, nll_sum
from korcpt.shards.reader import IGNORE_INDEX
from korcpt.shards.source import SourceStream
from korcpt.train.checkpoint import Checkpointer, TrainerState, check_shared_output, data_order
from korcpt.train.evaluation import EarlyStopper, Evaluator, evaluation_every
from korcpt.train.metrics import RunRecord, model_flops_per_token
from korcpt.train.outputs import save_outputs, training_info

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
    """An Accelerator whose DeepSpeed settings that depend on the run come from the run config, and
    the names of the upstream workarounds it needed (for ``training_info.json``)."""
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
    workarounds = ["accelerate_cpu_deepspeed_ranks"] if _record_cpu_deepspeed_ranks(accelerator) else []
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
    return accelerator, workarounds


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


# Accelerate releases whose rank bookkeeping is wrong under DeepSpeed without a GPU (see below):
# measured on 1.15 and 1.16; a newer major release is assumed fixed until measured otherwise.
_CPU_DEEPSPEED_RANKS_BROKEN = ("1.",)


def _record_cpu_deepspeed_ranks(accelerator) -> bool:
    """Make Accelerate's rank bookkeeping match DeepSpeed's process group on CPU; True if it had to.

    Accelerate 1.x lets DeepSpeed initialise a gloo process group when there is no GPU but, finding no
    device backend, records one process of rank 0 in every process: every rank then believes it is
    the main one (all write the same files) and would read the same data. Measured here with
    `accelerate launch --config_file configs/accelerate/cpu_zero3.yaml`: both processes reported
    process_index 0 and num_processes 1 while torch.distributed had world size 2.

    This writes Accelerate's private shared state, so it is fenced: it runs only on the releases in
    :data:`_CPU_DEEPSPEED_RANKS_BROKEN`, the ranks are checked afterwards, and a release outside them
    that still shows the mismatch is refused in one line. ``training_info.json`` lists the workaround
    under ``workarounds`` when it ran; tests/test_distributed.py fails once it is no longer needed.
    """
    import accelerate
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if accelerator.state.deepspeed_plugin is None or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if not dist.is_initialized():  # ZeRO-1/2 on CPU: Accelerate left it to deepspeed.initialize
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    if accelerator.num_processes == dist.get_world_size() and accelerator.process_index == dist.get_rank():
        return False
    found = f"Accelerate {accelerate.__version__} reports rank {accelerator.process_index} of {accelerator.num_processes}"
    if not accelerate.__version__.startswith(_CPU_DEEPSPEED_RANKS_BROKEN):
        raise TrainingError(f"{found}, torch.distributed rank {dist.get_rank()} of {dist.get_world_size()}: "
                            "korcpt's CPU DeepSpeed rank fix is untested on this release; use accelerate 1.x")
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["num_processes"] = dist.get_world_size()
        shared["process_index"] = dist.get_rank()
        shared["local_process_index"] = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if accelerator.num_processes != dist.get_world_size() or accelerator.process_index != dist.get_rank():
        raise TrainingError(f"{found} after korcpt's CPU DeepSpeed rank fix, expected rank {dist.get_rank()} of "
                            f"{dist.get_world_size()} (torch.distributed)")
    return True


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


def open_data(cfg: RunConfig, tokenizer):
    """Train and validation shard sets, checked against the run's tokenizer: memory-mapped from a shard
    directory, or webdataset tars (:class:`korcpt.shards.wds.TarShards`) when ``data.shards`` is a URL."""
    from korcpt.config import stream_source
    from korcpt.shards.reader import open_shards
    from korcpt.shards.format import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    if stream_source(cfg.data.shards):
        from korcpt.shards.wds import open_webdataset

        train_set = open_webdataset(cfg.data.shards, "train", tokenizer_fingerprint=fingerprint,
                                    verify=cfg.data.verify_checksums)
        val_set = open_webdataset(cfg.data.shards, "val", verify=cfg.data.verify_checksums, manifest=train_set.manifest)
        return train_set, (val_set if val_set.num_sequences else None)
    train_set = open_shards(cfg.data.shards, "train", tokenizer_fingerprint=fingerprint,
                            verify=cfg.data.verify_checksums)
    val_set = None
    if any(s["split"] == "val" for s in train_set.manifest["shards"]):
        val_set = open_shards(cfg.data.shards, "val", tokenizer_fingerprint=fingerprint, verify=cfg.data.verify_checksums)
    return train_set, val_set


def plan_steps(cfg: RunConfig, sequences_per_epoch: int, world: int, epochs: int = 0) -> int:
    """Optimizer steps of the run: ``max_steps``, or whole steps over ``epochs`` (default
    ``train.epochs``) epochs (a last partial step is dropped); ``epochs=1`` gives the steps of one
    epoch whatever ``max_steps`` says. Worked example: 1,000 sequences, 2 ranks, micro-batch 2,
    accumulation 4 -> each rank sees 500 per epoch = 250 micro-steps = 62 optimizer steps (62.5, the
    half step dropped)."""
    if cfg.train.max_steps and not epochs:
        return cfg.train.max_steps
    per_rank = sequences_per_epoch // world
    micro_steps = math.ceil(per_rank / cfg.train.micro_batch_size)
    return (micro_steps * (epochs or cfg.train.epochs)) // cfg.train.grad_accum


# ---------------------------------------------------------------- data


def build_stream(cfg: RunConfig, train_set, accelerator, sequences: int) -> SourceStream:
    """This rank's shuffled stream of the first ``sequences`` training sequences (the plan's)."""
    return train_set.training_stream(seed=cfg.train.seed, rank=accelerator.process_index,
                                     world_size=accelerator.num_processes, num_workers=cfg.data.num_workers,
                                     batch_size=cfg.train.micro_batch_size, limit=sequences)


class MicroBatches:
    """Endless micro-batches of this rank across epochs. Each one drawn is recorded in the stream's
    state (``micro_batch * world_size`` global positions), so a checkpoint saves where the data stands."""

    def __init__(self, stream: SourceStream, micro_batch_size: int, num_workers: int):
        self.stream, self.micro_batch_size, self.num_workers = stream, micro_batch_size, num_workers

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        while True:
            loader = DataLoader(self.stream, batch_size=self.micro_batch_size, num_workers=self.num_workers)
            for batch in loader:
                self.stream.advance(len(batch["sample_id"]) * self.stream.world_size)
                yield batch
            self.stream.set_epoch(self.stream.epoch + 1)


# ---------------------------------------------------------------- model


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


@dataclass
class Engine:
    """What an optimizer step needs: the prepared model, optimizer and schedule, the accelerator, the
    trainable parameters (clipped) and, with the chunked loss, the catcher of the final hidden states."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    trainable: list
    hidden: FinalHidden | None


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


# ---------------------------------------------------------------- one optimizer step


@dataclass
class StepResult:
    """One optimizer step: the token-weighted loss over all ranks, its target tokens, the gradient norm
    (None where the engine reports none), whether it was finite (else it was skipped), this rank's
    sequence ids, and its wall seconds."""

    loss: float
    tokens: int
    grad_norm: float | None
    finite: bool
    sample_ids: list[int]
    seconds: float


def train_step(engine: Engine, batches: Iterator[dict], cfg: RunConfig) -> StepResult:
    """Accumulate ``grad_accum`` micro-batches and take one optimizer step (or skip it if non-finite).

    The host waits for the device once per optimizer step, to learn whether the step is finite: the
    token count, the loss and the finite flag stay on the device until then (tests/test_train.py
    counts the synchronising ops).
    """
    t0 = time.perf_counter()
    accelerator, model = engine.accelerator, engine.model
    micro = [next(batches) for _ in range(cfg.train.grad_accum)]
    device = accelerator.device
    local_tokens = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro]).sum()  # on the host: no sync
    tokens = accelerator.reduce(local_tokens.to(device), "sum")
    # backward() divides by grad_accum and DDP/DeepSpeed average over ranks: undo both so the gradient
    # is that of sum(NLL over the step's tokens on all ranks) / tokens.
    scale = cfg.train.grad_accum * accelerator.num_processes / tokens.clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.float32, device=device)
    for batch in micro:
        with accelerator.accumulate(model):
            nll, _ = nll_sum(model, model_batch(model, batch, cfg.data.document_mask, device), engine.hidden)
            finite = finite * torch.isfinite(nll)
            accelerator.backward(nll * scale)
            loss_sum += nll.detach().double()
    loss_sum = accelerator.reduce(loss_sum, "sum")
    finite = accelerator.reduce(finite, "min")
    # the norm is computed even without clipping (max_norm inf): a non-finite gradient skips the step
    grad_norm = accelerator.clip_grad_norm_(engine.trainable, cfg.train.grad_clip or float("inf"))
    if grad_norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed clips inside its engine
        grad_norm = model.get_global_grad_norm()
    norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64, device=device)
    loss_total, token_count, all_finite, norm = torch.stack(  # the step's one host sync
        [loss_sum, tokens.double(), finite.double(), norm.double()]).tolist()
    grad_norm = None if grad_norm is None else norm
    ok = bool(all_finite) and math.isfinite(loss_total) and (grad_norm is None or math.isfinite(grad_norm))
    if ok:
        engine.optimizer.step()
        engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    count = int(token_count)
    return StepResult(loss=loss_total / max(count, 1), tokens=count, grad_norm=grad_norm, finite=ok,
                      sample_ids=[i for b in micro for i in b["sample_id"].tolist()],
                      seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------- the run


def train(cfg: RunConfig, resume: str = "") -> dict:
    """Run continued pretraining as ``cfg`` describes; returns the training_info record."""
    from accelerate.utils import set_seed

    accelerator, workarounds = build_accelerator(cfg)
    check_shared_output(accelerator, cfg.output.dir)  # before anything is loaded: a multi-node run needs one output.dir
    set_seed(cfg.train.seed)
    model, tokenizer, new_ids = build_model(cfg, accelerator)
    train_set, val_set = open_data(cfg, tokenizer)
    model, counts = build_peft_model(model, cfg, new_ids)
    plan = plan_run(cfg, train_set, accelerator.num_processes)
    stream = build_stream(cfg, train_set, accelerator, plan.sequences_per_epoch)
    optimizer, scheduler = build_optimizer(model, cfg, plan.steps)
    engine = build_engine(accelerator, model, optimizer, scheduler, cfg)
    checkpointer = Checkpointer(accelerator, cfg, stream, data_order(cfg, train_set, plan.global_batch))
    resumed = checkpointer.restore(resume)
    state = resumed or TrainerState()
    record = RunRecord(cfg, accelerator, plan.steps, state.step,
                       model_flops_per_token(engine.model, counts[0], train_set.seq_len))
    evaluator = Evaluator(engine.model, tokenizer, val_set, cfg, accelerator, plan.steps, plan.steps_per_epoch)
    stopper = EarlyStopper(cfg.eval, state)
    if resumed is None:  # a target already met at the baseline stops the run before it trains
        state.baseline = evaluator.run()
        record.evaluation(0, state.baseline)
        state.stop_reason = stopper.update(0, state.baseline)
        checkpointer.maybe_keep_best(engine.model, state, 0, state.baseline)
    batches = iter(MicroBatches(stream, cfg.train.micro_batch_size, cfg.data.num_workers))
    while state.stop_reason is None and state.step < plan.steps:
        result = train_step(engine, batches, cfg)
        state.count(result, cfg.train.max_bad_steps)
        if not result.finite:
            continue
        record.train_step(state, result, engine.scheduler.get_last_lr()[0])
        last = state.step >= plan.steps
        if evaluator.should_run(state.step):
            evaluated = evaluator.run(state.step)
            record.evaluation(state.step, evaluated)
            state.stop_reason = stopper.update(state.step, evaluated)
            checkpointer.maybe_keep_best(engine.model, state, state.step, evaluated)
        checkpointer.maybe_save(state, last)
    # saved before the final evaluation is recorded: a run killed while writing its outputs resumes from
    # this checkpoint, trains no further (all steps done, or its stop_reason set) and evaluates again
    checkpointer.save(state)
    final = evaluator.run()
    record.evaluation(state.step, final, kind="final")
    stopper.update(state.step, final)
    best = checkpointer.best_record(state)  # None: the last step's weights are the ones to save
    info = {**training_info(cfg, state, final, best, record, counts, len(new_ids), workarounds), "plan": asdict(plan)}
    record.close()
    save_outputs(accelerator, engine.model, tokenizer, cfg, info, checkpointer.best_dir if best else None)
    accelerator.end_training()
    return info


@dataclass
class RunPlan:
    """What the run will train, printed at its start and kept in ``training_info.json``."""

    documents: int  # training documents of each epoch: the first train.max_samples, or all
    documents_available: int  # documents that begin in a sequence (not in a shard's dropped tail)
    sequences_per_epoch: int  # the packed sequences that hold them
    tokens_per_epoch: int  # target tokens of those sequences
    epochs: int
    steps: int  # optimizer steps of the run (train.max_steps, or whole steps over the epochs)
    steps_per_epoch: int
    global_batch: int  # sequences per optimizer step, all ranks
    evaluations: int  # validation evaluations, the baseline and the final one included

    def describe(self) -> str:
        return (f"plan: {self.documents:,} documents (of {self.documents_available:,}) in "
                f"{self.sequences_per_epoch:,} sequences = {self.tokens_per_epoch:,} tokens per epoch x "
                f"{self.epochs} epoch(s); {self.steps:,} optimizer steps of {self.global_batch} sequences "
                f"({self.steps_per_epoch:,} per epoch); {self.evaluations} validation evaluations")


def plan_run(cfg: RunConfig, train_set, world: int) -> RunPlan:
    """The run's plan: ``train.max_samples`` counts documents (the first N of the shuffled corpus, the
    same ones every epoch) and the sequences that hold them; one line if not a single step fits."""
    available = train_set.num_documents
    documents = min(cfg.train.max_samples, available) if cfg.train.max_samples else available
    sequences = train_set.epoch_sequences(documents, world * max(1, cfg.data.num_workers), cfg.train.micro_batch_size)
    total_steps = plan_steps(cfg, sequences, world)
    if total_steps < 1:
        raise TrainingError(
            f"no optimizer step fits: {sequences} training sequences over {world} process(es) "
            f"with micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum}; "
            "lower train.grad_accum or set train.max_steps"
        )
    per_epoch = plan_steps(cfg, sequences, world, epochs=1)
    val_every, _ = evaluation_every(cfg.eval, per_epoch)
    periodic = (total_steps - 1) // val_every if val_every else 0
    plan = RunPlan(documents, available, sequences, sequences * train_set.seq_len, cfg.train.epochs, total_steps,
                   per_epoch, cfg.train.micro_batch_size * cfg.train.grad_accum * world, periodic + 2)
    log.info("%s", plan.describe())
    return plan
