"""KorMedMCQA accuracy of a base model or a trained adapter, by likelihood (no generation).

    python tools/eval_mcq.py --model gemma3-270m --data test.jsonl --out base.json
    python tools/eval_mcq.py --model gemma3-270m --adapter outputs/run --data test.jsonl \\
        --fewshot fewshot.jsonl --shots 5 --mode letter --out adapter.json --predictions adapter.jsonl

letter: the prompt lists the options and ends in "정답:"; the answer is the letter among A..E with the
highest next-token probability. choice: each option's text is scored after the question (accuracy is
per-character normalised, accuracy_raw is the plain sum). See korcpt/eval/mcq.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import add_model_arguments, add_options, emit_report, run_tool
from korcpt.config import EvalConfig
from korcpt.errors import DataError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--data", type=Path, required=True, help="KorMedMCQA JSONL (question, A..E, answer 1-based)")
    ap.add_argument("--fewshot", type=Path, help="few-shot examples in the same format (default pool: --data itself)")
    add_options(ap, EvalConfig, "mcq_shots", "mcq_mode", "mcq_max_questions",  # scored as training evaluates
                mcq_shots={"flag": "--shots", "dest": "shots"}, mcq_mode={"flag": "--mode", "dest": "mode"},
                mcq_max_questions={"flag": "--max-questions", "dest": "max_questions"})
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    ap.add_argument("--out", type=Path, help="write the report (without per-question predictions) as JSON here")
    ap.add_argument("--predictions", type=Path, help="write one JSON line per question here")
    args = ap.parse_args(argv)
    if args.shots < 0:
        ap.error(f"--shots must be >= 0, found {args.shots}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from korcpt.eval.loading import load_from_arguments
    from korcpt.eval.mcq import load_mcq, score_mcq
    from korcpt.log import get_logger

    log = get_logger("eval_mcq")
    items, skipped = load_mcq(args.data)  # skipped lines are logged and counted by score_mcq
    if not items:
        raise DataError(f"{args.data}: no valid question ({len(skipped)} lines skipped)")
    fewshot = None
    if args.fewshot:
        fewshot, few_skipped = load_mcq(args.fewshot)
        for message in few_skipped[:10]:
            log.warning("few-shot skipped %s", message)
    model, tokenizer = load_from_arguments(args)
    start = time.perf_counter()
    report = score_mcq(model, tokenizer, items, mode=args.mode, fewshot=fewshot, shots=args.shots,
                       batch_size=args.batch_size, max_questions=args.max_questions, skipped=skipped)
    seconds = time.perf_counter() - start
    predictions = report.pop("predictions")
    report.update(model=args.model, adapter=str(args.adapter) if args.adapter else None, data=str(args.data),
                  seconds=round(seconds, 3), questions_per_s=round(report["n"] / seconds, 3) if seconds else None)
    if args.predictions:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        with open(args.predictions, "w", encoding="utf-8") as fh:
            for p in predictions:
                fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    low, high = report["ci95"]
    emit_report(report, args.out, f"{args.mode} accuracy {report['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, "
                f"chance 0.20) on {report['n']} questions, {report['n_skipped']} skipped, {args.shots}-shot")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
