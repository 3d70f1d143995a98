"""korcpt's streaming JSON array reader vs ijson: speed, peak memory, and a bad element.

    .venv/bin/python -m pip install ijson   # the comparison's only extra package
    .venv/bin/python bench/bench_json_array.py [--mb 50] [--repeats 1]

The input is the Namu dump's form: one JSON array of ``{"title", "text", "contributors"}`` objects,
here synthetic Korean text (random syllables in words, sentences and paragraphs, with quotes and
escaped newlines) up to ``--mb`` megabytes, written to a temporary file. Each side reads every element
in a fresh process that reports its wall time, CPU time and peak RSS (``getrusage``):

- **korcpt**: ``korcpt.corpus.readers.iter_records`` (the reader ``build_corpus`` uses), 1 MiB reads,
  ``json.JSONDecoder.raw_decode`` per element, bytes that are not UTF-8 kept as surrogates so that
  only the element holding them is rejected.
- **ijson**: ``ijson.items(f, "item")`` with its default (fastest available) backend, the same
  elements as Python objects.

Then both read two small arrays with one bad element among good ones: bytes that are not UTF-8
inside one element's string, and a syntax error inside one element. The table says how many good
elements each side yields and whether it can go on past the bad one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
side, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, {root!r})
t0, c0 = time.perf_counter(), time.process_time()
n = chars = 0
if side == "korcpt":
    from korcpt.corpus.readers import Record, iter_records
    for rec in iter_records(path):
        n += 1
        chars += len(rec.value["text"]) if isinstance(rec, Record) else 0
else:
    import ijson
    with open(path, "rb") as f:
        for value in ijson.items(f, "item"):
            n += 1
            chars += len(value["text"])
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"n": n, "chars": chars, "wall": wall, "cpu": cpu,
                   "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "backend": __import__("ijson").backend if side == "ijson" else "json.JSONDecoder"}}))
"""

_BAD_CHILD = """
import json, sys
side, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, {root!r})
good, bad, error = 0, 0, None
try:
    if side == "korcpt":
        from korcpt.corpus.readers import Record, iter_records
        for rec in iter_records(path):
            good += isinstance(rec, Record)
            bad += not isinstance(rec, Record)
    else:
        import ijson
        with open(path, "rb") as f:
            for value in ijson.items(f, "item"):
                good += 1
except Exception as exc:  # noqa: BLE001 - the kind of failure is the measurement
    error = f"{{type(exc).__name__}}: {{str(exc).splitlines()[0][:70] if str(exc) else ''}}"
print(json.dumps({{"good": good, "bad": bad, "error": error}}))
"""


def _syllables(rng: random.Random, n: int) -> str:
    return "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(n))


def _text(rng: random.Random, words: list[str], chars: int) -> str:
    out, size = [], 0
    while size < chars:
        words_ = rng.choices(words, k=rng.randint(4, 14))
        sentence = " ".join(words_) + rng.choice([".", ".", "?", "!"])
        if rng.random() < 0.1:
            sentence = f'"{sentence}"'
        out.append(sentence + ("\n\n" if rng.random() < 0.2 else " "))
        size += len(out[-1])
    return "".join(out)


def write_array(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSON array of about ``megabytes`` MB of Namu-like objects; returns the element count."""
    rng, target, n = random.Random(seed), int(megabytes * 1e6), 0
    words = [_syllables(rng, rng.randint(1, 5)) for _ in range(20_000)]  # a vocabulary: far faster than per syllable
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        while f.tell() < target:
            obj = {"title": _syllables(rng, rng.randint(2, 6)), "text": _text(rng, words, rng.randint(300, 4000)),
                   "contributors": [f"user{rng.randrange(10**6)}" for _ in range(rng.randint(0, 3))]}
            f.write(("" if n == 0 else ",\n") + json.dumps(obj, ensure_ascii=False))
            n += 1
        f.write("\n]\n")
    return n


def write_bad(path: Path, kind: str) -> None:
    """Five good elements, then one bad one, then five good ones."""
    good = [json.dumps({"text": f"문서 {i}"}, ensure_ascii=False).encode() for i in range(10)]
    bad = b'{"text": "\xff\xfe broken"}' if kind == "non_utf8" else b'{"text": "unterminated, "x": }'
    path.write_bytes(b"[" + b",\n".join(good[:5] + [bad] + good[5:]) + b"]\n")


def run_child(code: str, side: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT)), side, str(path)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="size of the generated JSON array in MB")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side (the best is shown)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_json_array.") as tmp:
        path = Path(tmp) / "array.json"
        t0 = time.perf_counter()
        n = write_array(path, args.mb)
        size_mb = os.path.getsize(path) / 1e6
        print(f"wrote {n} elements, {size_mb:.1f} MB in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for side in ("korcpt", "ijson"):  # alternating: a load change hits both sides alike
                r = run_child(_CHILD, side, path)
                if side not in best or r["wall"] < best[side]["wall"]:
                    best[side] = r
        assert best["korcpt"]["n"] == best["ijson"]["n"] == n, best
        assert best["korcpt"]["chars"] == best["ijson"]["chars"], best
        bad = {}
        for kind in ("non_utf8", "syntax"):
            bad_path = Path(tmp) / f"bad_{kind}.json"
            write_bad(bad_path, kind)
            bad[kind] = {side: run_child(_BAD_CHILD, side, bad_path) for side in ("korcpt", "ijson")}

    print(f"\n{n} elements, {size_mb:.1f} MB JSON array, best of {args.repeats}\n")
    print("| reader | backend | wall s | MB/s | CPU s | MB/CPU-s | peak RSS MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for side, r in best.items():
        print(f"| {side} | {r['backend']} | {r['wall']:.2f} | {size_mb / r['wall']:.1f} | {r['cpu']:.2f} | "
              f"{size_mb / max(r['cpu'], 1e-9):.0f} | {r['rss_mib']:.1f} |")
    print("\nOne bad element between 5 good ones before and 5 after (10 good in all):\n")
    print("| bad element | reader | good elements read | bad counted | stopped with |")
    print("| --- | --- | ---: | ---: | --- |")
    for kind, sides in bad.items():
        for side, r in sides.items():
            print(f"| {kind} | {side} | {r['good']} | {r['bad']} | {r['error'] or '(read to the end)'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
