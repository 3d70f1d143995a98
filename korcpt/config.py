"""One typed config for a whole run: YAML in, dotted overrides, validated in one place.

A run is one YAML file with the sections ``data``, ``model``, ``lora``, ``train``, ``eval`` and
``output``; each maps onto a dataclass below whose fields carry an attribute docstring (read by
:func:`field_docs`) and, for numbers, their allowed range (:func:`bounded`). ``--set section.key=value``
overrides any field; the flags of the original command line in train_raw_korean_text.md (``--model``,
``--tokenizer-path``, ...) are shorthands for overrides (:data:`SHORTHANDS`). :func:`validate` reports
every problem at once, naming the key, the file and the fix, before any model is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from korcpt.errors import ConfigError


@dataclass(frozen=True)
class Bounds:
    """The range a number field must lie in, declared beside the field and checked by :func:`validate`.

    ``note`` says what a boundary value means (``0 = all``); ``zero_off`` also accepts 0 as "off"
    beside the range (``eval.target_ppl``: 0 or above 1).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""
    zero_off: bool = False

    def holds(self, value: float) -> bool:
        if self.zero_off and value == 0:
            return True
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``, ``in 0..5`` (an integer range), ``0 (off) or > 1``."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if high is None:
            text = f"{'>=' if self.gt is None else '>'} {low}"
        elif integer:
            text = f"in {low}..{high}"
        else:
            text = f"in {'[' if self.gt is None else '('}{low}, {high}{']' if self.lt is None else ')'}"
        if self.zero_off:
            text = f"0 (off) or {text}"
        return f"{text} ({self.note})" if self.note else text


def bounded(default: float, **bounds: Any) -> Any:
    """A field with ``default`` that must lie in :class:`Bounds` ``(**bounds)``."""
    return field(default=default, metadata={"bounds": Bounds(**bounds)})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring of each field of dataclass ``cls`` (the string under it), as one line.

    Every config and options dataclass documents its fields this way; tools turn them into ``--help``
    (:func:`korcpt.cli.add_options`). Read from the class source with :mod:`ast` rather than kept in
    ``field(metadata=...)``, so that a field stays ``name: type = default`` with its text under it, where
    editors and documentation tools show it.
    """
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass
class DataConfig:
    shards: str = ""
    """Directory of token shards written by tools/build_shards.py (holds manifest.json), or its webdataset
    export as a URL webdataset opens (file:, https://, pipe:CMD): the export's root or a brace pattern of
    its train tars, e.g. https://host/shards/wds/train/shard-{00000..00009}.tar (manifest.json beside wds/)."""
    document_mask: bool = False
    """Restart positions and mask attention at every document boundary inside a packed sequence."""
    verify_checksums: bool = True
    """Verify every shard's SHA-256 when training starts (slower start on very large sets)."""
    num_workers: int = bounded(0, ge=0)
    """DataLoader worker processes per rank (0 reads in the training process)."""


@dataclass
class ModelConfig:
    name: str = "gemma3-270m"
    """A preset (gemma3-270m, medgemma-4b, medgemma-27b), a local HuggingFace directory, a hub id, a .gguf
    file, or, with random_init, a model config (.json/.yaml or a directory holding config.json)."""
    tokenizer: str = ""
    """Tokenizer directory or preset (--tokenizer-path of launch/train.py); empty means the model's own."""
    new_rows: str = ""
    """Directory of distilled new-token rows (tools/distill_rows.py) for an extended tokenizer: the new
    tokens' input rows and untied output rows start from it instead of the mean of their pieces."""
    random_init: bool = False
    """Build the model from its config with random weights (tests, benchmarks); vocab size follows the tokenizer."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype: auto is bfloat16 on CUDA and float32 on CPU."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (sdpa, eager, flash_attention_2, flex_attention)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant, so LoRA gets gradients)."""
    trust_remote_code: bool = False
    """Import code shipped inside a model or tokenizer directory; off unless you trust that directory."""
    device: str = ""
    """Device for single-process runs (cpu, cuda, cuda:0); empty lets Accelerate choose."""


@dataclass
class LoraConfig:
    r: int = bounded(16, ge=1)
    """LoRA rank."""
    alpha: float = bounded(32.0, gt=0)
    """LoRA alpha; with rsLoRA the scale is alpha / sqrt(r)."""
    dropout: float = bounded(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: Any = "all-linear"
    """Module names to adapt; "all-linear" means every linear projection of the language model."""
    use_rslora: bool = True
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    embeddings: Literal["frozen", "new_tokens", "full"] = "frozen"
    """Which embedding rows train: frozen, new_tokens (rows added by vocabulary extension), full (tied
    embedding/head)."""
    embedding_lr: float = bounded(0.0, ge=0, note="0 = train.lr")
    """Learning rate of the embedding parameters; 0 means train.lr."""
    embeddings_first_steps: int = bounded(0, ge=0, note="0 = no stage")
    """Staged training (EEVE): the first N optimizer steps train only the embedding rows (LoRA's learning
    rate is 0), then LoRA starts its own warmup and decay over the remaining steps; 0: no stage."""


@dataclass
class TrainConfig:
    lr: float = bounded(2e-5, gt=0)
    """Peak learning rate of AdamW."""
    micro_batch_size: int = bounded(2, ge=1)
    """Sequences per micro-batch per process."""
    grad_accum: int = bounded(16, ge=1)
    """Micro-batches accumulated into one optimizer step."""
    max_steps: int = bounded(0, ge=0)
    """Stop after this many optimizer steps (0: run `epochs` epochs)."""
    epochs: int = bounded(1, ge=1)
    """Passes over the training shards (used when max_steps is 0)."""
    max_samples: int = bounded(0, ge=0, note="0 = all")
    """Samples as train_raw_korean_text.md counts them: train on the first N documents of the shuffled
    corpus (the packed sequences that hold them), the same ones every epoch (0: all)."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear warmup steps (0: warmup_ratio of the total steps)."""
    warmup_ratio: float = bounded(0.03, ge=0, lt=1)
    """Fraction of total steps used for warmup when warmup_steps is 0."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay (not applied to embeddings)."""
    grad_clip: float = bounded(1.0, ge=0, note="0 = off")
    """Clip the global gradient norm to this value (0: no clipping)."""
    save_steps: int = bounded(0, ge=0)
    """Save a checkpoint every this many optimizer steps (0: only at the end)."""
    keep_last: int = bounded(2, ge=1)
    """Checkpoints kept in output.dir/checkpoints (older ones are deleted)."""
    seed: int = 42
    """Seed of the data order, LoRA initialisation and dropout."""
    log_steps: int = bounded(1, ge=1)
    """Log train/* scalars every this many optimizer steps."""
    max_bad_steps: int = bounded(5, ge=1)
    """Stop after this many consecutive optimizer steps with a non-finite loss or gradient."""
    loss_chunk_tokens: int = bounded(0, ge=0)
    """Tokens per chunk of the cross-entropy over the output head (0: plain loss with full logits)."""
    peak_tflops: float = bounded(0.0, ge=0, note="0 = look up the GPU")
    """Dense peak TFLOP/s of one device for MFU (0: the datasheet value of a known GPU; no MFU on CPU)."""


@dataclass
class EvalConfig:
    steps: int = bounded(0, ge=0)
    """Validation loss/perplexity every this many optimizer steps (0: only at start and end, or per_epoch)."""
    per_epoch: int = bounded(0, ge=0)
    """Instead of steps: this many validation evaluations per epoch of the data, so that patience can
    trigger whatever the run's length (0: use steps)."""
    max_val_sequences: int = bounded(0, ge=0)
    """Cap on validation sequences (the first N of the val shards in stored order; 0: all)."""
    heldout_file: str = ""
    """Text never trained on (.txt: a document a line; .jsonl: {"text"} a line), scored with every
    validation evaluation in bits per character (heldout_bpc), which compares tokenizers (empty: off)."""
    mcq_file: str = ""
    """KorMedMCQA-format JSONL to score (empty: no MCQ evaluation)."""
    mcq_fewshot_file: str = ""
    """Few-shot examples file in the same format (empty: zero-shot)."""
    mcq_shots: int = bounded(0, ge=0, le=5)
    """Few-shot examples per prompt (0..5)."""
    mcq_mode: Literal["letter", "choice"] = "letter"
    """letter: next-token probability of A..E after "정답:"; choice: log-likelihood of each option's text."""
    mcq_steps: int = bounded(0, ge=0)
    """MCQ accuracy every this many optimizer steps (0: with every validation evaluation when mcq_file is set)."""
    mcq_max_questions: int = bounded(0, ge=0)
    """Cap on MCQ questions scored (the first N; 0: all)."""
    batch_size: int = bounded(4, ge=1)
    """Sequences per evaluation forward pass."""
    patience: int = bounded(0, ge=0)
    """Early stopping: evaluations without an improvement of at least min_delta before stopping (0: off)."""
    min_delta: float = bounded(0.01, ge=0)
    """Early stopping: smallest decrease of validation loss that counts as an improvement."""
    target_ppl: float = bounded(0.0, gt=1, zero_off=True)
    """Stop once validation perplexity is at or below this (0: off)."""


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    """Output directory: adapter, tokenizer/, training_info.json, checkpoints/, tensorboard/."""
    adapter: Literal["best", "last"] = "best"
    """The adapter saved at the end: best (lowest validation loss of any evaluation, baseline included;
    kept in checkpoints/best outside rotation) or last (the weights of the last step)."""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = field(default="", metadata={"internal": True})
    """The YAML file this config came from (for messages and relative paths); not a setting."""

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

# The original command line's flags (train_raw_korean_text.md), as shorthands for overrides.
SHORTHANDS = {
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
    """Every impossible value of ``cfg`` as a message naming the key and the fix (empty when valid).

    Ranges are declared on the fields (:func:`bounded`) and checked here in field order; the rules
    below them relate fields to each other or name files.
    """
    p: list[str] = []
    for section, cls in _SECTION_TYPES.items():
        values, hints = getattr(cfg, section), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            bounds, value = f.metadata.get("bounds"), getattr(values, f.name)
            if bounds is not None and not bounds.holds(value):
                p.append(f"{section}.{f.name} must be {bounds.describe(hints[f.name] is int)}, found {value}")
    t, e, lo, m = cfg.train, cfg.eval, cfg.lora, cfg.model

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

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
    need(not (e.steps and e.per_epoch), f"eval.steps {e.steps} and eval.per_epoch {e.per_epoch}: set one of them")
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


def apply_shorthands(overrides: list[str], **flags: Any) -> list[str]:
    """Turn shorthand flags (``model=...``, ``epochs=...``) into overrides, keeping ``--set`` ones last."""
    out = [f"{SHORTHANDS[name]}={value}" for name, value in flags.items() if value is not None]
    return out + list(overrides)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (beside every output and checkpoint)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_json(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), ensure_ascii=False, indent=2)
