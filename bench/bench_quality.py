"""Is the extended model better than the one it started from? Bits per character on held-out text.

    .venv/bin/python bench/bench_quality.py                 # the demo's data and model, 20 steps a run
    .venv/bin/python bench/bench_quality.py --steps 40      # longer runs
    .venv/bin/python bench/bench_quality.py --smoke         # 2 steps, 4 texts: that it runs (~9 min here)

Every row is scored by :func:`korcpt.eval.perplexity.score_text` on ``data/heldout/medical_ko.txt``
(20 sentences written for korcpt, never trained on): bits per character, which, unlike per-token
perplexity, compares a base tokenizer with an extended one on the same text. The rows:

* ``base``: the pretrained model with its own tokenizer, untrained.
* ``untrained``: the extended model before training under each initialisation of the new rows: the
  shipped tied mean of the pieces, and untied variants (EEVE's first piece as output row, the last
  piece as input row, an output logit offset through the bias direction ``u``); with the softmax mass
  63 padding rows would take.
* ``lora only``: LoRA on shards of the same corpus made with the base tokenizer, embeddings frozen.
* ``extended``: LoRA + the new rows (``lora.embeddings: new_tokens``), shipped initialisation, trained
  jointly or staged (``lora.embeddings_first_steps``: the rows alone first, as EEVE does).

Every trained row takes the same optimizer steps of the same number of sequences of ``seq_len``
tokens, so equal steps are equal training tokens; the extended tokenizer packs more characters into
them (``~chars trained``: tokens at the held-out text's characters per token). Data, vocabulary extension and shards are built once by the
demo's own ``build_data`` (``tools/demo.py``), and every run goes through ``korcpt.train.loop.train``
with the demo's config and these overrides.
"""

from __future__ import annotations

import argparse
import json
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


def variants(steps: int, work: Path, stages: list[int]) -> list[tuple[str, list[str]]]:
    """(row name, config overrides) of every trained model."""
    rows = [("lora only (base tokenizer)", [f"data.shards={work / 'base_shards'}", "model.tokenizer=''",
                                            "lora.embeddings=frozen"])]
    rows.append(("extended, joint", []))
    rows += [(f"extended, rows first {n} of {steps}", [f"lora.embeddings_first_steps={n}"]) for n in stages]
    return rows


def build(work: Path, base_cfg: str, steps: int, seq_len: int, new_tokens: int, overrides: list[str]) -> dict:
    """The demo's data (extended tokenizer and its shards) plus shards of the same corpus with the base tokenizer."""
    import demo

    from korcpt.config import load_config
    from korcpt.shards.writer import ShardOptions, write_shards

    sets = [f"data.shards={work / 'shards'}", f"model.tokenizer={work / 'tokenizer'}", f"train.max_steps={steps}",
            "train.save_steps=0", "eval.steps=0", "eval.mcq_file=", *overrides]
    draft = load_config(base_cfg, sets, check_files=False)
    built = demo.build_data(draft, seq_len, new_tokens)
    write_shards(work / "raw_text_mixed.jsonl", work / "base_shards", ShardOptions(
        tokenizer=draft.model.name, seq_len=seq_len, val_fraction=0.05, seed=draft.train.seed, workers=1))
    return {"sets": sets, "new_tokens": built["vocab"].get("new_tokens")}


def held_out_texts() -> list[str]:
    from korcpt.eval.perplexity import read_documents

    return read_documents(HELD_OUT)[0]


def score(model_name: str, texts: list[str], **kwargs) -> dict:
    from korcpt.eval.loading import load_for_eval
    from korcpt.eval.perplexity import score_text

    return score_text(*load_for_eval(model_name, **kwargs), texts)


def train_row(base_cfg: str, sets: list[str], extra: list[str], out: Path) -> tuple[dict, dict]:
    """Train one variant; returns (training_info, the trained model's held-out score)."""
    from korcpt.config import load_config
    from korcpt.train.loop import train

    cfg = load_config(base_cfg, [*sets, *extra, f"output.dir={out}", "output.adapter=last"])
    info = train(cfg)
    return info, score(cfg.model.name, held_out_texts(), adapter=out, tokenizer=cfg.model.tokenizer or None)


def chars_trained(info: dict, tokens_per_100_chars: float) -> float:
    """Characters the run's tokens cover, at the held-out text's density (an estimate)."""
    return info["tokens_seen"] * 100.0 / tokens_per_100_chars


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


def bias_direction(model, tokenizer, texts: list[str]):
    """u with h . u ~= 1 for the final hidden states h (ridge fit on ``texts``): adding c * u to an output
    row adds about c to its logit at every position, the bias Gemma's head does not have."""
    import torch

    h = torch.cat([hidden for hidden, _ in _final_hidden(model, tokenizer, texts)]).double()
    ridge = h.T @ h + 1e-2 * len(h) * torch.eye(h.shape[1], dtype=h.dtype)
    return torch.linalg.solve(ridge, h.T @ torch.ones(len(h), dtype=h.dtype)).float()


def pad_row_mass(model, tokenizer, texts: list[str], pad_row, count: int = 63) -> float:
    """Mean softmax mass over held-out positions that ``count`` padding rows equal to ``pad_row`` would
    take (63: the most a vocabulary padded to a multiple of 64 has)."""
    import torch

    masses = [count * torch.exp(hidden @ pad_row - torch.logsumexp(logits, -1))
              for hidden, logits in _final_hidden(model, tokenizer, texts)]
    return torch.cat(masses).mean().item()


def init_study(model_name: str, work: Path, texts: list[str], fit_texts: list[str]) -> list[tuple[str, dict]]:
    """Held-out scores of the untrained extended model under each initialisation of the new rows, each
    with the softmax mass that padding rows (initialised to the mean of all rows) would take."""
    import torch

    from korcpt.eval.loading import load_for_eval
    from korcpt.eval.perplexity import score_text
    from korcpt.model.embeddings import piece_ids

    base_model, base_tok = load_for_eval(model_name)
    u = bias_direction(base_model, base_tok, fit_texts)
    del base_model
    model, tok = load_for_eval(model_name, tokenizer=work / "tokenizer")
    emb = model.get_input_embeddings().weight
    rows = emb.detach().clone()
    pieces = {i: piece_ids(base_tok, tok, i) for i in range(len(base_tok), len(tok))}
    pad_mass = pad_row_mass(model, tok, texts, rows[: len(base_tok)].mean(0))
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(rows.clone())  # untied: the study sets each side on its own

    def normed(v, ids):  # to the pieces' mean norm: a mean of near-orthogonal rows is shorter than each
        return v * (rows[ids].norm(dim=1).mean() / v.norm())

    def mean(ids):
        return rows[ids].mean(0)

    def mix(ids):
        return 0.5 * rows[ids].mean(0) + 0.5 * rows[ids[-1]]

    variants = {  # name: (input row, output row)
        "mean, tied (shipped)": (mean, mean),
        "mean+last, tied": (mix, mix),
        "mean in, first piece out (EEVE)": (mean, lambda ids: rows[ids[0]]),
        "last in, mean out": (lambda ids: rows[ids[-1]], mean),
        "mean+last normed in, mean+u out": (lambda ids: normed(mix(ids), ids), lambda ids: mean(ids) + u),
    }
    out = []
    for name, (inp, outp) in variants.items():
        with torch.no_grad():
            for i, ids in pieces.items():
                emb[i], head.weight[i] = inp(ids), outp(ids)
        out.append((f"untrained: {name}", {**score_text(model, tok, texts), "pad_mass": pad_mass}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/demo_270m.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of every trained row")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench_quality")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny steps and texts (a check that it runs)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seq_len, args.new_tokens = 2, 64, 64
        args.set += ["train.micro_batch_size=1", "train.grad_accum=1", "train.warmup_steps=0"]
    start = time.time()
    work = args.workdir
    built = build(work, args.config, args.steps, args.seq_len, args.new_tokens, args.set)
    from korcpt.config import load_config

    cfg = load_config(args.config, built["sets"])
    texts = held_out_texts()[:4] if args.smoke else held_out_texts()
    fit = [json.loads(line)["text"] for line in (work / "raw_text_mixed.jsonl").read_text(encoding="utf-8").splitlines()]
    fit = [t for t in fit if len(t) < 400][: 8 if args.smoke else 160]  # training text, never the held-out
    results = [("base", score(cfg.model.name, texts), None)]
    results += [(name, r, None) for name, r in init_study(cfg.model.name, work, texts, fit)]
    stages = [1] if args.smoke else sorted({args.steps // 4, args.steps // 2})
    for name, extra in variants(args.steps, work, stages):
        info, result = train_row(args.config, built["sets"], extra, work / "runs" / str(len(results)))
        results.append((name, result, info))
    print(table(results, built, args, time.time() - start))
    return 0


def table(results: list[tuple[str, dict, dict | None]], built: dict, args, seconds: float) -> str:
    base_bpc = results[0][1]["bpc"]
    lora = next(r for n, r, _ in results if n.startswith("lora only"))
    pad = next(r["pad_mass"] for _, r, _ in results if "pad_mass" in r)
    lines = [f"held-out bits/char, {HELD_OUT.name} ({results[0][1]['chars']} chars, never trained on); "
             f"+{built['new_tokens']} tokens; {args.steps} steps of {args.seq_len}-token sequences a trained row; "
             f"{seconds:.0f} s",
             f"{'model':40s} {'bpc':>6s} {'vs base':>8s} {'vs lora':>8s} {'tok/100ch':>9s} {'tokens trained':>14s}"
             f" {'~chars trained':>14s}"]
    for name, r, info in results:
        trained = (f"{info['tokens_seen']:14,d} {chars_trained(info, r['tokens_per_100_chars']):14,.0f}"
                   if info else f"{'-':>14s} {'-':>14s}")
        lines.append(f"{name:40s} {r['bpc']:6.3f} {r['bpc'] / base_bpc - 1:+8.1%} {r['bpc'] / lora['bpc'] - 1:+8.1%} "
                     f"{r['tokens_per_100_chars']:9.1f} {trained}")
    lines.append(f"63 padding rows (the most a multiple of 64 adds), at the mean of all rows, would take "
                 f"{pad:.2e} of the softmax mass per position")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
