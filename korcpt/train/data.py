"""The data of a run: the sources opened and checked, the plan (:class:`RunPlan`: documents, sequences,
steps, evaluations), and this rank's endless micro-batches. Which kind of source it is (memory-mapped
shards or webdataset tars) is the source's business (:class:`korcpt.shards.source.ShardSource`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from korcpt.config import RunConfig
from korcpt.errors import TrainingError
from korcpt.log import get_logger
from korcpt.shards.source import SourceStream
from korcpt.train.evaluation import evaluation_every

log = get_logger(__name__)


def open_data(cfg: RunConfig, tokenizer):
    """Train and validation sources (:func:`korcpt.shards.source.open_source`), checked against the run's
    tokenizer; no validation source when the split has no sequences."""
    from korcpt.shards.format import tokenizer_fingerprint
    from korcpt.shards.source import open_source

    fingerprint, verify = tokenizer_fingerprint(tokenizer), cfg.data.verify_checksums
    train_set = open_source(cfg.data.shards, "train", tokenizer_fingerprint=fingerprint, verify=verify)
    val_set = open_source(cfg.data.shards, "val", tokenizer_fingerprint=fingerprint, verify=verify,
                          manifest=train_set.manifest)
    return train_set, (val_set if val_set.num_sequences else None)


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
