"""The training loop: Accelerate (+ DeepSpeed ZeRO) over packed shards, LoRA plus embedding rows.

    train(cfg)
      build_accelerator -> build_model -> open_data -> build_peft_model -> plan_run -> build_stream
      -> build_optimizer -> build_engine (prepare) -> Checkpointer.restore -> baseline evaluation
      for each optimizer step: train_step -> count and record -> maybe evaluate / early-stop -> maybe save
      final save -> final evaluation -> save adapter, tokenizer, training_info.json

Where each part lives: :mod:`korcpt.train.distributed` (device, Accelerator, DeepSpeed, the shared
output check), :mod:`korcpt.train.engine` (model, LoRA, prepare), :mod:`korcpt.train.data` (sources,
plan, micro-batches), :mod:`korcpt.train.optim` (optimizer, schedule), :mod:`korcpt.train.step` (one
optimizer step). Who owns what: the stream knows where the data stands (checkpointed by
:class:`Checkpointer`), the :class:`TrainerState` counts steps, :class:`Evaluator` and
:class:`EarlyStopper` decide their own cadence and stop rule, and :class:`RunRecord` reports
(TensorBoard, metrics.jsonl, sample logs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from korcpt.config import RunConfig
from korcpt.log import get_logger
from korcpt.model.flops import lora_flops_per_token, trained_head_rows
from korcpt.train.checkpoint import Checkpointer, TrainerState, data_order
from korcpt.train.data import MicroBatches, build_stream, open_data, plan_run
from korcpt.train.distributed import build_accelerator, check_shared_output
from korcpt.train.engine import build_engine, build_model, build_peft_model
from korcpt.train.evaluation import EarlyStopper, Evaluator
from korcpt.train.metrics import RunRecord
from korcpt.train.optim import build_optimizer
from korcpt.train.outputs import save_outputs, training_info
from korcpt.train.step import train_step

log = get_logger(__name__)


@dataclass
class Referee:
    """Evaluates and decides, the same call at the baseline and during the run: runs what is due (or
    everything), records it, sets the stop reason and keeps the best adapter."""

    evaluator: Evaluator
    stopper: EarlyStopper
    record: RunRecord
    checkpointer: Checkpointer
    model: torch.nn.Module

    def __call__(self, state: TrainerState, step: int, everything: bool = False) -> dict:
        result = self.evaluator.run(None if everything else step)
        self.record.evaluation(step, result)
        state.stop_reason = self.stopper.update(step, result)
        self.checkpointer.maybe_keep_best(self.model, state, step, result)
        return result


def train(cfg: RunConfig, resume: str = "") -> dict:
    """Run continued pretraining as ``cfg`` describes; returns the training_info record."""
    from accelerate.utils import set_seed

    accelerator, workarounds = build_accelerator(cfg)
    check_shared_output(accelerator, cfg.output.dir)  # before anything is loaded: a multi-node run needs one output.dir
    set_seed(cfg.train.seed)
    model, tokenizer, new_ids = build_model(cfg, accelerator)
    train_set, val_set = open_data(cfg, tokenizer)
    flops = lora_flops_per_token(model, cfg.lora, train_set.seq_len, trained_head_rows(model, cfg.lora, new_ids))
    model, counts = build_peft_model(model, cfg, new_ids)
    plan = plan_run(cfg, train_set, accelerator.num_processes)
    stream = build_stream(cfg, train_set, accelerator, plan.sequences_per_epoch)
    optimizer, scheduler = build_optimizer(model, cfg, plan.steps)
    engine = build_engine(accelerator, model, optimizer, scheduler, cfg)
    checkpointer = Checkpointer(accelerator, cfg, stream, data_order(cfg, train_set, plan.global_batch))
    resumed = checkpointer.restore(resume)
    state = resumed or TrainerState()
    record = RunRecord(cfg, accelerator, plan.steps, state.step, flops["total"], plan.global_batch * train_set.seq_len)
    evaluator = Evaluator(engine.model, tokenizer, val_set, cfg, accelerator, plan.steps, plan.steps_per_epoch)
    referee = Referee(evaluator, EarlyStopper(cfg.eval, state), record, checkpointer, engine.model)
    if resumed is None:  # a target already met at the baseline stops the run before it trains
        state.baseline = referee(state, 0, everything=True)
    batches = iter(MicroBatches(stream, cfg.train.micro_batch_size, cfg.data.num_workers))
    while state.stop_reason is None and state.step < plan.steps:
        result = train_step(engine, batches, cfg)
        state.count(result, cfg.train.max_bad_steps)
        if not result.finite:
            continue
        record.train_step(state, result, engine.scheduler.get_last_lr()[0])
        last = state.step >= plan.steps
        if evaluator.should_run(state.step):
            referee(state, state.step)
        checkpointer.maybe_save(state, last)
    # saved before the final evaluation is recorded: a run killed while writing its outputs resumes from
    # this checkpoint, trains no further (all steps done, or its stop_reason set) and evaluates again
    checkpointer.save(state)
    final = evaluator.run()
    record.evaluation(state.step, final, kind="final")
    referee.stopper.update(state.step, final)  # the best loss counts the final evaluation too
    best = checkpointer.best_record(state)  # None: the last step's weights are the ones to save
    info = {**training_info(cfg, state, final, best, record, counts, len(new_ids), workarounds), "plan": asdict(plan)}
    record.close()
    save_outputs(accelerator, engine.model, tokenizer, cfg, info, checkpointer.best_dir if best else None)
    accelerator.end_training()
    return info


