"""KorMedMCQA evaluation throughput on CPU: questions/s of the tiny model and the real Gemma 3 270M.

    .venv/bin/python bench/bench_eval.py [--questions-270m 12] [--shots 0] [--batch-size 8] [--skip-270m]

Scores the project's sample questions (``data/sample/kormedmcqa/test.jsonl``, KorMedMCQA format, few-shot
examples from ``fewshot.jsonl``) in ``letter`` mode (one forward per question, logits of the last
position only) and ``choice`` mode (five continuations per question). Models: the tiny random Gemma 3
of ``configs/models/tiny_gemma3.json`` with the ``tiny-ko`` tokenizer, and the real pretrained Gemma 3
270M (preset ``gemma3-270m``, float32; skipped with a message when its package is absent). Prints
questions per wall-clock second and per CPU-second of this process (steadier on a shared machine),
and the accuracy, which for the 270M is a sanity check only (60 sample questions, not KorMedMCQA).

Last run (torch 2.13 CPU, 2 shared cores under a load average of about 7, batch 8, 0-shot):

    model                    mode   questions  q/s (wall)   q/CPU-s  accuracy
    tiny (2x64, vocab 4k)    letter        60       11.21     24.64     0.183
    tiny (2x64, vocab 4k)    choice        60        6.39     13.91     0.200
    gemma3-270m (fp32)       letter        12        0.51      0.96     0.167
    gemma3-270m (fp32)       choice        12        0.16      0.32     0.333

A 5-shot letter prompt is about 600 Gemma tokens (0-shot about 100), so 5-shot costs roughly 5x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")

SAMPLE = ROOT / "data" / "sample" / "kormedmcqa"


def tiny_model():
    from korcpt.config import ModelConfig
    from korcpt.model.load import load_model_and_tokenizer

    import torch

    mcfg = ModelConfig(name=str(ROOT / "configs" / "models" / "tiny_gemma3.json"), tokenizer="tiny-ko",
                       random_init=True, dtype="float32")
    model, tok, _ = load_model_and_tokenizer(mcfg, torch.device("cpu"), seed=0)
    return model.eval(), tok


def gemma_270m():
    from korcpt.errors import ModelError
    from korcpt.eval.loading import load_for_eval

    try:
        return load_for_eval("gemma3-270m", dtype="float32")
    except ModelError as exc:
        print(f"skipping Gemma 3 270M: {exc}")
        return None


def measure(model, tok, items, fewshot, mode: str, shots: int, batch_size: int) -> dict:
    from korcpt.eval.mcq import score_mcq

    score_mcq(model, tok, items[:1], mode=mode, fewshot=fewshot, shots=shots, batch_size=batch_size)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    report = score_mcq(model, tok, items, mode=mode, fewshot=fewshot, shots=shots, batch_size=batch_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"n": report["n"], "wall": wall, "q_s": report["n"] / wall, "q_cpu_s": report["n"] / cpu,
            "accuracy": report["accuracy"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions-tiny", type=int, default=60, help="questions scored with the tiny model")
    ap.add_argument("--questions-270m", type=int, default=12, help="questions scored with Gemma 3 270M")
    ap.add_argument("--shots", type=int, default=0, help="few-shot examples per prompt")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--skip-270m", action="store_true")
    args = ap.parse_args()

    import torch

    from korcpt.eval.mcq import load_mcq

    items, _ = load_mcq(SAMPLE / "test.jsonl")
    fewshot, _ = load_mcq(SAMPLE / "fewshot.jsonl")
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load average "
          f"{load:.1f}, batch {args.batch_size}, {args.shots}-shot, {len(items)} sample questions")
    models = [("tiny (2x64, vocab 4k)", tiny_model, args.questions_tiny)]
    if not args.skip_270m:
        models.append(("gemma3-270m (fp32)", gemma_270m, args.questions_270m))
    rows = []
    for name, build, n in models:
        loaded = build()
        if loaded is None:
            continue
        model, tok = loaded
        for mode in ("letter", "choice"):
            r = measure(model, tok, items[:n], fewshot, mode, args.shots, args.batch_size)
            rows.append((name, mode, r))
            print(f"  {name:24s} {mode:6s} done in {r['wall']:.1f} s", flush=True)
        del model
    print()
    print(f"{'model':24s} {'mode':6s} {'questions':>9s} {'q/s (wall)':>11s} {'q/CPU-s':>9s} {'accuracy':>9s}")
    for name, mode, r in rows:
        print(f"{name:24s} {mode:6s} {r['n']:9d} {r['q_s']:11.2f} {r['q_cpu_s']:9.2f} {r['accuracy']:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
