"""Peak memory and time of the plain vs chunked causal-LM loss (forward + backward), in one run.

    python bench/bench_loss.py [--tokens 4096] [--vocab 262144] [--hidden 64] [--chunk 512] [--device cpu]

Each variant runs in a fresh subprocess. Memory is reported two ways: the peak of live tensor storages
created by the loss (a dispatch-mode tracker, exact and allocator-independent), and on CPU the growth
of the process's peak RSS (``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated``. The plain loss
at 4,096 tokens x 262,144 vocabulary needs about 12 GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _child(args: argparse.Namespace) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    from korcpt.model.loss import causal_lm_loss

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = WeakIdKeyDictionary()
            self.current = self.peak = 0

        def _free(self, n):
            self.current -= n

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                    st = t.untyped_storage()
                    self.seen[st] = st.nbytes()
                    weakref.finalize(st, self._free, st.nbytes())
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
            return out

    dev = args.device
    torch.manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, device=dev, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev) * 0.1).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=dev)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    tracker = LiveBytes() if args.track else None
    if tracker:
        tracker.__enter__()
    loss, _ = causal_lm_loss(hidden, weight, labels, chunk_tokens=args.chunk, backend=args.backend)
    loss.backward()
    if tracker:
        tracker.__exit__(None, None, None)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    out = {
        "chunk": args.chunk,
        "seconds": time.perf_counter() - t0,
        "loss": loss.item(),
        "tracked_peak_bytes": tracker.peak if tracker else None,
        "rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0,
    }
    if dev.startswith("cuda"):
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "liger"])
    p.add_argument("--no-track", dest="track", action="store_false", help="skip the dispatch tracker (faster)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    rows = []
    for chunk in (0, args.chunk):
        cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk", str(chunk), "--device", args.device, "--backend", args.backend]
        if not args.track:
            cmd.append("--no-track")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    gib = 2.0**30
    keys = [k for k in ("tracked_peak_bytes", "rss_growth_bytes", "cuda_peak_bytes") if rows[0].get(k) is not None]
    print(f"causal_lm_loss fwd+bwd: {args.tokens} tokens, vocab {args.vocab}, hidden {args.hidden}, {args.device}")
    print(f"{'variant':<14}{'seconds':>9}{'loss':>14}" + "".join(f"{k.replace('_bytes', ' GiB'):>22}" for k in keys))
    for r in rows:
        name = "plain" if r["chunk"] == 0 else f"chunk {r['chunk']}"
        print(f"{name:<14}{r['seconds']:>9.2f}{r['loss']:>14.2f}" + "".join(f"{r[k] / gib:>22.3f}" for k in keys))
    ratios = ", ".join(f"{k.replace('_bytes', '')} {rows[1][k] / max(rows[0][k], 1):.3f}" for k in keys)
    print(f"chunked / plain: {ratios}")


if __name__ == "__main__":
    main()
