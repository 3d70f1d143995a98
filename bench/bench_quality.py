"""Is the extended model better than the one it started from? Bits per character on held-out text.

    .venv/bin/python bench/bench_quality.py                 # the demo's data and model; 20, 60 and 120 steps
    .venv/bin/python bench/bench_quality.py --steps 20 40   # a shorter curve
    .venv/bin/python bench/bench_quality.py --smoke         # 1 and 2 steps, 4 texts: that it runs

Every row is scored by :func:`korcpt.eval.perplexity.score_text` on ``data/heldout/medical_ko.txt``
(20 sentences written for korcpt, never trained on): bits per character, which, unlike per-token
perplexity, compares a base tokenizer with an extended one on the same text. The rows:

* ``base``: the pretrained model with its own tokenizer, untrained.
* ``untrained``: the extended model before training: the new rows at the mean of their pieces (tied,
  the default without distillation), and distilled input rows (``korcpt.model.distill``, the demo's
  budget) with each kind of output row: tied, mean of the pieces, piece-probability fit, next-token
  prediction; with the softmax mass 63 padding rows would take.
* ``lora only``: LoRA on shards of the same corpus made with the base tokenizer, embeddings frozen.
* ``extended, mean``: LoRA + the new rows (``lora.embeddings: new_tokens``) from the mean of their pieces.
* ``extended, distilled``: the same from the distilled rows (``model.new_rows``, untied head).

The budget curve: each trained model is one run of ``max(--steps)`` steps (warmup, then cosine to 10%
over the whole run) that scores the held-out text at every evaluation (``eval.heldout_file``, every
``gcd(--steps)`` steps); the table reads its bits per character after each of ``--steps``. Every run
takes the same optimizer steps of the same number of sequences of ``seq_len`` tokens, so equal steps
are equal training tokens; the extended tokenizer packs more characters into them (``chars/s``: training tokens
per second at the held-out text's characters per token). Distillation's own time is printed with its
row. Data, vocabulary extension, distilled rows and shards are built once by the demo's own
``build_data`` (``tools/demo.py``), and every run goes through ``korcpt.train.loop.train`` with the
demo's config and these overrides.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HELD_OUT = ROOT / "data" / "heldout" / "medical_ko.txt"


def variants(work: Path) -> list[tuple[str, list[str]]]:
    """(row name, config overrides) of every trained model."""
    return [("lora only (base tokenizer)",
             [f"data.shards={work / 'base_shards'}", "model.tokenizer=''", "lora.embeddings=frozen"]),
            ("extended, mean rows", ["lora.embeddings=new_tokens"]),
            ("extended, distilled rows", ["lora.embeddings=new_tokens", f"model.new_rows={work / 'rows'}"])]


def build(work: Path, base_cfg: str, steps: list[int], seq_len: int, new_tokens: int, overrides: list[str]) -> dict:
    """The demo's data (extended tokenizer and its shards) plus shards of the same corpus with the base
    tokenizer; the overrides of a run of ``max(steps)`` steps that scores the held-out text at each of ``steps``."""
    import demo

    from korcpt.config import load_config
    from korcpt.shards.writer import write_shards

    sets = [f"data.shards={work / 'shards'}", f"model.tokenizer={work / 'tokenizer'}", f"train.max_steps={max(steps)}",
            "train.save_steps=0", f"eval.steps={math.gcd(*steps)}", f"eval.heldout_file={HELD_OUT}", "eval.mcq_file=",
            *overrides]
    draft = load_config(base_cfg, [*sets, f"model.new_rows={work / 'rows'}"], check_files=False)
    built = demo.build_data(draft, seq_len, new_tokens)
    write_shards(work / "raw_text_mixed.jsonl", work / "base_shards",
                 demo.shard_options(draft, seq_len, draft.model.name))
    return {"sets": sets, "new_tokens": built["vocab"].get("new_tokens"), "rows": built["rows"]}


def held_out_texts() -> list[str]:
    from korcpt.eval.perplexity import read_heldout_texts

    return read_heldout_texts(HELD_OUT)[0]


def score(model_name: str, texts: list[str], **kwargs) -> dict:
    from korcpt.eval.loading import load_for_eval
    from korcpt.eval.perplexity import score_text

    return score_text(*load_for_eval(model_name, **kwargs), texts)


def train_row(base_cfg: str, sets: list[str], extra: list[str], out: Path) -> dict:
    """Train one variant; its training_info (``history`` holds ``heldout_bpc`` of every evaluation)."""
    from korcpt.config import load_config
    from korcpt.train.loop import train

    return train(load_config(base_cfg, [*sets, *extra, f"output.dir={out}", "output.adapter=last"]))


def curve(info: dict) -> dict[int, float]:
    """Held-out bpc of a run at each evaluated step."""
    return {h["step"]: h["heldout_bpc"] for h in info["history"] if h.get("heldout_bpc") is not None}


# ---------------------------------------------------------------- the initialisation study (untrained rows)


def _final_hidden(model, tokenizer, texts: list[str]) -> list:
    """(final hidden states, logits) of each text scored from <bos>: the head's input and output."""
    import torch

    from korcpt.eval.perplexity import _document_ids

    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append((i[0][0], o[0].float())))
    with torch.no_grad():
        for text in texts:
            model(input_ids=torch.tensor([_document_ids(tokenizer, text)]))
    hook.remove()
    return seen


def pad_row_mass(model, tokenizer, texts: list[str], pad_row, count: int = 63) -> float:
    """Mean softmax mass over held-out positions that ``count`` padding rows equal to ``pad_row`` would
    take (63: the most a vocabulary padded to a multiple of 64 has)."""
    import torch

    masses = [count * torch.exp(hidden @ pad_row - torch.logsumexp(logits, -1))
              for hidden, logits in _final_hidden(model, tokenizer, texts)]
    return torch.cat(masses).mean().item()


def init_study(model_name: str, work: Path, texts: list[str], rows_report: dict) -> list[tuple[str, dict]]:
    """Held-out scores of the untrained extended model: the new rows at the mean of their pieces (tied), and
    the distilled input rows with each kind of output row (each fitted on the demo's windows as
    ``tools/distill_rows.py`` would), with the softmax mass padding rows (at the mean of all rows) would take."""
    import dataclasses

    import torch

    from korcpt.assets import load_tokenizer
    from korcpt.eval.loading import load_for_eval
    from korcpt.eval.perplexity import score_text
    from korcpt.model import distill
    from korcpt.model.embeddings import read_rows

    model, tok = load_for_eval(model_name, tokenizer=work / "tokenizer")
    base_tok = load_tokenizer(model_name)
    first, inputs, _ = read_rows(work / "rows")
    emb = model.get_input_embeddings().weight
    count = len(inputs)
    mean = emb.detach()[first:first + count].clone()
    pad_mass = pad_row_mass(model, tok, texts, emb.detach()[:first].mean(0))
    out = [("untrained: mean rows, tied", {**score_text(model, tok, texts), "pad_mass": pad_mass})]
    with torch.no_grad():
        emb[first:first + count] = inputs
    opts = distill.DistillOptions(**rows_report["options"])
    windows = distill.select_windows(distill.unique_texts(Path(opts.corpus)), base_tok, tok, first, opts)
    fit = distill.output_windows(windows, opts.output_positions, opts.seed)
    heads = {}
    for mode in distill.OUTPUT_MODES:
        heads[mode], _ = distill.output_rows(model, fit, base_tok, tok, mean, inputs, first, 0, "cpu",
                                             dataclasses.replace(opts, output=mode))
    model.get_output_embeddings().weight = torch.nn.Parameter(emb.detach().clone())  # untied for the study
    head = model.get_output_embeddings().weight
    for mode, rows in heads.items():
        with torch.no_grad():
            head[first:first + count] = rows
        out.append((f"untrained: distilled in, {mode} out", {**score_text(model, tok, texts), "pad_mass": pad_mass}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/demo_270m.yaml"))
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 60, 120],
                    help="the budget curve: held-out bpc after each of these optimizer steps of one run per model")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench_quality")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny steps and texts (a check that it runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seq_len, args.new_tokens = [1, 2], 64, 64
        args.set += ["train.micro_batch_size=1", "train.grad_accum=1", "train.warmup_steps=0"]
    start = time.time()
    work = args.workdir
    built = build(work, args.config, args.steps, args.seq_len, args.new_tokens, args.set)
    from korcpt.config import load_config

    cfg = load_config(args.config, built["sets"])
    texts = held_out_texts()[:4] if args.smoke else held_out_texts()
    untrained = [("base", score(cfg.model.name, texts))]
    untrained += init_study(cfg.model.name, work, texts, built["rows"])
    trained = [(name, train_row(args.config, built["sets"], extra, work / "runs" / f"{i}-{name.split(' ')[0]}"))
               for i, (name, extra) in enumerate(variants(work))]
    print(table(untrained, trained, built, args, time.time() - start))
    return 0


def table(untrained: list[tuple[str, dict]], trained: list[tuple[str, dict]], built: dict, args, seconds: float) -> str:
    """The untrained rows, then the budget curve: each trained model's held-out bpc at each budget,
    against the base and against LoRA only at the same step."""
    base = untrained[0][1]
    rows = built["rows"]
    lines = [f"held-out bits/char, {HELD_OUT.name} ({base['chars']} chars, never trained on); "
             f"+{built['new_tokens']} tokens; {args.seq_len}-token sequences; {seconds:.0f} s",
             f"distillation: {rows['seconds']:.0f} s, {rows['cost']['tokens_read']:,} tokens read "
             f"({rows['cost']['flops']:.3g} FLOPs), depth {rows['options']['depth']}, "
             f"{rows['options']['contexts_per_token']} contexts x {rows['options']['context_tokens']} tokens, "
             f"distance {rows['loss_mean_init']:.4f} -> {rows['loss_final']:.4f} on held-out windows",
             f"{'untrained':44s} {'bpc':>6s} {'vs base':>8s} {'tok/100ch':>9s} {'pad mass':>9s}"]
    for name, r in untrained:
        pad = f"{r['pad_mass']:9.2e}" if "pad_mass" in r else f"{'-':>9s}"
        lines.append(f"{name:44s} {r['bpc']:6.3f} {r['bpc'] / base['bpc'] - 1:+8.1%} {r['tokens_per_100_chars']:9.1f} {pad}")
    lines.append("pad mass: the softmax mass 63 padding rows (the most a multiple of 64 adds) at the mean of all rows "
                 "would take per position")
    density = {"lora only": base["tokens_per_100_chars"], "extended": untrained[1][1]["tokens_per_100_chars"]}
    lora = curve(trained[0][1])
    points = [0, *args.steps]  # 0: the run's own baseline evaluation, the untrained row again
    lines.append(f"trained: one run of {max(args.steps)} steps each (warmup, cosine to 10% over the run), "
                 "held-out bpc at each step (vs base / vs LoRA only at the same step)")
    lines.append(f"{'model':28s} {'tokens':>8s} {'~chars':>8s} {'train s':>8s} {'chars/s':>8s} "
                 + " ".join(f"{f'{s} steps':>22s}" for s in points))
    for name, info in trained:
        chars = info["tokens_seen"] * 100.0 / density[name.split(" (")[0].split(",")[0]]
        bpc = curve(info)
        cells = " ".join(f"{bpc[s]:6.3f} {bpc[s] / base['bpc'] - 1:+7.1%} {bpc[s] / lora[s] - 1:+7.1%}" for s in points)
        lines.append(f"{name:28s} {info['tokens_seen']:8,d} {chars:8,.0f} {info['train_seconds']:8.0f} "
                     f"{chars / info['train_seconds']:8.1f} {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
