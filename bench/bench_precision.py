"""Which trainable entries move in bfloat16 versus float32: the fp32-master-weight check.

    .venv/bin/python bench/bench_precision.py [--steps 6] [--lr 2e-5]

A bfloat16 weight cannot take an update below half its ulp (about 6e-5 for |w| = 0.03), while an
AdamW step at train_raw_korean_text.md's lr 2e-5 is about 2e-5: without float32 master weights most entries never
move. This trains the tiny pretrained Gemma 3 of the tests (one process, no DeepSpeed) in each
embedding mode, in float32 and in bfloat16, and prints for each kind of trainable tensor the fraction
of its saved entries that differ from where the run started, and the last loss against float32's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("KORCPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("frozen", "new_tokens", "full")
KINDS = {"LoRA A": "lora_A", "LoRA B": "lora_B", "embedding rows": "trainable_tokens_delta"}


def run(work: Path, data: dict, dtype: str, embeddings: str, steps: int, lr: float) -> dict:
    from safetensors.torch import load_file

    from korcpt.config import load_config
    from korcpt.train.loop import train
    from tinyrun import initial_adapter, moved_fractions, run_config

    tok, shards = data["extended"] if embeddings == "new_tokens" else data["base"]
    name = f"{dtype}-{embeddings}"
    cfg_path = run_config(work / f"{name}.yaml", tok, shards, work / name,
                          model={"name": str(data["pretrained"]), "random_init": False, "dtype": dtype,
                                 "tokenizer": str(tok) if embeddings == "new_tokens" else ""},
                          lora={"embeddings": embeddings},
                          train={"lr": lr, "max_steps": steps, "warmup_steps": 0},
                          eval={"steps": 0})
    info = train(load_config(cfg_path))
    moved = moved_fractions(initial_adapter(cfg_path), load_file(str(work / name / "adapter_model.safetensors")))
    by_kind = {}
    for kind, marker in KINDS.items():
        parts = [v for k, v in moved.items() if marker in k]
        by_kind[kind] = min(parts) if parts else None  # the least-moved tensor of the kind
    return {"moved": by_kind, "loss": info["losses"][-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args()
    from tinyrun import build_extended_tiny, build_pretrained_tiny, build_tiny_data

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_tiny_data(work / "tiny")
        pretrained = build_pretrained_tiny(work / "pretrained", base[0])
        data = {"base": base, "pretrained": pretrained, "extended": build_extended_tiny(work / "ext", pretrained)}
        results = {(d, m): run(work, data, d, m, args.steps, args.lr) for m in MODES for d in ("float32", "bfloat16")}
    print(f"\nentries moved after {args.steps} steps at lr {args.lr} (least-moved tensor of each kind), "
          "one process, no DeepSpeed")
    print(f"{'embeddings':<11} {'dtype':<9} " + " ".join(f"{k:>15}" for k in KINDS) + f" {'last loss':>10} {'vs fp32':>8}")
    for (dtype, mode), r in results.items():
        ref = results[("float32", mode)]["loss"]
        cells = " ".join(f"{'-' if v is None else f'{100 * v:.3f}%':>15}" for v in r["moved"].values())
        print(f"{mode:<11} {dtype:<9} {cells} {r['loss']:>10.5f} {r['loss'] / ref - 1:>+8.2%}")


if __name__ == "__main__":
    main()
