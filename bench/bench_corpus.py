"""Corpus stage throughput and memory on the real samples, at 1x and 10x input size.

    .venv/bin/python bench/bench_corpus.py [--scale 2000] [--workers 1 2]

The real Namu sample (``../shared/data/namu``, 5 records) and plain text (``../shared/data/plain``,
11 files) are repeated to a measurable size: ``scale`` copies of each Namu record in one JSON array
(each copy made unique so the duplicate filter keeps it) and ``scale // 20`` copies of each text
file. Each build runs in a fresh subprocess that reports its own peak RSS (the process that reads,
deduplicates and mixes: the figure that must stay flat as the input grows) and the peak summed RSS
of it and its worker processes. Prints documents/second (wall clock, and per CPU-second of the main
process, which is steadier on a shared machine) and peak RSS per size and worker count.

Last run (--scale 2000, 2 shared cores under a load average of about 9, so wall figures are low):

    1x   42.8 MiB   11100 docs  workers=1   543 docs/s  2274 docs/CPU-s  peak RSS main 45.6 MiB
    1x   42.8 MiB   11100 docs  workers=2   540 docs/s  4888 docs/CPU-s  peak RSS main 49.7 MiB, all 155.7 MiB
    10x 428.1 MiB  111000 docs  workers=1   677 docs/s  2263 docs/CPU-s  peak RSS main 55.7 MiB
    10x 428.1 MiB  111000 docs  workers=2  1122 docs/s  6509 docs/CPU-s  peak RSS main 62.1 MiB, all 167.9 MiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# The child measures itself: wall time, its own CPU time and peak RSS (getrusage), and the peak of
# the summed RSS of its process tree (pool workers are forkserver children, which getrusage of
# this process does not see), sampled from /proc every 50 ms.
_CHILD = """
import json, os, resource, sys, threading, time
from pathlib import Path
sys.path.insert(0, {root!r})
from korcpt.corpus.build import CorpusOptions, build_corpus

def tree_rss_kib():
    kids = {{}}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{pid}}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{{pid}}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total

peak, done = [0], threading.Event()
def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], tree_rss_kib())
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
report = build_corpus(CorpusOptions(korean=[Path(p) for p in {inputs!r}], workers={workers}, progress=False,
                                    parallel_min_bytes=0), Path({out!r}))
dt = time.perf_counter() - t0
done.set()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": dt, "read": report["sources"]["korean"]["read"], "kept": report["sources"]["korean"]["kept"],
                  "cpu_main_s": ru.ru_utime + ru.ru_stime, "rss_main_mib": ru.ru_maxrss / 1024,
                  "rss_tree_mib": peak[0] / 1024}}))
"""


def make_inputs(dest: Path, copies: int) -> tuple[list[str], int]:
    records = json.loads((DATA / "namu" / "namuwiki_sample.json").read_text(encoding="utf-8"))
    texts = sorted((DATA / "plain").glob("*.txt"))
    namu = dest / "namu.json"
    with open(namu, "w", encoding="utf-8") as f:  # written as a stream, like the real dump
        f.write("[\n")
        for i in range(copies):
            for j, rec in enumerate(records):
                sep = ",\n" if i or j else ""
                f.write(sep + json.dumps({**rec, "text": rec["text"] + f"\n\n사본 {i}"}, ensure_ascii=False))
        f.write("\n]\n")
    plain = dest / "plain"
    plain.mkdir()
    for i in range(max(1, copies // 20)):
        for t in texts:
            (plain / f"{i:05d}_{t.name}").write_text(t.read_text(encoding="utf-8") + f"\n사본 {i}", encoding="utf-8")
    return [str(namu), str(plain)], copies * len(records) + max(1, copies // 20) * len(texts)


def run_once(inputs: list[str], workers: int, out: Path) -> dict:
    code = _CHILD.format(root=str(ROOT), inputs=inputs, workers=workers, out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "KORCPT_NO_PROGRESS": "1"}, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=2000, help="copies of each Namu record at 1x (10x uses ten times)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    args = ap.parse_args()
    if not (DATA / "namu" / "namuwiki_sample.json").is_file():
        print(f"skipped: real samples not found under {DATA}", file=sys.stderr)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (1, 10):
            src = Path(tmp) / f"in{size}"
            src.mkdir()
            inputs, n = make_inputs(src, args.scale * size)
            mib = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 2**20
            for workers in args.workers:
                r = run_once(inputs, workers, Path(tmp) / f"out{size}_{workers}")
                assert r["read"] == n, (r, n)
                results[size, workers] = r
                print(f"{size:>2}x  {mib:7.1f} MiB  {r['read']:>7} docs  workers={workers}  "
                      f"{r['read'] / r['seconds']:8.0f} docs/s  {mib / r['seconds']:6.2f} MiB/s  "
                      f"main CPU {r['read'] / r['cpu_main_s']:6.0f} docs/CPU-s  "
                      f"peak RSS main {r['rss_main_mib']:6.1f} MiB, all processes {r['rss_tree_mib']:6.1f} MiB")
            for p in src.rglob("*"):
                if p.is_file():
                    p.unlink()
    w0, w1 = args.workers[0], args.workers[-1]
    print(f"peak RSS of the main process, 10x / 1x (workers={w0}): "
          f"{results[10, w0]['rss_main_mib'] / results[1, w0]['rss_main_mib']:.2f}")
    if w1 != w0:
        print(f"speed-up workers={w1} over workers={w0} at 10x: "
              f"{results[10, w0]['seconds'] / results[10, w1]['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
