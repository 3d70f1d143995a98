"""Training throughput on CPU: korcpt's loop against HuggingFace ``Trainer``, same everything else.

    .venv/bin/python bench/bench_train.py                       # tiny random Gemma 3, 4 x 256
    .venv/bin/python bench/bench_train.py --hidden 64 --layers 2   # the tiny_cpu.yaml size
    .venv/bin/python bench/bench_train.py --model gemma3-270m   # the real pretrained Gemma 3 270M

One run config (a :class:`korcpt.config.RunConfig`, saved as ``run.yaml`` in the work directory) is
the single source of truth for both sides:

* korcpt: ``korcpt.train.loop.train(cfg)``; tokens/s is the returned ``tokens_per_sec`` (target tokens
  over the summed time of the optimizer steps: setup, evaluation and saving excluded).
* HuggingFace: the same model built by the same loader and seed, ``peft.LoraConfig`` with the same
  r / alpha / dropout / rsLoRA / target modules, a ``torch.utils.data.Dataset`` over the same packed
  sequences (``ShardSet.sample(i)``: the labels are passed as ``shift_labels`` too, so the model's loss
  uses exactly korcpt's targets instead of shifting them once more), ``TrainingArguments`` with the
  same micro-batch, accumulation, steps, AdamW (torch, betas 0.9/0.95), schedule (cosine with min lr,
  same warmup), clipping, no evaluation, no saving, ``report_to=[]``, ``dataloader_num_workers=0``.
  Tokens are counted the same way (``labels != -100``) by a forward pre-hook on the model, so only the
  micro-batches really trained count; time runs from ``on_epoch_begin`` to the last ``on_step_end``.

Each side runs in its own process (``--worker``), one after the other, ``--repeats`` times in
alternation; the table shows the best run of each (the machine is shared, so the best is the least
disturbed) and every run is listed. ``bench/gpu.py`` reuses the workers on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULT_TAG = "BENCH_RESULT "


# ---------------------------------------------------------------- the two workers (one process each)


def _memory() -> dict:
    import resource

    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "device": "cpu"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["device"] = torch.cuda.get_device_name()
    return out


def korcpt_worker(cfg) -> dict:
    """korcpt's own loop; tokens/s as ``training_info.json`` reports it."""
    from korcpt.train import loop

    # CPU seconds of the same window the loop times (its train_step calls): steadier than wall time on
    # a shared machine. The wrapper only reads the clock and calls the loop's own function.
    cpu = {"seconds": 0.0}
    step = loop.train_step

    def timed_step(*a, **kw):
        c0 = time.process_time()
        try:
            return step(*a, **kw)
        finally:
            cpu["seconds"] += time.process_time() - c0

    loop.train_step = timed_step
    t0 = time.perf_counter()
    try:
        info = loop.train(cfg)
    finally:
        loop.train_step = step
    losses = [x["loss"] for x in info["losses"]]
    return {"side": "korcpt", "steps": info["steps"], "tokens": info["tokens_seen"],
            "train_seconds": info["train_seconds"], "tokens_per_sec": info["tokens_per_sec"],
            "tokens_per_cpu_sec": info["tokens_seen"] / max(cpu["seconds"], 1e-9),
            "run_seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": losses[-1],
            "trainable_params": info["trainable_params"], **_memory()}


class PackedSequences:
    """The shards' training sequences as a map-style dataset for ``Trainer``."""

    def __init__(self, shards, count: int, multimodal: bool):
        self.shards, self.count, self.multimodal = shards, count, multimodal

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        s = self.shards.sample(i)
        # korcpt's labels are already the next tokens: shift_labels tells the HF loss not to shift again
        item = {"input_ids": s["input_ids"], "labels": s["labels"], "shift_labels": s["labels"]}
        if self.multimodal:  # Gemma3ForConditionalGeneration trains text-only with zero token types
            item["token_type_ids"] = s["input_ids"].new_zeros(s["input_ids"].shape)
        return item


def hf_worker(cfg) -> dict:
    """The same run through ``transformers.Trainer``."""
    import peft
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

    from korcpt.model.load import is_multimodal, load_model_and_tokenizer
    from korcpt.model.lora import target_modules
    from korcpt.shards.format import tokenizer_fingerprint
    from korcpt.shards.reader import open_shards

    t0 = time.perf_counter()
    t, lo = cfg.train, cfg.lora
    if cfg.data.document_mask:
        raise SystemExit("hf_worker: data.document_mask has no Trainer equivalent with SDPA; benchmark without it")
    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    set_seed(t.seed)
    model, tokenizer, new_ids = load_model_and_tokenizer(cfg.model, torch.device("cuda" if cuda else "cpu"), t.seed)
    shards = open_shards(cfg.data.shards, "train", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                         verify=cfg.data.verify_checksums)
    extra = {}
    if lo.embeddings == "new_tokens" and new_ids:
        extra["trainable_token_indices"] = {"embed_tokens": list(new_ids)}  # PEFT's own way to train new rows
    elif lo.embeddings == "full":
        raise SystemExit("hf_worker: lora.embeddings=full is not benchmarked")
    torch.manual_seed(t.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, use_rslora=lo.use_rslora,
        target_modules=target_modules(model, lo), bias="none", **extra))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    counted = {"tokens": 0, "micro_batches": 0}

    def count(_module, _args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("labels") is not None:
            counted["tokens"] += int((kwargs["labels"] != -100).sum())
            counted["micro_batches"] += 1

    model.register_forward_pre_hook(count, with_kwargs=True)

    class Clock(TrainerCallback):
        start = end = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    clock = Clock()
    n = shards.sequences_for_documents(t.max_samples) if t.max_samples else shards.num_sequences  # as korcpt plans
    warmup = t.warmup_steps or int(t.warmup_ratio * t.max_steps)
    args = TrainingArguments(
        output_dir=str(Path(cfg.output.dir) / "hf"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum, max_steps=t.max_steps, learning_rate=t.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=warmup, weight_decay=t.weight_decay, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=t.grad_clip, logging_steps=t.log_steps, save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=not cuda, dataloader_num_workers=0, seed=t.seed,
        remove_unused_columns=False, disable_tqdm=True, bf16=False, fp16=False,
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if cfg.model.gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=args, train_dataset=PackedSequences(shards, n, is_multimodal(model)),
                      data_collator=default_data_collator, callbacks=[clock])
    trainer.train()
    seconds = clock.end - clock.start
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    if counted["micro_batches"] != t.max_steps * t.grad_accum:
        raise SystemExit(f"hf_worker: {counted['micro_batches']} micro-batches trained, expected "
                         f"{t.max_steps * t.grad_accum}")
    cpu_seconds = max(clock.cpu_end - clock.cpu_start, 1e-9)
    return {"side": "hf", "steps": trainer.state.global_step, "tokens": counted["tokens"], "train_seconds": seconds,
            "tokens_per_sec": counted["tokens"] / seconds, "tokens_per_cpu_sec": counted["tokens"] / cpu_seconds,
            "run_seconds": time.perf_counter() - t0,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "trainable_params": trainable, **_memory()}


def worker_main(side: str, config: str) -> int:
    from korcpt.config import load_config

    cfg = load_config(config)
    result = korcpt_worker(cfg) if side == "korcpt" else hf_worker(cfg)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def run_worker(script: Path, side: str, config: Path, log: Path, timeout: float | None = None,
               threads: int | None = None) -> dict:
    """Run one side in a fresh process; its result plus the process's wall time (imports included)."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run([sys.executable, str(script), "--worker", side, "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        return {"side": side, "error": f"exit {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                "log": str(log), "process_seconds": wall}
    return {**json.loads(lines[-1][len(RESULT_TAG):]), "process_seconds": wall}


# ---------------------------------------------------------------- data and config (CPU benchmark)


def build_data(work: Path, tokenizer: str, seq_len: int, sequences: int) -> Path:
    """Shards of tests/tinyrun.synthetic_corpus with at least ``sequences`` training windows."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tinyrun import synthetic_corpus

    from korcpt.shards.writer import ShardOptions, write_shards

    n_docs = 400
    while True:
        corpus = synthetic_corpus(work / "corpus.jsonl", n_docs=n_docs, seed=0)
        manifest = write_shards(corpus, work / "shards", ShardOptions(
            tokenizer=tokenizer, seq_len=seq_len, val_fraction=0.0, shard_tokens=1 << 20, seed=1, workers=1))
        have = sum(s["sequences"] for s in manifest["shards"] if s["split"] == "train")
        if have >= sequences:
            return work / "shards"
        n_docs = int(n_docs * 2 * sequences / max(have, 1)) + 1


def arch_json(work: Path, hidden: int, layers: int) -> Path:
    """tiny_gemma3.json widened: head_dim 64 (32 below 128), 4x MLP, half as many KV heads."""
    arch = json.loads((ROOT / "configs/models/tiny_gemma3.json").read_text(encoding="utf-8"))
    head_dim = 64 if hidden >= 128 else 32
    heads = max(1, hidden // head_dim)
    arch.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=4 * hidden, head_dim=head_dim,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    path = work / f"arch_{hidden}x{layers}.json"
    path.write_text(json.dumps(arch, indent=2), encoding="utf-8")
    return path


def write_run_config(path: Path, sections: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def fmt_table(rows: list[tuple[str, dict]]) -> str:
    """Rows of (label, result); the ratio column is korcpt / HF of tokens/s."""
    head = (f"{'side':8s} {'steps':>5s} {'tokens':>8s} {'train s':>8s} {'tokens/s':>9s} {'tokens/CPU-s':>12s} "
            f"{'process s':>9s} {'peak RSS GiB':>12s}  loss first -> last")
    out = [head]
    for label, r in rows:
        if "error" in r:
            out.append(f"{label:8s} failed: {r['error']}")
            continue
        out.append(f"{label:8s} {r['steps']:5d} {r['tokens']:8d} {r['train_seconds']:8.2f} {r['tokens_per_sec']:9.1f} "
                   f"{r['tokens_per_cpu_sec']:12.1f} {r['process_seconds']:9.1f} {r['peak_rss_gib']:12.2f}  "
                   f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["korcpt", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["tiny", "gemma3-270m"], default="tiny")
    ap.add_argument("--hidden", type=int, default=256, help="tiny model width (tiny_gemma3.json has 64)")
    ap.add_argument("--layers", type=int, default=4, help="tiny model depth (tiny_gemma3.json has 2)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default 256 tiny, 128 gemma3-270m)")
    ap.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--accum", type=int, help="micro-batches per optimizer step (default 4 tiny, 2 gemma3-270m)")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 30 tiny, 4 gemma3-270m)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: on a shared, oversubscribed machine 2 threads ran 10x slower)")
    ap.add_argument("--work", default=str(ROOT / "build" / "bench_train"), help="work directory")
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, args.config)

    tiny = args.model == "tiny"
    seq_len = args.seq_len or (256 if tiny else 128)
    accum = args.accum or (4 if tiny else 2)
    steps = args.steps or (30 if tiny else 4)
    work = Path(args.work) / (f"tiny_{args.hidden}x{args.layers}" if tiny else "gemma3-270m")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = "tiny-ko" if tiny else "gemma3-270m"
    shards = build_data(work, tokenizer, seq_len, steps * accum * args.micro)
    model = ({"name": str(arch_json(work, args.hidden, args.layers)), "tokenizer": tokenizer, "random_init": True}
             if tiny else {"name": "gemma3-270m"})
    config = write_run_config(work / "run.yaml", {
        "data": {"shards": str(shards)},
        "model": {**model, "dtype": "float32", "attn_implementation": "sdpa", "device": "cpu"},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.05, "use_rslora": True,
                 "target_modules": "all-linear", "embeddings": "frozen"},
        "train": {"lr": 1e-3, "micro_batch_size": args.micro, "grad_accum": accum, "max_steps": steps,
                  "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 1.0, "seed": 42, "log_steps": 1},
        "eval": {"steps": 0},
        "output": {"dir": str(work / "out")},
    })

    import torch

    what = (f"tiny random Gemma 3 ({args.hidden} hidden x {args.layers} layers, tiny-ko vocab)" if tiny
            else "Gemma 3 270M (pretrained, float32)")
    print(f"{what}; {args.micro} x {seq_len} tokens x {accum} accumulation, {steps} steps, LoRA r={args.lora_r} "
          f"alpha={args.lora_alpha:g} rsLoRA all-linear; torch {torch.__version__}, {args.threads} thread(s) per worker, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[str, list[dict]] = {"korcpt": [], "hf": []}
    for i in range(args.repeats):
        for side in ("korcpt", "hf"):
            r = run_worker(Path(__file__), side, config, work / f"{side}_{i}.log", threads=args.threads)
            runs[side].append(r)
            shown = f"{r['tokens_per_sec']:.1f} tokens/s" if "error" not in r else r["error"]
            print(f"  run {i + 1} {side:6s}: {shown}", flush=True)

    def best(side: str) -> dict:
        ok = [r for r in runs[side] if "error" not in r]
        return max(ok, key=lambda r: r["tokens_per_sec"]) if ok else runs[side][-1]

    k, h = best("korcpt"), best("hf")
    print()
    print(fmt_table([("korcpt", k), ("HF", h)]))
    if "error" not in k and "error" not in h:
        every = {side: ", ".join(f"{r['tokens_per_sec']:.0f}" for r in runs[side] if "error" not in r)
                 for side in runs}
        print(f"ratio korcpt / HF: tokens/s {k['tokens_per_sec'] / h['tokens_per_sec']:.2f}, tokens/CPU-s "
              f"{k['tokens_per_cpu_sec'] / h['tokens_per_cpu_sec']:.2f}  (tokens/s of every run: korcpt "
              f"{every['korcpt']}; HF {every['hf']})")
    return 0 if "error" not in k and "error" not in h else 1


if __name__ == "__main__":
    raise SystemExit(main())
