"""The korcpt pipeline on a real model, on a laptop CPU: `make demo` (`make demo DEMO_ARGS=--extend`).

    raw sample data -> raw_text_mixed.jsonl [--extend: -> extended tokenizer -> distilled new-token rows]
    -> uint32 shards -> LoRA CPT
    -> validation perplexity and KorMedMCQA-format accuracy before and after -> a summary table
    -> bits per character on a held-out text written for korcpt and never trained on
       (data/heldout/medical_ko.txt): the base model with its own tokenizer, with --extend the
       extended model before training with the new rows at the mean of their pieces and distilled,
       and the trained model. Per-token perplexity cannot compare the two tokenizers; this can.

By default the demo keeps the base tokenizer and trains LoRA alone: at this budget (20 steps of
4 x 256 tokens) and up to 120 steps on this corpus that measured better in held-out bits per character
than the extended recipe (bench/README.md, "The budget curve"). ``--extend`` runs the recipe of
train_raw_korean_text.md: the vocabulary extension, distilled rows and LoRA + the new rows.
Sizes (sequence length, vocabulary extension, steps) are set for about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _bootstrap  # noqa: F401

from korcpt.cli import run_tool

SAMPLE = _bootstrap.ROOT / "data" / "sample"
HELD_OUT = _bootstrap.ROOT / "data" / "heldout" / "medical_ko.txt"
# windows per new token in the demo's distillation: half the default, so that on 2 CPU cores it takes
# under half of the training time (98 s of 210 s measured; the default 4 scored 1.3% better, bench/README.md)
DEMO_CONTEXTS = 2


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo_270m.yaml", help="run config of the training stage")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--extend", action="store_true",
                    help="extend the vocabulary and train LoRA + the new rows (the spec's recipe), not LoRA alone")
    ap.add_argument("--new-tokens", type=int, default=1024, help="with --extend: cap on tokens added to the vocabulary")
    ap.add_argument("--no-distill", dest="distill", action="store_false",
                    help="with --extend: start the new rows at the mean of their pieces instead of distilling them")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    return ap.parse_args(argv)


def extended_sets(cfg, distill: bool) -> list[str]:
    """The overrides that turn the demo's config into the extended recipe: the tokenizer, shards, rows and
    outputs in directories of their own (beside the base-tokenizer ones), the new rows trained."""
    work = Path(cfg.data.shards).parent / "extended"
    sets = [f"model.tokenizer={work / 'tokenizer'}", f"data.shards={work / 'shards'}", "lora.embeddings=new_tokens",
            f"output.dir={cfg.output.dir}_extended"]
    return sets + ([f"model.new_rows={work / 'rows'}"] if distill else [])


def shard_options(cfg, seq_len: int, tokenizer: str):
    """How the demo packs its corpus with ``tokenizer`` (the same for the base and the extended shards, so
    that runs on either see the same documents split the same way)."""
    from korcpt.shards.writer import ShardOptions

    return ShardOptions(tokenizer=tokenizer, seq_len=seq_len, val_fraction=0.05, seed=cfg.train.seed, workers=1)


def build_data(cfg, seq_len: int, new_tokens: int, distill: bool = True) -> dict:
    """Corpus, and, when the config names a tokenizer (``model.tokenizer``), the vocabulary extension into
    it and the distilled rows (``model.new_rows``, unless ``distill`` is off); then shards with that
    tokenizer (the base model's without one), into the directories the config names."""
    from korcpt.corpus.build import CorpusOptions, build_corpus
    from korcpt.shards.writer import write_shards
    from korcpt.vocab.extend import ExtendOptions, extend_tokenizer

    shards = Path(cfg.data.shards)
    work = shards.parent
    corpus = work / "raw_text_mixed.jsonl"
    corpus_report = build_corpus(CorpusOptions(
        korean=[SAMPLE / "korean"], mcq=SAMPLE / "kormedmcqa/train.jsonl", medical_dict=SAMPLE / "medical_dict.json",
        char_dict=SAMPLE / "char_dict.json", exclude_mcq=[SAMPLE / "kormedmcqa/test.jsonl"], seed=cfg.train.seed,
    ), work)
    vocab_report, rows = {}, None
    if cfg.model.tokenizer:
        vocab_report = extend_tokenizer(ExtendOptions(
            base=cfg.model.name, corpus=corpus, out_dir=Path(cfg.model.tokenizer), max_new_tokens=new_tokens,
        ))
    if cfg.model.tokenizer and distill:
        from korcpt.model.distill import DistillOptions, distill_rows

        rows = distill_rows(DistillOptions(model=cfg.model.name, tokenizer=Path(cfg.model.tokenizer), corpus=corpus,
                                           out_dir=Path(cfg.model.new_rows), seed=cfg.train.seed,
                                           contexts_per_token=DEMO_CONTEXTS))
    manifest = write_shards(corpus, shards, shard_options(cfg, seq_len, cfg.model.tokenizer or cfg.model.name),
                            corpus_report=corpus_report)
    return {"manifest": manifest, "vocab": vocab_report, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from korcpt.config import load_config

    start = time.time()
    sets = args.set
    if args.extend:
        sets = [*extended_sets(load_config(args.config, args.set, check_files=False), args.distill), *args.set]
    draft = load_config(args.config, sets, check_files=False)
    built = build_data(draft, args.seq_len, args.new_tokens, args.distill)
    cfg = load_config(args.config, sets)  # now every file it names exists

    from korcpt.train.loop import train

    info = train(cfg)
    held_out = held_out_bpc(cfg)
    print(summary(cfg, info, built, held_out, time.time() - start))
    return 0


def held_out_bpc(cfg) -> dict[str, dict]:
    """Bits per character on HELD_OUT: base model and tokenizer, extended before training, and trained."""
    from korcpt.eval.loading import load_for_eval
    from korcpt.eval.perplexity import read_heldout_texts, score_text

    texts, _ = read_heldout_texts(HELD_OUT)
    sides = {"base": {}}
    if cfg.model.tokenizer:
        sides["extended, mean rows, untrained"] = {"tokenizer": cfg.model.tokenizer}
    if cfg.model.new_rows:
        sides["extended, distilled rows, untrained"] = {"tokenizer": cfg.model.tokenizer, "new_rows": cfg.model.new_rows}
    sides["trained"] = {"adapter": cfg.output.dir}
    return {name: score_text(*load_for_eval(cfg.model.name, **kwargs), texts) for name, kwargs in sides.items()}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary(cfg, info: dict, built: dict, held_out: dict[str, dict], seconds: float) -> str:
    out = Path(cfg.output.dir)
    dtype = built["manifest"]["dtype"]
    added = info.get("new_tokens", 0)
    rows = [
        ("model", f"{cfg.model.name} + LoRA r={cfg.lora.r} (rsLoRA), embeddings: {cfg.lora.embeddings}"),
        ("vocabulary", f"+{added} Korean medical tokens; shards {dtype}" if cfg.model.tokenizer else
                       f"the base tokenizer (measured better at this budget; --extend adds Korean medical tokens); "
                       f"shards {dtype}"),
        ("tokens trained", f"{info['tokens_seen']:,} in {info['steps']} optimizer steps"),
        ("training time", f"{info['train_seconds']:.0f} s ({info['tokens_per_sec']:.0f} tokens/s); whole demo {seconds:.0f} s"),
        ("distillation", "-" if not cfg.model.tokenizer else
                         "off (--no-distill): new rows start at the mean of their pieces" if not built["rows"] else
                         f"{built['rows']['seconds']:.0f} s "
                         f"({built['rows']['seconds'] / info['train_seconds']:.2f} of the training time), "
                         f"{built['rows']['cost']['tokens_read']:,} tokens read; "
                         f"hidden-state distance {built['rows']['loss_mean_init']:.3f} (mean) -> "
                         f"{built['rows']['loss_final']:.3f} on held-out windows"),
        ("val perplexity", f"{_fmt(info['val_ppl_baseline'], '.2f')} -> {_fmt(info['val_ppl_final'], '.2f')}"
                           + (" (per token of the extended tokenizer: not comparable with the base's)"
                              if cfg.model.tokenizer else "")),
        ("val bits/char", f"{_fmt(info['val_bpc_baseline'], '.3f')} -> {_fmt(info['val_bpc_final'], '.3f')}"),
        ("held-out bits/char", "; ".join(f"{name} {r['bpc']:.3f} ({r['tokens_per_100_chars']:.1f} tok/100 chars)"
                                         for name, r in held_out.items()) + f"  [{HELD_OUT.name}, never trained on]"),
        ("MCQ accuracy", f"{_fmt(info['mcq_accuracy_baseline'], '.1%')} -> {_fmt(info['mcq_accuracy_final'], '.1%')}"
                         f" (letter scoring, {cfg.eval.mcq_file}; chance 20%)"),
        ("adapter", str(out / "adapter_model.safetensors")),
        ("tokenizer", str(out / "tokenizer")),
        ("training info", str(out / "training_info.json")),
        ("TensorBoard", f"tensorboard --logdir {out / 'tensorboard'}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "korcpt demo", "-" * 60] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
