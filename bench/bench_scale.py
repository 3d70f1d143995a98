"""The scale of train_raw_korean_text.md on this machine: corpus and shard build, reader and epoch order, at 1x and 10x.

    .venv/bin/python bench/bench_scale.py [--scale 1 10] [--workdir /tmp/scale] [--docs 130000]
    .venv/bin/python bench/bench_scale.py --smoke           # a few hundred documents (tests/test_bench_smoke.py)

1x is 130,000 corpus documents (about 104M Gemma 3 tokens), generated at run time from the real
texts under ``../shared/data`` (nothing from them is stored in the repository):

* Korean JSONL (``:plain``): a numbered header and a shuffled window of consecutive paragraphs of the
  plain texts (statute and bills), about 1,400 characters (0.5x to 1.5x, seeded);
* a Namu dump (JSON array, ``:namu``): the sample's usable records, each copy renamed and followed by
  a numbered paragraph window (2% of the documents);
* a medical dictionary (``{term, definition}``) from the real headwords, and KorMedMCQA-shaped
  questions over them (1% each of the documents before the corpus stage's 5x medical multiplier,
  so 10% of the corpus lines).

Per scale, each stage runs in a fresh child process that reports its wall time, its CPU time and
its peak memory: the main process's peak RSS (``getrusage``) and the peak of its RSS plus its worker
processes' private memory (``/proc/PID/smaps_rollup`` every 100 ms; private, so that the pages forked
workers share with their parent count once):

1. corpus   ``build_corpus`` (workers=2) -> ``raw_text_mixed.jsonl``
2. shards   ``write_shards`` (real Gemma 3 tokenizer loaded before the clock starts, uint32,
            seq_len 2048, workers=2, val_fraction 0.01)
3. bare     the same tokenizer's ``tokenizers.Tokenizer.encode_batch`` alone over the same corpus
            text, 1,024 documents a call (JSON parsing outside the clock; tokens counted as the shard
            stage counts them: ids + <bos> + <eos> per document, and checked equal to its count)
4. reader   the train split, 8 simulated ranks one after another, each a ``torch`` DataLoader with 4
            worker processes (``SequenceStream(rank=r, world_size=8, batch_size=4)``): sequences/s and
            tokens/s per rank (worker start-up included). Order check over the whole epoch: each
            rank's loader returns exactly ``permute(rank_positions)``; the union over the 32
            (rank, worker) streams holds each sequence id at most once, and with the dropped tail
            (the last ``n % 8`` positions, counted) it is exactly ``range(n)``.

Inputs, corpus and shards of a scale are deleted once it is measured (``--keep`` keeps them).

Last run: see bench/README.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data"

from bench_shards import anon_rss_mb, peak_rss_mb  # noqa: E402  (VmHWM / RssAnon of this process)

DOCS = 130_000  # corpus documents at 1x
KOREAN_CHARS = 1_200  # target characters of a Korean document (~1,320 written: the last paragraph overshoots;
#                       Gemma 3 reads ~1.53 of these characters a token)
WORLD, WORKERS, LOADER_BATCH = 8, 4, 4
GIB = 2**30


# ---------------------------------------------------------------- inputs from the real texts


def _paragraphs() -> list[str]:
    """The plain texts cut into paragraphs of at least 200 characters (consecutive lines joined)."""
    out = []
    for path in sorted((DATA / "plain").glob("*.txt")):
        cur: list[str] = []
        for line in path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n"):
            if line.strip():
                cur.append(line.strip())
            if sum(map(len, cur)) >= 200:
                out.append("\n".join(cur))
                cur = []
        if cur:
            out.append("\n".join(cur))
    return out


def _namu_records() -> list[dict]:
    """The Namu sample's records that the corpus stage keeps (the redirect and too-short ones left out)."""
    from korcpt.corpus.text import drop_reason
    from korcpt.corpus.textformat import clean_as

    keep = []
    for rec in json.loads((DATA / "namu" / "namuwiki_sample.json").read_text(encoding="utf-8")):
        text = rec.get("text") if isinstance(rec.get("text"), str) else None
        cleaned = clean_as(text, "namu") if text else None
        if cleaned is not None and drop_reason(cleaned, 100, 0.10) is None:
            keep.append(rec)
    return keep


def _terms() -> list[tuple[str | None, str]]:
    """(English or None, Korean) of each real medical headword that has Korean in it."""
    out = []
    for line in (DATA / "medical" / "medical_terms_ko.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        i = next((k for k, ch in enumerate(line) if "가" <= ch <= "힣"), None)
        if i is None:
            continue
        english = line[:i].strip(" ()") or None
        out.append((english, line[i:].strip()))
    return out


def plan(docs: int) -> dict[str, int]:
    """Records per input so that the corpus has ``docs`` lines (medical records count 5 times)."""
    mcq = medical = max(1, docs // 100)
    namu = max(1, docs // 50)
    return {"korean": docs - namu - 5 * (mcq + medical), "namu": namu, "medical_dict": medical, "mcq": mcq}


def make_inputs(dest: Path, docs: int, seed: int = 0) -> dict[str, Path]:
    """Write the four inputs of a ``docs``-line corpus under ``dest``, streamed; returns their paths."""
    rng = random.Random(seed)
    paras, namu, terms = _paragraphs(), _namu_records(), _terms()
    counts = plan(docs)

    def window(chars: float) -> str:
        start, picked, n = rng.randrange(len(paras)), [], 0
        while n < chars:
            picked.append(paras[(start + len(picked)) % len(paras)])
            n += len(picked[-1])
        rng.shuffle(picked)
        return "\n\n".join(picked)

    dest.mkdir(parents=True, exist_ok=True)
    paths = {k: dest / f"{k}.{'json' if k == 'namu' else 'jsonl'}" for k in counts}
    with open(paths["korean"], "w", encoding="utf-8") as f:
        for i in range(counts["korean"]):
            text = f"문서 {i}\n\n" + window(KOREAN_CHARS * rng.uniform(0.5, 1.5))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(paths["namu"], "w", encoding="utf-8") as f:  # one JSON array, written as a stream like the dump
        f.write("[\n")
        for i in range(counts["namu"]):
            rec = namu[i % len(namu)]
            text = rec["text"] + f"\n\n== 변형 {i} ==\n" + window(KOREAN_CHARS * rng.uniform(0.25, 0.75))
            f.write((",\n" if i else "") + json.dumps({**rec, "title": f"{rec['title']} ({i})", "text": text},
                                                      ensure_ascii=False))
        f.write("\n]\n")
    with open(paths["medical_dict"], "w", encoding="utf-8") as f:
        for i in range(counts["medical_dict"]):
            english, korean = terms[i % len(terms)]
            body = window(150).replace("\n", " ")[:300]
            definition = (f"{english}. " if english else "") + f"{korean}에 관한 항목 {i}. {body}"
            f.write(json.dumps({"term": korean, "definition": definition}, ensure_ascii=False) + "\n")
    with open(paths["mcq"], "w", encoding="utf-8") as f:
        for i in range(counts["mcq"]):
            options = rng.sample(terms, 5)
            answer = rng.randrange(5)
            question = window(120).replace("\n", " ")[:240] + f"\n위 글과 관련된 의학 용어는? (문항 {i})"
            rec = {"question": question,
                   **{letter: (f"{k}({e})" if e else k) for letter, (e, k) in zip("ABCDE", options)},
                   "answer": answer + 1}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------- children (one measurement each)


def _tree_kib() -> tuple[int, int]:
    """This process's RSS plus the private memory (USS) of all its descendants (pool workers), KiB,
    and of that the descendants' private clean pages (file pages only they map: the reader's memmaps).

    Private memory for the workers: forked workers share the parent's pages (the Gemma tokenizer
    alone is ~0.5 GiB), which a sum of RSS would count once per process.
    """
    kids: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    me = os.getpid()
    total, clean, todo = 0, 0, [me]
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line[:20])}
        except (OSError, ValueError):
            continue
        if pid == me:
            total += fields.get("Rss", 0)
        else:
            total += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            clean += fields.get("Private_Clean", 0)
    return total, clean


class _TreePeak:
    """Samples :func:`_tree_kib` every 100 ms while it is entered; ``peak`` in MiB after."""

    def __enter__(self):
        self.peak, self.clean, self._done = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._done.wait(0.1):
            self._sample()

    def _sample(self) -> None:
        total, clean = _tree_kib()
        if total > self.peak:  # the workers' clean pages at the moment of the peak
            self.peak, self.clean = total, clean

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sample()
        self.peak, self.clean = self.peak / 1024, self.clean / 1024  # MiB


def _cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def child(what: str, spec: dict) -> dict:
    os.environ["KORCPT_NO_PROGRESS"] = "1"
    if what == "corpus":
        from korcpt.corpus.build import CorpusOptions, build_corpus

        p = {k: Path(v) for k, v in spec["inputs"].items()}
        opts = CorpusOptions(korean=[Path(f"{p['korean']}:plain"), Path(f"{p['namu']}:namu")], mcq=p["mcq"],
                             medical_dict=p["medical_dict"], workers=spec["workers"], progress=False)
        rss0 = peak_rss_mb()
        with _TreePeak() as tree:
            t, c = time.perf_counter(), _cpu_s()
            report = build_corpus(opts, Path(spec["out"]))
            seconds, cpu = time.perf_counter() - t, _cpu_s() - c
        return {"seconds": seconds, "cpu_main_s": cpu, "lines": report["output"]["lines"],
                "distribution": {r["source"]: r["final"] for r in report["distribution"]},
                "rss_start_mib": rss0, "rss_main_mib": peak_rss_mb(), "rss_tree_mib": tree.peak,
                "tree_workers_clean_mib": tree.clean}
    from korcpt.assets import load_tokenizer

    if what == "shards":
        from korcpt.shards.writer import ShardOptions, write_shards

        tokenizer = load_tokenizer(spec["tokenizer"])
        rss0 = peak_rss_mb()
        with _TreePeak() as tree:
            t, c, w = time.perf_counter(), _cpu_s(), _cpu_s(resource.RUSAGE_CHILDREN)
            m = write_shards(Path(spec["corpus"]), Path(spec["out"]),
                             ShardOptions(tokenizer=tokenizer, seq_len=spec["seq_len"], workers=spec["workers"]))
            seconds, cpu = time.perf_counter() - t, _cpu_s() - c
            cpu_workers = _cpu_s(resource.RUSAGE_CHILDREN) - w  # the encoder's workers, reaped by now
        counts = m["counts"]
        return {"seconds": seconds, "cpu_main_s": cpu, "cpu_workers_s": cpu_workers, "dtype": m["dtype"],
                "shards": len(m["shards"]),
                "tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
                "documents": counts["train"]["documents"] + counts["val"]["documents"],
                "skipped": counts["skipped_documents"], "train_sequences": counts["train"]["sequences"],
                "rss_start_mib": rss0, "rss_main_mib": peak_rss_mb(), "rss_tree_mib": tree.peak,
                "tree_workers_clean_mib": tree.clean}
    if what == "bare":
        from korcpt.shards.encode import load_pack_tokenizer

        backend = load_pack_tokenizer(load_tokenizer(spec["tokenizer"])).backend
        seconds, cpu, tokens, docs, limit = 0.0, 0.0, 0, 0, spec.get("limit") or float("inf")

        def run(batch: list[str]) -> None:
            nonlocal seconds, cpu, tokens, docs
            t, c = time.perf_counter(), _cpu_s()  # the tokenizer's threads count in this process
            encodings = backend.encode_batch(batch, add_special_tokens=False)
            seconds, cpu = seconds + time.perf_counter() - t, cpu + _cpu_s() - c
            tokens += sum(len(e.ids) for e in encodings) + 2 * len(batch)  # + <bos>, <eos> as the shards count
            docs += len(batch)

        batch: list[str] = []
        with _TreePeak() as tree, open(spec["corpus"], encoding="utf-8") as f:
            for line in f:
                if docs + len(batch) >= limit:
                    break
                batch.append(json.loads(line)["text"])
                if len(batch) == 1024 or docs + len(batch) >= limit:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
        return {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "documents": docs, "rss_main_mib": peak_rss_mb(),
                "rss_tree_mib": tree.peak,
                "tree_workers_clean_mib": tree.clean}
    if what == "vocab":
        return _vocab(spec)
    if what == "reader":
        return _reader(spec)
    raise ValueError(what)


def _vocab(spec: dict) -> dict:
    """The vocabulary stage as ``tools/extend_tokenizer.py`` runs it over the whole corpus: load the base
    tokenizer, learn ``new_tokens`` tokens, write the extended tokenizer and its report."""
    from korcpt.vocab.extend import ExtendOptions, extend_tokenizer

    opts = ExtendOptions(base=spec["tokenizer"], out_dir=Path(spec["out"]), max_new_tokens=spec["new_tokens"],
                         corpus=Path(spec["corpus"]))
    rss0 = peak_rss_mb()
    with _TreePeak() as tree:
        t, c = time.perf_counter(), _cpu_s()
        report = extend_tokenizer(opts)
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    return {"seconds": seconds, "learn_s": report["learn_seconds"], "cpu_s": cpu, "new_tokens": report["new_tokens"],
            "tokens_before": report["training_tokens_before"], "tokens_after": report["training_tokens_after"],
            "rss_start_mib": rss0, "rss_main_mib": peak_rss_mb(), "rss_tree_mib": tree.peak}


def _reader(spec: dict) -> dict:
    import numpy as np
    from torch.utils.data import DataLoader

    from korcpt.shards.order import permute
    from korcpt.shards.reader import SequenceStream, open_shards

    shards = open_shards(spec["out"], "train", verify=False)
    n, seq_len = shards.num_sequences, shards.seq_len
    seen = np.zeros(n, dtype=np.int8)
    ranks, order_ok = [], True
    with _TreePeak() as tree:
        for rank in range(WORLD):
            stream = SequenceStream(shards, seed=0, rank=rank, world_size=WORLD, batch_size=LOADER_BATCH)
            loader = DataLoader(stream, batch_size=LOADER_BATCH, num_workers=WORKERS)
            t, got = time.perf_counter(), []
            for batch in loader:
                got.append(batch["sample_id"].numpy())
            seconds = time.perf_counter() - t
            ids = np.concatenate(got) if got else np.empty(0, np.int64)
            # the loader's order is the rank's order: its 4 workers' batches interleave back exactly
            order_ok &= bool(np.array_equal(ids, permute(stream.rank_positions(), 0, 0, n)))
            np.add.at(seen, ids, 1)
            ranks.append({"seconds": seconds, "sequences": int(ids.size)})
    tail = n % WORLD  # the positions no rank reads, so that ranks stay equal
    tail_ids = permute(np.arange(n - tail, n, dtype=np.int64), 0, 0, n)
    once = int((seen == 1).sum())
    seen[tail_ids] += 1
    permutation = bool(order_ok and once == n - tail and (seen == 1).all())
    return {"ranks": ranks, "sequences": n, "tail": tail, "read_once": once, "order_ok": order_ok,
            "permutation": permutation, "seq_len": seq_len, "rss_main_mib": peak_rss_mb(),
            "anon_rss_mib": anon_rss_mb(), "rss_tree_mib": tree.peak,
                "tree_workers_clean_mib": tree.clean}


def run_child(what: str, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--spec", json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KORCPT_NO_PROGRESS": "1"})
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {what:<7} done in {time.perf_counter() - t:7.1f} s (process)", flush=True)
    return result


# ---------------------------------------------------------------- one scale, and the table


def measure(scale: int, args: argparse.Namespace) -> dict:
    work = args.workdir / f"{scale}x"
    shutil.rmtree(work, ignore_errors=True)
    docs = args.docs * scale
    t = time.perf_counter()
    inputs = make_inputs(work / "inputs", docs)
    in_mib = sum(p.stat().st_size for p in inputs.values()) / 2**20
    print(f"{scale}x: {docs:,} documents planned {plan(docs)}, inputs {in_mib:,.0f} MiB written in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    r = {"scale": scale, "docs_planned": docs, "inputs_mib": in_mib}
    r["corpus"] = run_child("corpus", {"inputs": {k: str(v) for k, v in inputs.items()}, "out": str(work / "corpus"),
                                       "workers": args.workers})
    shutil.rmtree(work / "inputs")  # disk: the corpus is all the later stages read
    corpus = work / "corpus" / "raw_text_mixed.jsonl"
    r["corpus_mib"] = corpus.stat().st_size / 2**20
    common = {"corpus": str(corpus), "out": str(work / "shards"), "tokenizer": args.tokenizer}
    r["shards"] = run_child("shards", {**common, "seq_len": args.seq_len, "workers": args.workers})
    r["bare"] = run_child("bare", {**common, "limit": args.bare_docs})
    if args.new_tokens:
        r["vocab"] = run_child("vocab", {**common, "out": str(work / "tokenizer"), "new_tokens": args.new_tokens})
    r["reader"] = run_child("reader", common)
    r["shards_mib"] = sum(p.stat().st_size for p in (work / "shards").rglob("*") if p.is_file()) / 2**20
    if not args.keep:
        shutil.rmtree(work)
    return r


def _row(r: dict) -> list[str]:
    c, s, b, rd = r["corpus"], r["shards"], r["bare"], r["reader"]
    shard_tps, bare_tps = s["tokens"] / s["seconds"], b["tokens"] / b["seconds"]
    per_rank = sorted(x["sequences"] / x["seconds"] for x in rd["ranks"])
    median = (per_rank[(len(per_rank) - 1) // 2] + per_rank[len(per_rank) // 2]) / 2
    perm = "yes" if rd["permutation"] else "NO"
    return [f"{r['scale']}x", f"{c['lines']:,}", f"{s['tokens']:,}", f"{c['seconds']:.1f}",
            f"{c['rss_main_mib']:.0f}/{c['rss_tree_mib']:.0f}", f"{s['seconds']:.1f}",
            f"{s['rss_main_mib']:.0f}/{s['rss_tree_mib']:.0f}", f"{shard_tps:,.0f}", f"{bare_tps:,.0f}",
            f"{shard_tps / bare_tps:.2f}", f"{median:.1f}", perm]


HEADER = ["scale", "docs", "tokens", "corpus s", "corpus RSS MiB", "shards s", "shards RSS MiB", "shard tok/s",
          "bare tok/s", "ratio", "reader seq/s/rank", "permutation ok"]


def print_report(results: list[dict], args: argparse.Namespace, wall: float) -> None:
    print(f"\ndetails (tokenizer {args.tokenizer}, seq_len {args.seq_len}, workers {args.workers}, "
          f"{os.cpu_count()} cores, load average at end {os.getloadavg()[0]:.1f}, bench wall {wall:.0f} s):")
    for r in results:
        c, s, b, rd = r["corpus"], r["shards"], r["bare"], r["reader"]
        per_rank = [x["sequences"] / x["seconds"] for x in rd["ranks"]]
        print(f"  {r['scale']}x inputs {r['inputs_mib']:,.0f} MiB -> corpus {r['corpus_mib']:,.0f} MiB -> shards "
              f"{r['shards_mib']:,.0f} MiB ({s['shards']} files, {s['dtype']}); corpus lines {c['distribution']}")
        print(f"     corpus {c['lines'] / c['seconds']:,.0f} docs/s, {c['lines'] / c['cpu_main_s']:,.0f} docs/CPU-s of "
              f"the main process; shards {s['tokens'] / s['seconds']:,.0f} tok/s, {s['documents']:,} documents "
              f"({s['skipped']} skipped), CPU s main {s['cpu_main_s']:.0f} + workers {s['cpu_workers_s']:.0f}")
        shard_cpu = s["tokens"] / (s["cpu_main_s"] + s["cpu_workers_s"])
        same = ("equal to the shards' count" if b["tokens"] == s["tokens"] else
                f"the first {b['documents']:,} documents only (--bare-docs)" if b["documents"] < s["documents"]
                else "DIFFERENT from the shards' count")
        print(f"     bare encode_batch {b['tokens']:,} tokens ({same}) in {b['seconds']:.1f} s, "
              f"{b['cpu_s']:.0f} CPU s; "
              f"tokens/CPU-s shards {shard_cpu:,.0f}, bare {b['tokens'] / b['cpu_s']:,.0f}, "
              f"ratio {shard_cpu / (b['tokens'] / b['cpu_s']):.2f}")
        print(f"     peak MiB, main RSS/with workers: corpus {c['rss_main_mib']:.0f}/{c['rss_tree_mib']:.0f} "
              f"(main at start {c['rss_start_mib']:.0f}), shards {s['rss_main_mib']:.0f}/{s['rss_tree_mib']:.0f} "
              f"(main with the tokenizer loaded {s['rss_start_mib']:.0f}), bare {b['rss_main_mib']:.0f}, reader "
              f"{rd['rss_main_mib']:.0f}/{rd['rss_tree_mib']:.0f} (anonymous at end {rd['anon_rss_mib']:.0f}; "
              f"the workers' "
              f"clean file pages of the memory map {rd['tree_workers_clean_mib']:.0f})")
        print(f"     reader: {WORLD} ranks x {WORKERS} DataLoader workers, batch {LOADER_BATCH}, one rank after "
              f"another: seq/s per rank {min(per_rank):.1f} to {max(per_rank):.1f} "
              f"(tok/s {min(per_rank) * rd['seq_len']:,.0f} to {max(per_rank) * rd['seq_len']:,.0f}); epoch "
              f"{rd['sequences']:,} sequences, {rd['read_once']:,} read exactly once, tail {rd['tail']} dropped "
              f"and counted, rank order {'ok' if rd['order_ok'] else 'WRONG'}")
        if "vocab" in r:
            v = r["vocab"]
            print(f"     vocabulary: {v['new_tokens']:,} new tokens learned over the whole corpus in {v['learn_s']:.1f} s "
                  f"({v['seconds']:.1f} s with the tokenizer written; {v['cpu_s']:.0f} CPU s), corpus tokens "
                  f"{v['tokens_before']:,} -> {v['tokens_after']:,} ({v['tokens_after'] / v['tokens_before'] - 1:+.1%}); "
                  f"peak RSS {v['rss_main_mib']:,.0f} MiB (tokenizer loaded {v['rss_start_mib']:,.0f}); "
                  f"bare tokenizer over the same text {b['seconds']:.1f} s: vocabulary/bare {v['seconds'] / b['seconds']:.1f}x")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        f = hi["scale"] / lo["scale"]
        print(f"  peak RSS {hi['scale']}x / {lo['scale']}x ({f:g}x the data), main/all: corpus "
              f"{hi['corpus']['rss_main_mib'] / lo['corpus']['rss_main_mib']:.2f}/"
              f"{hi['corpus']['rss_tree_mib'] / lo['corpus']['rss_tree_mib']:.2f}, shards "
              f"{hi['shards']['rss_main_mib'] / lo['shards']['rss_main_mib']:.2f}/"
              f"{hi['shards']['rss_tree_mib'] / lo['shards']['rss_tree_mib']:.2f}, reader "
              f"{hi['reader']['rss_main_mib'] / lo['reader']['rss_main_mib']:.2f}/"
              f"{hi['reader']['rss_tree_mib'] / lo['reader']['rss_tree_mib']:.2f}")
    rows = [HEADER] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    print("\nRSS columns: peak MiB of the main process's RSS / of its RSS plus its workers' private memory; "
          "ratio = shard tok/s / bare tok/s")
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 10], help="multiples of --docs (default 1 10)")
    ap.add_argument("--docs", type=int, default=DOCS, help=f"corpus documents at 1x (default {DOCS:,})")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale"), help="inputs, corpus, shards (deleted after)")
    ap.add_argument("--tokenizer", default="gemma3-270m", help="tokenizer preset or directory (default gemma3-270m)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2, help="corpus and shard worker processes (default 2)")
    ap.add_argument("--bare-docs", type=int, default=0,
                    help="time the bare tokenizer on the corpus's first N documents only (default 0: all)")
    ap.add_argument("--smoke", action="store_true", 
                    help="300 documents at 1x and 2x, seq_len 128, tiny-ko unless --tokenizer (for the test)")
    ap.add_argument("--new-tokens", type=int, default=0,
                    help="also run the vocabulary stage over the whole corpus, learning this many tokens (train_raw_korean_text.md: 20000)")
    ap.add_argument("--keep", action="store_true", help="keep each scale's files under --workdir")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.spec)
        result = child(args.child, spec)
        with open(Path(spec["out"]).parents[1] / "results.jsonl", "a") as f:  # WORKDIR/results.jsonl: every figure
            f.write(json.dumps({"stage": args.child, **spec, **result}) + "\n")
        print(json.dumps(result))
        return 0
    needed = ("plain", "namu/namuwiki_sample.json", "medical/medical_terms_ko.txt")
    missing = [p for p in needed if not (DATA / p).exists()]
    if missing:
        print(f"skipped: the real sample data is absent ({', '.join(str(DATA / p) for p in missing)}); it lives "
              "beside the checkout")
        return 0
    if args.smoke:  # the small tokenizer loads in half the time; the real one is the default otherwise
        args.docs, args.scale, args.seq_len = 300, [1, 2], 128
        args.tokenizer = args.tokenizer if "--tokenizer" in sys.argv else "tiny-ko"
    t = time.perf_counter()
    results = [measure(scale, args) for scale in args.scale]
    print_report(results, args, time.perf_counter() - t)
    return 0 if all(r["reader"]["permutation"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
