"""What the distillation stage costs and what it buys: seconds and held-out bits per character per budget.

    .venv/bin/python bench/bench_distill.py                                  # the shipped budget, float32 and bf16
    .venv/bin/python bench/bench_distill.py --variant dtype=bfloat16,output_positions=8192
    .venv/bin/python bench/bench_distill.py --smoke                          # 64 new tokens, a check that it runs

The demo's data and extended tokenizer are built once (``tools/demo.py build_data``, no rows); then
each variant runs ``korcpt.model.distill.distill_rows`` (the shipped ``DistillOptions`` with the
variant's fields replaced) and the untrained extended model that reads its rows is scored on
``data/heldout/medical_ko.txt`` (never trained on), as ``bench_quality.py`` scores it. The table gives
each variant's seconds (its stages from the report), tokens read, FLOPs and bits per character against
the base model and against the first variant. Run it alone: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_quality import HELD_OUT, held_out_texts, score  # noqa: E402

DEFAULT_VARIANTS = ["dtype=float32", "dtype=bfloat16"]


def parse_variant(text: str) -> dict:
    """``key=value,key=value`` over DistillOptions fields, each value read as its field's type."""
    from korcpt.model.distill import DistillOptions

    types = {f.name: f.type for f in dataclasses.fields(DistillOptions)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--variant: {key!r} is not a DistillOptions field ({', '.join(types)})")
        kind = {"int": int, "float": float}.get(str(types[key]), str)
        out[key] = kind(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/demo_270m.yaml"))
    ap.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE,...",
                    help=f"DistillOptions fields to replace; repeatable (default: {' and '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench_distill")
    ap.add_argument("--smoke", action="store_true", help="64 new tokens, 4 texts, 2 output steps")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    if args.smoke:
        args.new_tokens = 64
        variants = [{**v, "output_steps": 2, "output_positions": 512} for v in variants]

    import demo

    from korcpt.config import load_config
    from korcpt.model.distill import DistillOptions, distill_rows

    work = args.workdir
    cfg = load_config(args.config, [f"data.shards={work / 'shards'}", f"model.tokenizer={work / 'tokenizer'}"],
                      check_files=False)
    demo.build_data(cfg, 256, args.new_tokens, distill=False)
    texts = held_out_texts()[:4] if args.smoke else held_out_texts()
    base = score(cfg.model.name, texts)
    rows = []
    for i, variant in enumerate(variants):
        opts = dataclasses.replace(DistillOptions(model=cfg.model.name, tokenizer=work / "tokenizer",
                                                  corpus=work / "raw_text_mixed.jsonl", out_dir=work / f"rows-{i}",
                                                  seed=cfg.train.seed), **variant)
        start = time.perf_counter()
        report = distill_rows(opts)
        seconds = time.perf_counter() - start
        scored = score(cfg.model.name, texts, tokenizer=work / "tokenizer", new_rows=opts.out_dir)
        rows.append((variant, seconds, report, scored))
    print(table(base, rows, args))
    return 0


def table(base: dict, rows: list, args) -> str:
    first = rows[0][3]["bpc"]
    lines = [f"distillation of +{rows[0][2]['new_tokens']} rows on the demo's data; held-out bits/char of the "
             f"untrained extended model, {HELD_OUT.name}; base {base['bpc']:.3f}",
             f"{'variant':44s} {'seconds':>8s} {'input s':>8s} {'output s':>8s} {'tokens read':>12s} "
             f"{'FLOPs':>9s} {'bpc':>6s} {'vs base':>8s} {'vs first':>8s}"]
    for variant, seconds, report, scored in rows:
        name = ",".join(f"{k}={v}" for k, v in variant.items()) or "shipped"
        stages = report["stage_seconds"]
        lines.append(f"{name:44s} {seconds:8.1f} {stages['input_rows']:8.1f} {stages['output_rows']:8.1f} "
                     f"{report['cost']['tokens_read']:12,d} {report['cost']['flops']:9.3g} {scored['bpc']:6.3f} "
                     f"{scored['bpc'] / base['bpc'] - 1:+8.1%} {scored['bpc'] / first - 1:+8.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
