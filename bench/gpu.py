"""GPU benchmark: korcpt's loop against HuggingFace ``Trainer`` on the MedGemma 4B architecture.

    python bench/gpu.py                 # NVIDIA GPU: random MedGemma 4B, bf16, 2 x 2048 x 4, 30 steps
    python bench/gpu.py --smoke         # CPU, tiny multimodal Gemma 3, seconds (CI smoke test)
    python bench/gpu.py --model medgemma-27b --embeddings frozen --grad-ckpt --micro 1   # optional, 141 GB card

What it builds (in ``--work``, default /tmp/korcpt_gpu_bench), then runs, each side in its own process
so that peak memory and start-up state are its own:

1. Tokenizers without downloads. Compute depends on the vocabulary size, not on what the ids mean, so a
   word-level tokenizer with Gemma 3's 262,144 ids (Gemma's special ids: pad 0, eos 1, bos 2, unk 3) is
   the base, and the same plus ``--new-tokens`` words (default 20,594: a 282,738-token extended
   vocabulary) is the extension. Both are ordinary ``PreTrainedTokenizerFast`` directories.
2. Shards written by korcpt's own writer (``korcpt.shards.writer.write_shards``) from a synthetic corpus
   of random words of the extended vocabulary (about 7% of tokens are new ones), no validation split.
3. The base model: ``configs/models/medgemma-4b.json`` (Gemma3ForConditionalGeneration, vision tower
   included) initialised at random in bf16 and saved once as a local HuggingFace directory with the base
   tokenizer. Why not ``model.random_init``: a random model takes its vocabulary from the tokenizer and
   has no "new" rows, so ``lora.embeddings=new_tokens`` would train nothing. Through a local directory the
   run takes the user's real path: load, resize to 282,752 rows, initialise the new rows from their
   pieces, LoRA + trainable new rows (:class:`korcpt.model.lora.NewTokenRows`).
4. korcpt: ``korcpt.train.loop.train(cfg)`` with that run config (LoRA r=16 alpha=32 rsLoRA on every
   language-model linear, new-token rows trained, lr 2e-5, ``loss_chunk_tokens`` 1024 as configs/4b.yaml).
5. HuggingFace: ``bench/bench_train.py``'s Trainer worker on the same config: the same loader and seed,
   ``peft.LoraConfig`` with the same LoRA settings and ``trainable_token_indices`` for the new rows
   (PEFT's own way to train added tokens), same batch, accumulation, optimizer, schedule and steps.

Measured per side: target tokens/s over the training steps (setup, loading and saving excluded; on
``training_info.json``'s definition for korcpt, on_epoch_begin .. last on_step_end for Trainer), MFU and
``torch.cuda.max_memory_allocated()`` over the whole process.

FLOP convention of the MFU (model FLOPs of the work a LoRA run must do; :func:`flops_per_token`, which
is the trainer's :mod:`korcpt.model.flops`): per processed token of a sequence of S tokens (no
document masking),

    N_frozen = sum of d_in * d_out over the language model's linear layers (q, k, v, o, gate, up, down)
               + V * H of the (tied) output head, V = padded vocabulary rows; the embedding lookup and
               the vision tower (never run: text only) count nothing
    N_lora   = sum of r * (d_in + d_out) over the adapted linears
    A        = sum over layers of 4 * heads * head_dim * c_l, c_l = mean keys a query attends to
               ((S + 1) / 2 causal; mean of min(i + 1, W) for sliding-window layers of window W)

    forward               2 * (N_frozen + N_lora) + A
    backward, activations 2 * (N_frozen + N_lora) + 2 * A        (every layer: LoRA sits in all of them)
    backward, weights     2 * N_lora + 2 * n_new * H             (frozen weights get no weight gradient;
                                                                  the head's new rows do)
    total per token       4 * N_frozen + 6 * N_lora + 2 * n_new * H + 3 * A

i.e. a full fine-tune's 6N with the weight-gradient third dropped for frozen weights. Not counted:
norms, activation functions, RoPE, softmax, the loss, the optimizer, and any recomputation (gradient
checkpointing): this is MFU, not hardware FLOPs utilisation. Both sides are divided by the same count,
so the MFU ratio equals the throughput ratio. Work a side does beyond it is its overhead: PEFT's
trainable-token layers build a merged copy of the whole [V, H] table in every forward and, through the
tied head, compute the full [V, H] weight gradient (2 V H per token) to keep n_new rows of it.
Peak: dense bf16 tensor FLOP/s from the data sheet of the GPU found (H100 SXM / H200 989.4 TFLOP/s,
H100 PCIe 756, A100 312), or ``--peak-tflops``. The table is printed last. The whole run is kept inside ``--budget`` seconds
(default 480): a side that would run past it is stopped and reported as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_train import RESULT_TAG, run_worker, write_run_config  # noqa: E402

GEMMA3_TOKENS = 262_144
EXTENDED_VOCAB = 282_738  # the extended vocabulary the default --new-tokens makes
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


# ---------------------------------------------------------------- inputs


def make_tokenizer(out: Path, size: int, extra: int = 0) -> Path:
    """A word-level tokenizer: Gemma's 4 special ids, words t4 .. t{size-1}, then n0 .. n{extra-1}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update((f"t{i}", i) for i in range(len(SPECIALS), size))
    vocab.update((f"n{j}", size + j) for j in range(extra))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_shards(work: Path, tokenizer: Path, vocab: int, seq_len: int, sequences: int, workers: int) -> Path:
    """korcpt shards of random words from the whole extended vocabulary, >= ``sequences`` windows."""
    import numpy as np

    from korcpt.shards.format import load_manifest
    from korcpt.shards.writer import ShardOptions, write_shards

    out = work / f"shards_{tokenizer.name}_{seq_len}_{sequences}"
    if (out / "manifest.json").is_file():
        return out
    words = np.array(_tokenizer_words(tokenizer), dtype=object)
    if len(words) != vocab - len(SPECIALS):
        raise SystemExit(f"{tokenizer}: {len(words)} words, expected {vocab - len(SPECIALS)}")
    rng = np.random.default_rng(0)
    need = int(sequences * seq_len * 1.05) + seq_len
    corpus = work / "corpus.jsonl"
    written = 0
    with open(corpus, "w", encoding="utf-8") as fh:
        while written < need:
            n = int(rng.integers(seq_len // 4, 2 * seq_len))
            fh.write(json.dumps({"text": " ".join(words[rng.integers(0, len(words), n)]), "source": "synthetic"}) + "\n")
            written += n + 2  # <bos> .. <eos>
    write_shards(corpus, out, ShardOptions(tokenizer=str(tokenizer), seq_len=seq_len, val_fraction=0.0,
                                           shard_tokens=1 << 24, seed=1, workers=workers))
    have = sum(s["sequences"] for s in load_manifest(out)["shards"] if s["split"] == "train")
    if have < sequences:
        raise SystemExit(f"built {have} sequences, expected at least {sequences}")
    return out


def _tokenizer_words(tokenizer: Path) -> list[str]:
    vocab = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    return [w for w in vocab if w not in SPECIALS]


def arch_with_vocab(arch_path: Path, vocab: int | None) -> dict:
    arch = json.loads(arch_path.read_text(encoding="utf-8"))
    if vocab is not None:
        (arch["text_config"] if "text_config" in arch else arch)["vocab_size"] = vocab
    return arch


def make_base_model(out: Path, arch: dict, base_tokenizer: Path) -> None:
    """Worker: the architecture with random bf16 weights (built on the GPU when there is one), saved
    with the base tokenizer as a local HuggingFace model directory."""
    import torch
    from transformers import AutoTokenizer

    from korcpt.model.load import model_from_arch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = model_from_arch(arch, None, dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_tokenizer).save_pretrained(tmp)
    tmp.rename(out)


# ---------------------------------------------------------------- FLOPs


def flops_per_token(arch: dict, vocab_rows: int, seq_len: int, r: int, new_rows: int) -> dict:
    """Model FLOPs per processed token of a LoRA run (module docstring): the trainer's own count,
    :func:`korcpt.model.flops.arch_flops_per_token`, so training_info.json's MFU is this one."""
    from korcpt.model.flops import arch_flops_per_token

    return arch_flops_per_token(arch, vocab_rows, seq_len, r, new_rows)


def side_mfu(flops: dict, processed_tokens: int, train_seconds: float, peak: float | None) -> float | None:
    """MFU of a side that processed ``processed_tokens`` tokens in ``train_seconds``, at ``peak`` FLOP/s:
    the trainer's formula (:func:`korcpt.train.metrics.mfu`) on one device."""
    from korcpt.train.metrics import mfu

    return mfu(processed_tokens / train_seconds, flops["total"], peak / 1e12 if peak else None)


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """FLOP/s: --peak-tflops, else the datasheet table the trainer's MFU uses (korcpt.train.metrics)."""
    from korcpt.train.metrics import datasheet_peak_tflops

    tflops = override_tflops or datasheet_peak_tflops(device_name)
    return tflops * 1e12 if tflops else None


# ---------------------------------------------------------------- main


def device_worker(kind: str, spec: str) -> int:
    """``--worker makebase SPEC.json`` builds the base model; korcpt/hf are bench_train's workers."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if kind == "makebase":
        s = json.loads(Path(spec).read_text(encoding="utf-8"))
        make_base_model(Path(s["out"]), s["arch"], Path(s["base_tokenizer"]))
        print(RESULT_TAG + json.dumps({"side": "makebase"}), flush=True)
        return 0
    from bench_train import worker_main

    return worker_main(kind, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["korcpt", "hf", "makebase"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny multimodal Gemma 3 (CI)")
    ap.add_argument("--model", default="medgemma-4b", help="architecture in configs/models (medgemma-4b, medgemma-27b)")
    ap.add_argument("--embeddings", choices=["new_tokens", "frozen"], default="new_tokens")
    ap.add_argument("--new-tokens", type=int, default=EXTENDED_VOCAB - GEMMA3_TOKENS, help="tokens added to the vocabulary")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per side")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="korcpt train.loss_chunk_tokens (0: plain loss)")
    ap.add_argument("--sides", default="korcpt,hf", help="which sides to run, in order")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds the whole benchmark may take")
    ap.add_argument("--work", default="/tmp/korcpt_gpu_bench", help="work directory (reused between runs)")
    args = ap.parse_args()
    if args.worker:
        return device_worker(args.worker, args.config)

    started = time.perf_counter()
    if args.smoke:  # the same code path at toy size: multimodal Gemma 3, 1,024 + 64 words, float32 on CPU
        args.model, base_size, args.new_tokens = str(ROOT / "configs/models/tiny_gemma3_mm.json"), 1024, 64
        args.seq_len, args.micro, args.accum, args.steps, args.loss_chunk = 64, 2, 2, 3, 32
        args.work = str(Path(args.work) / "smoke")
        gpu, threads = False, 1
    else:
        base_size, threads = GEMMA3_TOKENS, None
        gpu = shutil.which("nvidia-smi") is not None
        if not gpu:
            raise SystemExit("no NVIDIA GPU found (nvidia-smi); on CPU run bench/gpu.py --smoke")
    arch_path = Path(args.model) if Path(args.model).suffix == ".json" else ROOT / "configs/models" / f"{args.model}.json"
    if not arch_path.is_file():
        raise SystemExit(f"--model: no architecture config {arch_path}")
    new = args.new_tokens  # frozen embeddings keep the extended vocabulary (same compute), training no row
    vocab = base_size + new
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def remaining() -> float:
        return args.budget - (time.perf_counter() - started)

    print(f"preparing inputs in {work} ...", flush=True)
    base_tok = make_tokenizer(work / f"tok_base_{base_size}", base_size)
    ext_tok = make_tokenizer(work / f"tok_ext_{base_size}_{new}", base_size, new)
    sequences = args.steps * args.accum * args.micro
    shards = make_shards(work, ext_tok, vocab, args.seq_len, sequences, workers=1 if args.smoke else 0)
    base_arch = arch_with_vocab(arch_path, None if not args.smoke else base_size)
    if args.embeddings == "new_tokens":
        key = hashlib.sha256(json.dumps(base_arch, sort_keys=True).encode()).hexdigest()[:12]
        model_dir = work / f"base_{arch_path.stem}_{key}"
        if not (model_dir / "config.json").is_file():
            spec = work / "makebase.json"
            spec.write_text(json.dumps({"out": str(model_dir), "arch": base_arch, "base_tokenizer": str(base_tok)}))
            t0 = time.perf_counter()
            r = run_worker(Path(__file__), "makebase", spec, work / "makebase.log", timeout=max(remaining(), 1),
                           threads=threads)
            if "error" in r:
                print(f"building the base model failed: {r['error']} (log {work / 'makebase.log'})")
                return 1
            print(f"random base model saved in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
        model = {"name": str(model_dir), "tokenizer": str(ext_tok), "random_init": False}
    else:  # frozen embeddings: no new rows, so the random model can take its vocabulary from the tokenizer
        model = {"name": str(arch_path), "tokenizer": str(ext_tok), "random_init": True}
    config = write_run_config(work / "run.yaml", {
        "data": {"shards": str(shards), "verify_checksums": True},
        "model": {**model, "dtype": "bfloat16" if gpu else "float32", "attn_implementation": "sdpa",
                  "device": "cuda" if gpu else "cpu", "gradient_checkpointing": args.grad_ckpt},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "use_rslora": True, "target_modules": "all-linear",
                 "embeddings": args.embeddings},
        "train": {"lr": 2e-5, "micro_batch_size": args.micro, "grad_accum": args.accum, "max_steps": args.steps,
                  "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 1.0, "seed": 42, "log_steps": 1,
                  "save_steps": 0, "loss_chunk_tokens": args.loss_chunk},
        "eval": {"steps": 0},
        "output": {"dir": str(work / "out")},
    })
    from korcpt.model.embeddings import padded_vocab

    vocab_rows = padded_vocab(vocab)
    flops = flops_per_token(arch_with_vocab(arch_path, None if not args.smoke else base_size), vocab_rows,
                            args.seq_len, 16, new if args.embeddings == "new_tokens" else 0)
    print(f"inputs ready after {time.perf_counter() - started:.0f} s; {flops['total'] / 1e9:.2f} GFLOP per token "
          f"(N_frozen {flops['n_frozen'] / 1e9:.3f}B, N_lora {flops['n_lora'] / 1e6:.1f}M)", flush=True)

    results = []
    for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
        left = remaining() - 5
        if left < 30:
            results.append({"side": side, "error": f"skipped: {remaining():.0f} s of the budget left"})
            continue
        try:
            r = run_worker(Path(__file__), side, config, work / f"{side}.log", timeout=left, threads=threads)
        except Exception as exc:  # noqa: BLE001 - a timeout or a crash of one side still prints the table
            r = {"side": side, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
        results.append(r)
        print(f"  {side}: {r.get('tokens_per_sec', 0):.0f} tokens/s" if "error" not in r else f"  {side}: {r['error']}",
              flush=True)

    print(f"benchmark finished in {time.perf_counter() - started:.0f} s (budget {args.budget:.0f} s)\n")
    print(format_table(args, arch_path.stem, vocab_rows, flops, results), flush=True)
    return 0 if all("error" not in r for r in results) else 1


def format_table(args, model: str, vocab_rows: int, flops: dict, results: list[dict]) -> str:
    """The result table: one row per side, then the ratio."""
    processed = args.steps * args.accum * args.micro * args.seq_len  # tokens through the model per side
    device = next((r["device"] for r in results if r.get("device")), "?")
    peak = peak_flops(device, args.peak_tflops)
    mfu_note = (f"MFU = {flops['total'] / 1e9:.4g} GFLOP/token x {processed:,} tokens / train s / "
                f"{peak / 1e12:g} TFLOP/s peak" if peak else "MFU n/a: no peak FLOP/s known for this device (--peak-tflops)")
    lines = [
        f"{model} on {device}: {vocab_rows:,} vocabulary rows, embeddings {args.embeddings}, LoRA r=16 alpha=32 "
        f"rsLoRA all-linear, {args.micro} x {args.seq_len} tokens x {args.accum} accumulation, {args.steps} steps, "
        f"checkpointing {'on' if args.grad_ckpt else 'off'}, korcpt loss chunk {args.loss_chunk or 'off'}",
        mfu_note,
        f"{'side':8s} {'tokens/s':>10s} {'train s':>8s} {'MFU':>7s} {'peak mem GiB':>12s} {'trainable':>12s} "
        f"{'process s':>9s}  loss first -> last",
    ]
    ok = {}
    for r in results:
        name = {"korcpt": "korcpt", "hf": "HF"}.get(r["side"], r["side"])
        if "error" in r:
            lines.append(f"{name:8s} failed: {r['error']}")
            continue
        ok[r["side"]] = r
        mfu = f"{100 * side_mfu(flops, processed, r['train_seconds'], peak):6.2f}%" if peak else "n/a"
        mem = r.get("peak_cuda_gib", r["peak_rss_gib"])
        lines.append(f"{name:8s} {r['tokens_per_sec']:10.1f} {r['train_seconds']:8.1f} {mfu:>7s} {mem:12.2f} "
                     f"{r['trainable_params']:12,d} {r['process_seconds']:9.1f}  "
                     f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    if "korcpt" in ok and "hf" in ok:
        lines.append(f"ratio korcpt / HF: tokens/s {ok['korcpt']['tokens_per_sec'] / ok['hf']['tokens_per_sec']:.2f}")
    if ok and not any("peak_cuda_gib" in r for r in ok.values()):
        lines.append("peak mem: peak RSS of the process (no GPU); on a GPU torch.cuda.max_memory_allocated()")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
