"""Evaluation during a run and the stop rule it feeds.

:class:`Evaluator` runs validation loss/perplexity (token-weighted over all ranks) and KorMedMCQA
accuracy at the configured cadence; :class:`EarlyStopper` turns each result into a reason to stop,
keeping its counters in the checkpointed :class:`korcpt.train.checkpoint.TrainerState`.
"""

from __future__ import annotations

import torch

from korcpt.config import EvalConfig, RunConfig
from korcpt.log import get_logger

log = get_logger(__name__)


def load_mcq_for_run(cfg: RunConfig):
    """``(items, fewshot, skipped)`` of ``eval.mcq_file``, or None without one; skipped items are logged."""
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


def load_heldout_for_run(cfg: RunConfig) -> list[str]:
    """The documents of ``eval.heldout_file`` (none without one); skipped lines are logged with their count."""
    if not cfg.eval.heldout_file:
        return []
    from korcpt.config import resolve_path
    from korcpt.eval.perplexity import read_heldout_texts

    texts, skipped = read_heldout_texts(resolve_path(cfg, cfg.eval.heldout_file))
    if skipped:
        log.warning("eval.heldout_file: %d lines skipped, first: %s", len(skipped), skipped[0])
    return texts


def evaluation_every(ecfg: EvalConfig, steps_per_epoch: int) -> tuple[int, int]:
    """Optimizer steps between validation evaluations and between KorMedMCQA ones (0: only at the
    baseline and the end): ``eval.steps``, or ``eval.per_epoch`` evaluations per epoch of
    ``steps_per_epoch`` steps; MCQ at ``eval.mcq_steps``, else with every validation evaluation."""
    val = ecfg.steps or (max(1, steps_per_epoch // ecfg.per_epoch) if ecfg.per_epoch else 0)
    return val, ecfg.mcq_steps or (val if ecfg.mcq_file else 0)


class Evaluator:
    """Validation perplexity and KorMedMCQA at the cadence of :func:`evaluation_every` (neither at the
    last step: the final evaluation covers it), and everything at the baseline and the end."""

    def __init__(self, model, tokenizer, val_set, cfg: RunConfig, accelerator, total_steps: int, steps_per_epoch: int):
        self.model, self.tokenizer, self.val_set, self.cfg = model, tokenizer, val_set, cfg
        self.accelerator, self.total_steps = accelerator, total_steps
        self.val_every, self.mcq_every = evaluation_every(cfg.eval, steps_per_epoch)
        self.mcq = load_mcq_for_run(cfg)
        self.heldout = load_heldout_for_run(cfg)
        self._chars: dict[int, int] = {}  # validation sequence id -> characters its targets cover

    def _due(self, every: int, step: int) -> bool:
        return bool(every) and step % every == 0 and step < self.total_steps

    def should_run(self, step: int) -> bool:
        return self._due(self.val_every, step) or self._due(self.mcq_every, step)

    def run(self, step: int | None = None) -> dict:
        """What is due at ``step``, or everything (``step`` None: baseline and final evaluation)."""
        ppl = step is None or self._due(self.val_every, step)
        mcq = step is None or self._due(self.mcq_every, step)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            result = {**(self._perplexity() if ppl and self.val_set is not None else {}),
                      **(self._heldout() if ppl and self.heldout else {}),
                      **(self._mcq() if mcq and self.mcq is not None else {})}
        if was_training:
            self.model.train()
        return result

    def _perplexity(self) -> dict:
        from korcpt.eval.perplexity import evaluate_perplexity, val_batches

        acc, val_set, cfg = self.accelerator, self.val_set, self.cfg
        batches = val_batches(self.model, val_set, max_sequences=cfg.eval.max_val_sequences, batch_size=cfg.eval.batch_size,
                              document_mask=cfg.data.document_mask, rank=acc.process_index, world_size=acc.num_processes,
                              device=acc.device, extra=self._target_chars)
        ppl = evaluate_perplexity(self.model, batches, reduce=lambda t: acc.reduce(t, "sum"),
                                  source_names=val_set.sources or None)
        result = {f"val_loss_{name}": part["loss"] for name, part in ppl.get("by_source", {}).items()}
        result.update(val_loss=ppl["loss"], val_ppl=ppl["ppl"], val_bpc=ppl.get("bpc"), val_tokens=ppl["tokens"])
        return result

    def _heldout(self) -> dict:
        """Bits per character on ``eval.heldout_file``. Every rank scores every text (no reduction): the
        file is small, and under ZeRO-3 every rank must take part in every forward."""
        from korcpt.eval.perplexity import score_text

        return {"heldout_bpc": score_text(self.model, self.tokenizer, self.heldout, batch_size=self.cfg.eval.batch_size)["bpc"]}

    def _target_chars(self, batch: dict) -> dict:
        """The characters each validation sequence's targets cover (for bits per character)."""
        from korcpt.eval.perplexity import target_chars

        ids = [int(i) for i in batch["sample_id"]]
        if any(i not in self._chars for i in ids):  # decoded once per run: the sequences do not change
            self._chars.update(zip(ids, target_chars(self.tokenizer, batch["labels"]).tolist()))
        return {"target_chars": torch.tensor([self._chars[i] for i in ids], device=self.accelerator.device)}

    def _mcq(self) -> dict:
        from accelerate.utils import gather_object

        from korcpt.eval.mcq import score_mcq

        items, fewshot, skipped = self.mcq
        cfg, acc = self.cfg.eval, self.accelerator
        scored = score_mcq(self.model, self.tokenizer, items, mode=cfg.mcq_mode, fewshot=fewshot, shots=cfg.mcq_shots,
                           batch_size=cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                           gather=gather_object, skipped=skipped)
        return {"mcq_accuracy": scored["accuracy"], "mcq_n": scored["n"], "mcq_skipped": scored["n_skipped"],
                "mcq_ci95": scored["ci95"], "mcq_by_group": scored["by_group"]}


class EarlyStopper:
    """The stop rule of train_raw_korean_text.md ("3. Validation", stop conditions) over validation
    results: validation loss not better by ``eval.min_delta`` for ``eval.patience`` evaluations, or
    perplexity at or below ``eval.target_ppl`` (0: off)."""

    def __init__(self, ecfg: EvalConfig, state):
        self.ecfg, self.state = ecfg, state

    def update(self, step: int, result: dict) -> str | None:
        """Record ``result`` at ``step`` (best loss and its step, evaluations without an improvement of
        ``min_delta``) and say why to stop, if it is time; the baseline (step 0) counts like any other."""
        loss, state, ecfg = result.get("val_loss"), self.state, self.ecfg
        if loss is None:
            return None
        improved = state.best_val_loss is None or loss < state.best_val_loss - ecfg.min_delta
        state.evals_without_improvement = 0 if improved else state.evals_without_improvement + 1
        if state.best_val_loss is None or loss < state.best_val_loss:
            state.best_val_loss, state.best_step = loss, step
        if ecfg.target_ppl and result["val_ppl"] <= ecfg.target_ppl:
            return f"target_ppl: validation perplexity {result['val_ppl']:.3f} <= {ecfg.target_ppl}"
        if ecfg.patience and state.evals_without_improvement >= ecfg.patience:
            return (f"early_stopping: validation loss did not improve by {ecfg.min_delta} "
                    f"for {ecfg.patience} evaluations")
        return None
