"""Where a run reports: TensorBoard scalars (namespaced, with units in their names where they have one),
the append-only ``metrics.jsonl``, each rank's sample log, and the progress bar."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from korcpt.config import RunConfig, config_json, save_config
from korcpt.log import get_logger, progress

log = get_logger(__name__)


class Metrics:
    """Writes TensorBoard event files on rank 0; a no-op on other ranks."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


METRICS_FILE = "metrics.jsonl"
# ``kind`` of a metrics.jsonl record; within one step, history lists an evaluation before the final one
_EVAL_KINDS = ("eval", "final")


class RunRecord:
    """Reports a run: TensorBoard (rank 0), ``metrics.jsonl`` beside the checkpoints (rank 0; one JSON
    object per optimizer step ``{"kind": "train", "step", "loss", ...}`` and per evaluation, ``kind``
    ``eval`` or ``final``), ``samples/rankNNN.jsonl`` (every rank: the sequence ids of each step) and
    the progress bar.

    Both files are append-only: a resumed run appends the steps it replays after its checkpoint, and
    the newest record of a (kind, step) is the one that counts (:meth:`history`, :meth:`losses`), so
    the sample log still shows what a killed attempt trained.
    """

    def __init__(self, cfg: RunConfig, accelerator, total_steps: int, start_step: int, flops_per_token: float,
                 tokens_per_step: int):
        out_dir = Path(cfg.output.dir)
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.log_steps, self.flops_per_token = cfg.train.log_steps, flops_per_token
        self.tokens_per_step = tokens_per_step  # processed (input) tokens of an optimizer step, all ranks
        self.peak = peak_tflops(cfg.train.peak_tflops)
        if self.main:  # the resolved config beside the outputs, and in TensorBoard
            out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out_dir / "config.yaml")
        self.tensorboard = Metrics(out_dir / "tensorboard", self.main)
        self.tensorboard.text("config", f"```\n{config_json(cfg)}\n```")
        self.metrics_path = out_dir / METRICS_FILE
        self.metrics = open(self.metrics_path, "a", encoding="utf-8") if self.main else None
        samples = out_dir / "samples" / f"rank{accelerator.process_index:03d}.jsonl"
        samples.parent.mkdir(parents=True, exist_ok=True)
        self.samples = open(samples, "a", encoding="utf-8")
        self.bar = progress(total=total_steps, initial=start_step, desc="train", unit="step")

    def train_step(self, state, result, lr: float) -> None:
        """One good optimizer step (a :class:`korcpt.train.step.StepResult`, counted in ``state``) at
        learning rate ``lr``."""
        step = state.step
        self._write(self.samples, {"step": step, "ids": result.sample_ids})
        self._write(self.metrics, {"kind": "train", "step": step, "loss": result.loss, "tokens": result.tokens,
                                   "grad_norm": result.grad_norm, "lr": lr})
        if step % self.log_steps == 0:
            per_device = result.tokens / result.seconds / self.world
            self.tensorboard.scalars(step, {
                "train/tokens_per_sec_per_device": per_device,
                "train/mfu": mfu(self.tokens_per_step / self.world / result.seconds, self.flops_per_token, self.peak),
                "train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                "train/tokens_per_sec": result.tokens / result.seconds, "train/tokens_seen": state.tokens_seen,
            })
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.seconds:.0f}")

    def evaluation(self, step: int, result: dict, kind: str = "eval") -> None:
        """An evaluation's ``result`` (:class:`korcpt.train.evaluation.Evaluator`) at ``step``."""
        if not result:
            return
        entry = {"step": step, "val_loss": result.get("val_loss"), "val_ppl": result.get("val_ppl"),
                 "val_bpc": result.get("val_bpc"), "val_tokens": result.get("val_tokens"),
                 "heldout_bpc": result.get("heldout_bpc"),
                 "mcq_accuracy": result.get("mcq_accuracy")}
        entry.update({k: v for k, v in result.items() if k.startswith("val_loss_") or k.startswith("mcq_")})
        self._write(self.metrics, {"kind": kind, **entry})
        self.tensorboard.scalars(step, {"val/loss": entry["val_loss"], "val/ppl": entry["val_ppl"],
                                        "val/bpc": entry["val_bpc"], "heldout/bpc": entry["heldout_bpc"],
                                        "eval/kormedmcqa_acc": entry["mcq_accuracy"],
                                        **{f"val/loss_{k[len('val_loss_'):]}": v for k, v in result.items()
                                           if k.startswith("val_loss_")}})
        log.info("eval at step %d: %s", step, {k: v for k, v in entry.items() if v is not None and k != "mcq_by_group"})

    def history(self) -> list[dict]:
        """Every evaluation, by step (rank 0; empty elsewhere)."""
        newest = self._newest(_EVAL_KINDS)
        order = sorted(newest, key=lambda key: (key[1], _EVAL_KINDS.index(key[0])))
        return [{k: v for k, v in newest[key].items() if k != "kind"} for key in order]

    def losses(self) -> list[dict]:
        """``[{"step", "loss"}]`` of every optimizer step (rank 0; empty elsewhere)."""
        newest = self._newest(("train",))
        return [{"step": step, "loss": newest[kind, step]["loss"]} for kind, step in sorted(newest)]

    def processed_per_device(self, state) -> float:
        """Processed tokens per second of one device over the run's optimizer steps, skipped ones
        included (they did the work, and their time is in ``state.train_seconds``): MFU's rate."""
        steps = state.step + state.bad_steps_total
        return steps * self.tokens_per_step / self.world / state.train_seconds if state.train_seconds else 0.0

    def close(self) -> None:
        self.bar.close()
        self.samples.close()
        if self.metrics is not None:
            self.metrics.close()
        self.tensorboard.close()

    def _newest(self, kinds: tuple[str, ...]) -> dict[tuple[str, int], dict]:
        if not self.main:
            return {}
        self.metrics.flush()
        records = (json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines())
        return {(r["kind"], r["step"]): r for r in records if r["kind"] in kinds}

    @staticmethod
    def _write(file, record: dict) -> None:
        if file is not None:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, and the git revision of korcpt."""
    import importlib.metadata as md

    out = {}
    for name in ("korcpt", "torch", "transformers", "peft", "deepspeed", "accelerate", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        root = Path(__file__).resolve().parents[2]
        out["git_revision"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = None
    return out


# Dense bf16 peak of one device in TFLOP/s (vendor datasheets, no sparsity), as (substring of
# torch.cuda.get_device_name(), TFLOP/s); the first match wins, so variants come before their family.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H800", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


def datasheet_peak_tflops(device_name: str | None) -> float | None:
    """The datasheet peak of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    return next((value for key, value in PEAK_TFLOPS if device_name and key in device_name), None)


def peak_tflops(configured: float) -> float | None:
    """The configured peak, or the datasheet peak of this CUDA device; None on CPU (no MFU there)."""
    import torch

    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    return datasheet_peak_tflops(torch.cuda.get_device_name())


def mfu(tokens_per_sec_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s of one device over its peak (None without a peak):
    processed tokens per second times :func:`korcpt.model.flops.lora_flops_per_token`'s count."""
    return tokens_per_sec_per_device * flops_per_token / (peak * 1e12) if peak else None
