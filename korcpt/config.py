"""One typed config for a whole run: YAML in, dotted overrides, validated in one place.

A run is one YAML file with the sections ``data``, ``model``, ``lora``, ``train``, ``eval`` and
``output``; each maps onto a dataclass below whose fields carry a one-line docstring (the comment
above each field). ``--set section.key=value`` overrides any field; the seed's flags (``--model``,
``--tokenizer-path``, ...) are shorthands for overrides. :func:`validate` reports every problem at
once, naming the key, the file and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from korcpt.errors import ConfigError


@dataclass
class DataConfig:
    # Directory of token shards written by tools/build_shards.py (holds manifest.json), or its webdataset
    # export as a URL webdataset opens (file:, https://, pipe:CMD): the export's root or a brace pattern of
    # its train tars, e.g. https://host/shards/wds/train/shard-{00000..00009}.tar (manifest.json beside wds/).
    shards: str = ""
    # Restart positions and mask attention at every document boundary inside a packed sequence.
    document_mask: bool = False
    # Verify every shard's SHA-256 when training starts (slower start on very large sets).
    verify_checksums: bool = True
    # DataLoader worker processes per rank (0 reads in the training process).
    num_workers: int = 0


@dataclass
class ModelConfig:
    # A preset (gemma3-270m, medgemma-4b, medgemma-27b), a local HuggingFace directory, a hub id, a .gguf
    # file, or, with random_init, a model config (.json/.yaml or a directory holding config.json).
    name: str = "gemma3-270m"
    # Tokenizer directory or preset (the seed's --tokenizer-path); empty means the model's own.
    tokenizer: str = ""
    # Directory of distilled new-token rows (tools/distill_rows.py) for an extended tokenizer: the new
    # tokens' input rows and untied output rows start from it instead of the mean of their pieces.
    new_rows: str = ""
    # Build the model from its config with random weights (tests, benchmarks); vocab size follows the tokenizer.
    random_init: bool = False
    # Parameter dtype: auto is bfloat16 on CUDA and float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention kernel passed to transformers (sdpa, eager, flash_attention_2, flex_attention).
    attn_implementation: str = "sdpa"
    # Recompute activations in backward (non-reentrant, so LoRA gets gradients).
    gradient_checkpointing: bool = False
    # Import code shipped inside a model or tokenizer directory; off unless you trust that directory.
    trust_remote_code: bool = False
    # Device for single-process runs (cpu, cuda, cuda:0); empty lets Accelerate choose.
    device: str = ""


@dataclass
class LoraConfig:
    # LoRA rank.
    r: int = 16
    # LoRA alpha; with rsLoRA the scale is alpha / sqrt(r).
    alpha: float = 32.0
    # Dropout on the LoRA input.
    dropout: float = 0.05
    # Module names to adapt; "all-linear" means every linear projection of the language model.
    target_modules: Any = "all-linear"
    # Rank-stabilised LoRA scaling (alpha / sqrt(r)).
    use_rslora: bool = True
    # Which embedding rows train: frozen, new_tokens (rows added by vocabulary extension), full (tied embedding/head).
    embeddings: Literal["frozen", "new_tokens", "full"] = "frozen"
    # Learning rate of the embedding parameters; 0 means train.lr.
    embedding_lr: float = 0.0
    # Staged training (EEVE): the first N optimizer steps train only the embedding rows (LoRA's learning
    # rate is 0), then LoRA starts its own warmup and decay over the remaining steps; 0: no stage.
    embeddings_first_steps: int = 0


@dataclass
class TrainConfig:
    # Peak learning rate of AdamW.
    lr: float = 2e-5
    # Sequences per micro-batch per process.
    micro_batch_size: int = 2
    # Micro-batches accumulated into one optimizer step.
    grad_accum: int = 16
    # Stop after this many optimizer steps (0: run `epochs` epochs).
    max_steps: int = 0
    # Passes over the training shards (used when max_steps is 0).
    epochs: int = 1
    # The spec's samples: train on the first N documents of the shuffled corpus (the packed sequences
    # that hold them), the same ones every epoch (0: all).
    max_samples: int = 0
    # Linear warmup steps (0: warmup_ratio of the total steps).
    warmup_steps: int = 0
    # Fraction of total steps used for warmup when warmup_steps is 0.
    warmup_ratio: float = 0.03
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # AdamW weight decay (not applied to embeddings).
    weight_decay: float = 0.0
    # Clip the global gradient norm to this value (0: no clipping).
    grad_clip: float = 1.0
    # Save a checkpoint every this many optimizer steps (0: only at the end).
    save_steps: int = 0
    # Checkpoints kept in output.dir/checkpoints (older ones are deleted).
    keep_last: int = 2
    # Seed of the data order, LoRA initialisation and dropout.
    seed: int = 42
    # Log train/* scalars every this many optimizer steps.
    log_steps: int = 1
    # Stop after this many consecutive optimizer steps with a non-finite loss or gradient.
    max_bad_steps: int = 5
    # Tokens per chunk of the cross-entropy over the output head (0: plain loss with full logits).
    loss_chunk_tokens: int = 0
    # Dense peak TFLOP/s of one device for MFU (0: the datasheet value of a known GPU; no MFU on CPU).
    peak_tflops: float = 0.0


@dataclass
class EvalConfig:
    # Validation loss/perplexity every this many optimizer steps (0: only at start and end, or per_epoch).
    steps: int = 0
    # Instead of steps: this many validation evaluations per epoch of the data, so that patience can
    # trigger whatever the run's length (0: use steps).
    per_epoch: int = 0
    # Cap on validation sequences (the first N of the val shards in stored order; 0: all).
    max_val_sequences: int = 0
    # Text never trained on (.txt: a document a line; .jsonl: {"text"} a line), scored with every
    # validation evaluation in bits per character (heldout_bpc), which compares tokenizers (empty: off).
    heldout_file: str = ""
    # KorMedMCQA-format JSONL to score (empty: no MCQ evaluation).
    mcq_file: str = ""
    # Few-shot examples file in the same format (empty: zero-shot).
    mcq_fewshot_file: str = ""
    # Few-shot examples per prompt (0..5).
    mcq_shots: int = 0
    # letter: next-token probability of A..E after "정답:"; choice: log-likelihood of each option's text.
    mcq_mode: Literal["letter", "choice"] = "letter"
    # MCQ accuracy every this many optimizer steps (0: with every validation evaluation when mcq_file is set).
    mcq_steps: int = 0
    # Cap on MCQ questions scored (the first N; 0: all).
    mcq_max_questions: int = 0
    # Sequences per evaluation forward pass.
    batch_size: int = 4
    # Early stopping: evaluations without an improvement of at least min_delta before stopping (0: off).
    patience: int = 0
    # Early stopping: smallest decrease of validation loss that counts as an improvement.
    min_delta: float = 0.01
    # Stop once validation perplexity is at or below this (0: off).
    target_ppl: float = 0.0


@dataclass
class OutputConfig:
    # Output directory: adapter, tokenizer/, training_info.json, checkpoints/, tensorboard/.
    dir: str = "outputs/run"
    # The adapter saved at the end: best (lowest validation loss of any evaluation, baseline included;
    # kept in checkpoints/best outside rotation) or last (the weights of the last step).
    adapter: Literal["best", "last"] = "best"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # The YAML file this config came from (for messages and relative paths); not a setting.
    source: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what is saved beside every output)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


_SECTION_TYPES = {
    "data": DataConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "output": OutputConfig,
}

# The seed's command-line flags, as shorthands for overrides.
SEED_FLAGS = {
    "model": "model.name",
    "tokenizer_path": "model.tokenizer",
    "max_samples": "train.max_samples",
    "epochs": "train.epochs",
    "device": "model.device",
}


def load_config(path: str | Path | None, overrides: list[str] | None = None, check_files: bool = True) -> RunConfig:
    """Load a run config from YAML, apply ``section.key=value`` overrides and validate it.

    Args:
        path: YAML file; None starts from the defaults.
        overrides: strings like ``train.lr=1e-4``; values are parsed as YAML scalars/lists.
        check_files: also require the files the config names (shards, MCQ files) to exist;
            off for tools that only read the architecture (plan_memory).

    Raises:
        ConfigError: naming every unknown key, wrong type and impossible value at once.
    """
    raw: dict[str, Any] = {}
    source = ""
    if path is not None:
        source = str(path)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            raw = yaml.load(text, Loader=_SafeLoader) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc, text)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    problems: list[str] = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            parsed = yaml.load(value, Loader=_SafeLoader) if value.strip() else ""
        except (yaml.YAMLError, RecursionError):
            parsed = value  # kept as text: the field's type check then names the key
        sub = raw.setdefault(section, {})
        if isinstance(sub, dict):
            sub[name] = parsed
        else:
            problems.append(f"{section}: expected a mapping, found {type(sub).__name__}")
    cfg = _build(raw, source, problems)
    problems += validate(cfg, check_files)
    if problems:
        where = f" in {source}" if source else ""
        raise ConfigError(f"{len(problems)} problem(s){where}: " + "; ".join(problems))
    return cfg


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose failing scalar constructors raise a YAML error with a position.

    SafeLoader raises a bare ValueError for a scalar it resolves but cannot build: ``2001-02-30``
    (a timestamp), ``!!int abc``, ``!!float x``.
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {getattr(node, 'value', '')!r} ({exc})", node.start_mark) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line: where (line and column, 1-based) and what PyYAML found wrong."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}: "
    elif isinstance(getattr(exc, "position", None), int):  # a ReaderError (control character) has a position only
        where = f"line {text.count(chr(10), 0, exc.position) + 1}: "
    else:
        where = ""
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and (mark is None or start.line != mark.line):
        # e.g. an unclosed quote is found at the end of the file; say where it was opened
        problem = f"{problem} ({context} at line {start.line + 1}, column {start.column + 1})"
    return where + " ".join(str(problem).split())


def _build(raw: dict[str, Any], source: str, problems: list[str]) -> RunConfig:
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            problems.append(f"unknown section {name!r} (known: {', '.join(_SECTION_TYPES)})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a mapping, found {type(value).__name__}")
            continue
        sections[name] = _build_section(name, _SECTION_TYPES[name], value, problems)
    return RunConfig(**sections, source=source)


def _build_section(section: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)  # keep the message one line
            problems.append(f"unknown key {section}.{shown}{hint}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            problems.append(f"{section}.{key}: {exc}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any) -> Any:
    """Check ``value`` against a field type; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"must be one of {', '.join(map(str, typing.get_args(hint)))}, found {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"expected {hint}, found {type(value).__name__} {value!r}")
    if hint is type(None):
        if value is not None:
            raise TypeError("expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, found {type(value).__name__} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, found {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"expected a number, found str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, found {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, found {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, found {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint}")


def validate(cfg: RunConfig, check_files: bool = True) -> list[str]:
    """Every impossible value of ``cfg`` as a message naming the key and the fix (empty when valid)."""
    p: list[str] = []
    t, e, lo, m = cfg.train, cfg.eval, cfg.lora, cfg.model

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    need(t.lr > 0, f"train.lr must be > 0, found {t.lr}")
    need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, found {t.micro_batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, found {t.grad_accum}")
    need(t.max_steps >= 0, f"train.max_steps must be >= 0, found {t.max_steps}")
    need(t.epochs >= 1, f"train.epochs must be >= 1, found {t.epochs}")
    need(t.max_samples >= 0, f"train.max_samples must be >= 0 (0 = all), found {t.max_samples}")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, found {t.warmup_steps}")
    need(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), found {t.warmup_ratio}")
    need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], found {t.min_lr_ratio}")
    need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, found {t.weight_decay}")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), found {t.grad_clip}")
    need(t.save_steps >= 0, f"train.save_steps must be >= 0, found {t.save_steps}")
    need(t.keep_last >= 1, f"train.keep_last must be >= 1, found {t.keep_last}")
    need(t.log_steps >= 1, f"train.log_steps must be >= 1, found {t.log_steps}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, found {t.max_bad_steps}")
    need(t.peak_tflops >= 0, f"train.peak_tflops must be >= 0 (0 = look up the GPU), found {t.peak_tflops}")
    need(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens must be >= 0, found {t.loss_chunk_tokens}")
    need(lo.r >= 1, f"lora.r must be >= 1, found {lo.r}")
    need(lo.alpha > 0, f"lora.alpha must be > 0, found {lo.alpha}")
    need(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), found {lo.dropout}")
    need(lo.embedding_lr >= 0, f"lora.embedding_lr must be >= 0 (0 = train.lr), found {lo.embedding_lr}")
    need(lo.embeddings_first_steps >= 0,
         f"lora.embeddings_first_steps must be >= 0 (0 = no stage), found {lo.embeddings_first_steps}")
    need(not lo.embeddings_first_steps or lo.embeddings != "frozen",
         "lora.embeddings_first_steps trains the embedding rows first: it needs lora.embeddings new_tokens or full")
    need(not (lo.embeddings_first_steps and t.max_steps) or lo.embeddings_first_steps < t.max_steps,
         f"lora.embeddings_first_steps ({lo.embeddings_first_steps}) must be below train.max_steps ({t.max_steps})")
    tm = lo.target_modules
    need(
        tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)),
        f"lora.target_modules must be 'all-linear' or a list of module names, found {tm!r}",
    )
    need(bool(m.name), "model.name must name a preset, directory, hub id or file")
    need(not m.new_rows or (m.tokenizer and lo.embeddings != "frozen"),
         "model.new_rows holds rows of an extended tokenizer's new tokens: it needs model.tokenizer and "
         "lora.embeddings new_tokens or full (frozen rows would not be saved with the adapter)")
    need(m.device in ("", "cpu", "cuda", "mps") or m.device.startswith("cuda:"),
         f"model.device must be cpu, cuda or cuda:N, found {m.device!r}")
    for key, value in (("eval.steps", e.steps), ("eval.max_val_sequences", e.max_val_sequences),
                       ("eval.mcq_steps", e.mcq_steps), ("eval.mcq_max_questions", e.mcq_max_questions),
                       ("eval.patience", e.patience), ("eval.per_epoch", e.per_epoch),
                       ("data.num_workers", cfg.data.num_workers)):
        need(value >= 0, f"{key} must be >= 0, found {value}")
    need(0 <= e.mcq_shots <= 5, f"eval.mcq_shots must be in 0..5, found {e.mcq_shots}")
    need(e.batch_size >= 1, f"eval.batch_size must be >= 1, found {e.batch_size}")
    need(not (e.steps and e.per_epoch), f"eval.steps {e.steps} and eval.per_epoch {e.per_epoch}: set one of them")
    need(e.min_delta >= 0, f"eval.min_delta must be >= 0, found {e.min_delta}")
    need(e.target_ppl == 0 or e.target_ppl > 1, f"eval.target_ppl must be 0 (off) or > 1, found {e.target_ppl}")
    need(not (e.mcq_shots and not e.mcq_fewshot_file), "eval.mcq_shots > 0 needs eval.mcq_fewshot_file")
    need(bool(cfg.output.dir), "output.dir must not be empty")
    need(bool(cfg.data.shards), "data.shards must name a shard directory (tools/build_shards.py --out DIR)")
    if not check_files:
        return p
    if cfg.data.shards and not stream_source(cfg.data.shards):  # a URL is read when training starts
        shards = resolve_path(cfg, cfg.data.shards)
        need((shards / "manifest.json").is_file(),
             f"data.shards: no manifest.json in {shards} (build it with tools/build_shards.py --out {cfg.data.shards})")
    for key, value in (("eval.mcq_file", e.mcq_file), ("eval.mcq_fewshot_file", e.mcq_fewshot_file),
                       ("eval.heldout_file", e.heldout_file)):
        if value:
            need(resolve_path(cfg, value).is_file(), f"{key}: file not found: {value}")
    if m.new_rows:
        need((resolve_path(cfg, m.new_rows) / "rows.safetensors").is_file(),
             f"model.new_rows: no rows.safetensors in {m.new_rows} (write it with tools/distill_rows.py --out {m.new_rows})")
    return p


def stream_source(value: str) -> bool:
    """Whether ``data.shards`` names webdataset tars (a URL, or a path of ``.tar`` files) rather than a
    shard directory: ``pipe:...``, ``file:...``, ``https://...``, ``/data/x/wds/train/shard-{0..3}.tar``."""
    return value.startswith(("pipe:", "file:")) or "://" in value or ".tar" in value


def resolve_path(cfg: RunConfig, value: str) -> Path:
    """Paths in a config are relative to the working directory, as users type them."""
    return Path(value).expanduser()


def apply_seed_flags(overrides: list[str], **flags: Any) -> list[str]:
    """Turn the seed's flags (``model=...``, ``epochs=...``) into overrides, keeping ``--set`` ones last."""
    out = [f"{SEED_FLAGS[name]}={value}" for name, value in flags.items() if value is not None]
    return out + list(overrides)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (beside every output and checkpoint)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2)
