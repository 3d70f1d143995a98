"""Shared helpers for tests that train: a synthetic Korean corpus, a tiny tokenizer and shards built
from it with the real tools, a tiny model from the shipped architecture file, a run config pointing at
them, one way to run a training (in this process or launched), the sample-id logs a run writes, and
ports the OS hands out."""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_ARCH = ROOT / "configs/models/tiny_gemma3.json"

_SUBJECTS = ["당뇨병", "고혈압", "천식", "폐렴", "빈혈", "위염", "간염", "골다공증", "편두통", "통풍"]
_PREDICATES = [
    "혈당 조절 장애로 인한 대사 질환이다", "혈압이 정상 범위보다 높은 상태이다", "기도가 좁아지는 만성 염증 질환이다",
    "폐에 생기는 염증이다", "혈액의 산소 운반 능력이 떨어진 상태이다", "위 점막에 생긴 염증이다",
    "간세포에 염증이 생긴 상태이다", "뼈의 밀도가 낮아져 쉽게 부러지는 질환이다", "반복되는 심한 두통이다",
    "요산이 관절에 쌓여 생기는 관절염이다",
]


def synthetic_corpus(path: Path, n_docs: int = 240, seed: int = 0) -> Path:
    """Deterministic Korean medical sentences as a {"text", "source"} JSONL corpus."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            k = rng.randrange(len(_SUBJECTS))
            sentences = [f"{_SUBJECTS[k]}은 {_PREDICATES[k]}." for _ in range(rng.randint(2, 6))]
            sentences.append(f"문서 번호 {i}번은 {_SUBJECTS[(k + 1) % len(_SUBJECTS)]}에 대한 설명이다.")
            source = "korean" if i % 3 else "medical_dict"
            fh.write(json.dumps({"text": " ".join(sentences), "source": source}, ensure_ascii=False) + "\n")
    return path


def heldout_text(path: Path) -> Path:
    """Documents in the synthetic corpus's words that it never holds (other subject/predicate pairs),
    one a line: text never trained on, for ``eval.heldout_file``."""
    lines = [f"{_SUBJECTS[k]}은 {_PREDICATES[(k + 3) % len(_PREDICATES)]}." for k in range(0, len(_SUBJECTS), 3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tiny_data(root: Path, seq_len: int = 64) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir) built in ``root`` with korcpt's own tokenizer trainer and shard writer."""
    from korcpt.shards.writer import ShardOptions, write_shards
    from korcpt.assets import train_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(root / "corpus.jsonl")
    tok_dir = train_tiny_tokenizer([corpus], root / "tokenizer", vocab_size=512)
    shards = root / "shards"
    write_shards(corpus, shards, ShardOptions(tokenizer=str(tok_dir), seq_len=seq_len, val_fraction=0.1,
                                              shard_tokens=4096, seed=1, workers=1))
    return tok_dir, shards


def build_pretrained_tiny(root: Path, tok_dir: Path, multimodal: bool = False) -> Path:
    """A random tiny Gemma 3 (seed 5) saved with its tokenizer as a pretrained directory ``root/tiny``."""
    import torch
    from transformers import AutoTokenizer

    from korcpt.config import ModelConfig
    from korcpt.model.load import build_random_model

    tok = AutoTokenizer.from_pretrained(tok_dir)
    arch = "tiny_gemma3_mm.json" if multimodal else "tiny_gemma3.json"
    mcfg = ModelConfig(name=str(ROOT / "configs/models" / arch), random_init=True, attn_implementation="eager")
    model = build_random_model(mcfg, len(tok), torch.float32, seed=5)
    out = root / "tiny"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_extended_tiny(root: Path, pretrained: Path) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): ``pretrained``'s tokenizer extended with 40 tokens learned from the
    synthetic corpus, and shards of that corpus built with it."""
    from transformers import AutoTokenizer

    from korcpt.shards.writer import ShardOptions, write_shards
    from korcpt.vocab.extend import build_extended_tokenizer, learn_extension

    root.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(root / "corpus.jsonl")
    base = AutoTokenizer.from_pretrained(pretrained)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    tok_dir = root / "tokenizer"
    build_extended_tokenizer(base, learn_extension(base, texts, max_new_tokens=40), tok_dir)
    shards = root / "shards"
    write_shards(corpus, shards, ShardOptions(tokenizer=str(tok_dir), seq_len=64, val_fraction=0.1,
                                              shard_tokens=4096, seed=1, workers=1))
    return tok_dir, shards


def run_config(path: Path, tok_dir: Path, shards: Path, out: Path, **sections) -> Path:
    """Write a tiny run config (random tiny Gemma 3) with section overrides; returns its path."""
    cfg = {
        "data": {"shards": str(shards)},
        "model": {"name": str(TINY_ARCH), "tokenizer": str(tok_dir),
                  "random_init": True, "dtype": "float32", "attn_implementation": "eager"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "embeddings": "frozen"},
        "train": {"lr": 0.005, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 6, "warmup_steps": 1,
                  "seed": 3, "grad_clip": 1.0},
        "eval": {"steps": 3, "max_val_sequences": 8, "batch_size": 4},
        # the last step's weights: the tests of training mechanics compare those (tests/test_train.py
        # tests output.adapter: best, the shipped default)
        "output": {"dir": str(out), "adapter": "last"},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def initial_adapter(cfg_path: Path) -> dict:
    """The adapter tensors a run of ``cfg_path`` starts from (same loader, seed and LoRA setup as the
    trainer), keyed as in ``adapter_model.safetensors``: what "moved" is measured against."""
    import torch

    from korcpt.config import load_config
    from korcpt.model.load import load_model_and_tokenizer
    from korcpt.model.lora import apply_lora
    from korcpt.train.outputs import adapter_state

    cfg = load_config(cfg_path)
    model, _, new_ids = load_model_and_tokenizer(cfg.model, torch.device("cpu"), cfg.train.seed)
    state, _, _ = adapter_state(apply_lora(model, cfg.lora, new_ids, seed=cfg.train.seed), cfg)
    return state


def moved_fractions(initial: dict, final: dict) -> dict[str, float]:
    """key -> fraction of the tensor's entries whose saved value differs from the initial one."""
    assert initial.keys() == final.keys(), sorted(set(initial) ^ set(final))
    return {k: (final[k].float() != initial[k].float()).float().mean().item() for k in initial}


def tiny_model(vocab_size: int, seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A random Gemma3ForCausalLM of the shipped tiny architecture (configs/models/tiny_gemma3.json) with
    ``vocab_size`` rows, seeded by ``seed``, in eval mode; ``overrides`` replace config fields."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    arch = {k: v for k, v in json.loads(TINY_ARCH.read_text()).items() if k != "model_type"}
    config = Gemma3TextConfig(**{**arch, "vocab_size": vocab_size, **overrides})
    if attn_implementation:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).float().eval()


PORT_BLOCK = 500  # ports each pytest-xdist worker owns, below Linux's ephemeral range (32768-)
_next_port = itertools.count()


def free_port() -> int:
    """A TCP port that is free now, from this pytest-xdist worker's own block of ports (10000 + 500 per
    worker), each handed out once per session: no two tests get the same port, in one process or across
    workers (a port from a per-process salted string hash, or from the OS's port 0, could repeat)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    while True:
        offset = next(_next_port)
        assert offset < PORT_BLOCK, f"this worker has handed out all {PORT_BLOCK} of its ports"
        port = 10000 + PORT_BLOCK * worker + offset
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # held by something outside the suite: take the next
                continue
        return port


def samples(out: Path, rank: int = 0) -> list[dict]:
    """The records of ``out/samples/rankNNN.jsonl`` (one per optimizer step attempt: step, ids, ...)."""
    return [json.loads(line) for line in (out / "samples" / f"rank{rank:03d}.jsonl").read_text().splitlines()]


def step_ids(out: Path, rank: int = 0) -> dict[int, list[int]]:
    """step -> sequence ids of ``rank``, the newest record of a step winning (a resumed run replays)."""
    return {r["step"]: r["ids"] for r in samples(out, rank)}


def trained_ids(out: Path) -> list[int]:
    """Every sequence id every rank logged, in rank then step order (replays included)."""
    ranks = sorted(int(p.stem[4:]) for p in (out / "samples").glob("rank*.jsonl"))
    return [i for rank in ranks for record in samples(out, rank) for i in record["ids"]]


def run_info(out: Path) -> dict:
    return json.loads((out / "training_info.json").read_text())


def train_run(tmp_path: Path, tiny_data, name: str, resume: str = "", **sections) -> tuple[dict, Path]:
    """Train in this process on ``tiny_data`` (tokenizer, shards) with ``run_config``'s defaults and
    ``sections`` overrides; (training info, output dir ``tmp_path/name``)."""
    from korcpt.config import load_config
    from korcpt.train.loop import train

    tok, shards = tiny_data
    out = tmp_path / name
    cfg = load_config(run_config(tmp_path / f"{name}.yaml", tok, shards, out, **sections))
    return train(cfg, resume=resume), out


LAUNCHERS = {
    "ddp": "configs/accelerate/cpu_ddp.yaml",
    "zero2": "configs/accelerate/cpu_zero2.yaml",
    "zero3": "configs/accelerate/cpu_zero3.yaml",
}


# processes each launcher started in this test session (tests/conftest.py prints them)
LAUNCHES: dict[str, int] = {}


def launch_command(mode: str, args: list[str], script: str | Path = "launch/train.py") -> list[str]:
    """The command that runs ``script args``: ``python`` for mode "one", else a 2-process ``accelerate
    launch`` with ``LAUNCHERS[mode]`` on a port the OS hands out."""
    LAUNCHES[mode] = LAUNCHES.get(mode, 0) + 1
    if mode == "one":
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", LAUNCHERS[mode],
            "--main_process_port", str(free_port()), str(script), *args]


def launched_run(mode: str, args: list[str], script: str | Path = "launch/train.py", env: dict | None = None,
                 timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``launch_command`` to the end in a subprocess (one thread per process); with ``check``, fails
    on a nonzero exit."""
    env = {**os.environ, "KORCPT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(launch_command(mode, args, script), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc
