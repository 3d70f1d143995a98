"""Tokenizer extension: base Gemma 3 vs the BPE extension vs the same tokens as HF "added tokens".

    python bench/bench_vocab.py [--max-new-tokens 8192] [--data ../shared/data] [--out DIR]

Learns the extension from the two medical lists and the statutes (a measurement, not shipped data),
then prints, per text: tokens per 100 Hangul syllables, chars/s (best of interleaved passes) and
round-trip failures for each tokenizer, the words the added-tokens way makes longer than the base,
and the goals of issue 7 (>= 25% fewer tokens on the medical lists, <= 2% more on the statutes,
throughput >= 0.8x). Writes DIR/report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from korcpt.assets import load_tokenizer  # noqa: E402
from korcpt.vocab.extend import (  # noqa: E402
    build_extended_tokenizer,
    count_tokens,
    hangul_syllables,
    learn_extension,
    new_token_share,
    read_lines,
    read_texts,
    round_trip_failures,
    throughputs,
)

# Written for this benchmark (not from any corpus): English clinical prose, with a few Korean words.
ENGLISH = [
    "The patient was admitted with chest pain radiating to the left arm and shortness of breath.",
    "Blood pressure was 150/95 mmHg, heart rate 102 beats per minute, and oxygen saturation 94% on room air.",
    "An electrocardiogram showed ST-segment elevation in the inferior leads; troponin was raised.",
    "She was started on aspirin, a beta blocker and a statin, and referred for coronary angiography.",
    "Type 2 diabetes mellitus was managed with metformin and lifestyle advice (당뇨병 교육).",
    "Chronic hepatitis B infection requires regular monitoring of liver enzymes and viral load.",
    "The MRI of the brain revealed no acute infarction, but small vessel disease was noted.",
    "Follow-up in two weeks with a repeat complete blood count and renal function tests.",
] * 250


def added_tokens_variant(base_dir: Path, new_tokens: list[str], out: Path):
    """The base tokenizer with the same new strings added as HF added tokens (``▁`` dropped)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    words = list(dict.fromkeys(t.lstrip("▁") for t in new_tokens if t.lstrip("▁")))
    tok.add_tokens(words)
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--max-new-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"error: shared data {args.data} not found (pass --data)", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_vocab-"))
    medical = {p.name: p for p in sorted((args.data / "medical").glob("*.txt"))}
    plain = sorted((args.data / "plain").glob("*.txt"))

    base = load_tokenizer("gemma3-270m")
    start = time.perf_counter()
    ext = learn_extension(base, read_texts(None, [*medical.values(), *plain]), args.max_new_tokens)
    learn_s = time.perf_counter() - start
    new = build_extended_tokenizer(base, ext, out / "extended")
    base.save_pretrained(out / "base")
    added = added_tokens_variant(out / "base", ext.new_tokens, out / "added")

    texts = {
        "medical_terms_ko.txt": read_lines(medical["medical_terms_ko.txt"]),
        "medical_exam_words_ko.txt": read_lines(medical["medical_exam_words_ko.txt"]),
        "statutes_and_bills": [line for p in plain for line in read_lines(p)],
        "english_sample": ENGLISH,
    }
    report = {"new_tokens": len(ext.new_tokens), "new_merges": len(ext.merges),
              "new_syllables": len(ext.new_tokens) - len(ext.merges), "learn_seconds": round(learn_s, 1),
              "vocab_size": len(new), "texts": {}}
    names = ("base", "bpe_extension", "added_tokens")
    print(f"new tokens: {len(ext.new_tokens)} ({len(ext.merges)} merges, "
          f"{len(ext.new_tokens) - len(ext.merges)} syllables), learned in {learn_s:.1f} s; vocab {len(new)}")
    header = f"{'text':28} {'tok/100 syl: base':>17} {'BPE ext':>8} {'added':>8}   {'chars/s: base':>13} {'BPE ext':>8} {'added':>8}"
    print(header)
    for name, lines in texts.items():
        syl = sum(hangul_syllables(line) for line in lines)
        tps = throughputs([base, new, added], lines, args.repeats)
        row = {"lines": len(lines), "hangul_syllables": syl, "characters": sum(map(len, lines))}
        for key, tok, tp in zip(names, (base, new, added), tps):
            n = count_tokens(tok, lines)
            row[key] = {"tokens": n, "tokens_per_100_syllables": round(100 * n / max(syl, 1), 2),
                        "chars_per_s": round(tp), "round_trip_failures": len(round_trip_failures(tok, lines))}
        row["bpe_extension"]["new_token_share"] = round(new_token_share(new, len(base), lines), 4)
        for key in names[1:]:
            row[key]["token_change_pct"] = round(100 * (row[key]["tokens"] / row["base"]["tokens"] - 1), 2)
            row[key]["throughput_ratio"] = round(row[key]["chars_per_s"] / row["base"]["chars_per_s"], 3)
        report["texts"][name] = row
        t = [row[k]["tokens_per_100_syllables"] for k in names]
        c = [row[k]["chars_per_s"] for k in names]
        print(f"{name:28} {t[0]:17.1f} {t[1]:8.1f} {t[2]:8.1f}   {c[0]:13,} {c[1]:8,} {c[2]:8,}"
              f"   ratio {c[1] / c[0]:.2f} / {c[2] / c[0]:.2f}; round-trip failures "
              f"{row['bpe_extension']['round_trip_failures']} / {row['added_tokens']['round_trip_failures']}")

    words = texts["medical_exam_words_ko.txt"]
    lens = {k: [len(e.ids) for e in t.backend_tokenizer.encode_batch(words, add_special_tokens=False)]
            for k, t in zip(names, (base, new, added))}
    longer = {k: sum(a > b for a, b in zip(lens[k], lens["base"])) for k in names[1:]}
    report["exam_words_longer_than_base"] = longer
    examples = [(w, added.tokenize(w), new.tokenize(w)) for w, a, b in zip(words, lens["added_tokens"], lens["base"])
                if a > b][:3]
    report["added_tokens_examples"] = [{"word": w, "added_tokens": a, "bpe_extension": b} for w, a, b in examples]
    running = " 간염은 " if "간염" in added.get_vocab() else None
    if running:
        report["running_text_example"] = {"text": running, "base": base.tokenize(running),
                                          "bpe_extension": new.tokenize(running), "added_tokens": added.tokenize(running)}
    print(f"exam words made longer than base: BPE extension {longer['bpe_extension']}, "
          f"added tokens {longer['added_tokens']} of {len(words)}; e.g. {examples[:2]}")
    if running:
        print(f"running text {running!r}: {report['running_text_example']}")

    t = report["texts"]
    goals = {
        "medical_terms_fewer_pct": -t["medical_terms_ko.txt"]["bpe_extension"]["token_change_pct"],
        "exam_words_fewer_pct": -t["medical_exam_words_ko.txt"]["bpe_extension"]["token_change_pct"],
        "statutes_change_pct": t["statutes_and_bills"]["bpe_extension"]["token_change_pct"],
        "min_throughput_ratio": min(r["bpe_extension"]["throughput_ratio"] for r in t.values()),
    }
    goals["met"] = (goals["medical_terms_fewer_pct"] >= 25 and goals["exam_words_fewer_pct"] >= 25
                    and goals["statutes_change_pct"] <= 2 and goals["min_throughput_ratio"] >= 0.8)
    report["goals"] = goals
    print("goals:", json.dumps(goals))
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
