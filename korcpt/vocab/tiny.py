"""A small Gemma-style tokenizer trained on the project's own sample data (tests, tiny configs).

Byte-fallback BPE over SentencePiece-style pieces (``▁`` marks a preceding space), with Gemma's
special-token ids (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``=3) and ``<bos>`` prepended, so
that code paths exercised with it behave as with the real Gemma 3 tokenizer, only smaller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

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
