"""KorMedMCQA accuracy by likelihood, the way lm-evaluation-harness scores multiple-choice tasks.

A continued-pretraining model follows no chat prompt, so nothing is generated and parsed; the model's
own probabilities pick the answer:

``letter`` mode, one forward pass per question::

    {few-shot example 1}\\n\\n ... {few-shot example k}\\n\\n
    {question}
    A. {option A}
    ...
    E. {option E}
    정답:                      <- prediction = argmax over the next-token log-probs of " A" .. " E"

    (a few-shot example is the same block followed by " {answer letter}")

  The letter tokens: with the Gemma 3 tokenizer ``"정답: A"`` is ``정 답 : ▁A`` and ``"정답:A"`` is
  ``정 답 : A``; both are one token per letter and leave the prompt's tokens unchanged. The spaced form
  (``▁A`` .. ``▁E``) is used because it is how answers appear in running text and in the converted
  KorMedMCQA training text (``정답: 항문열창``), whereas ``A`` without a space is the token that starts
  the option lines. :func:`letter_token_ids` checks this on the actual prompts and falls back to the
  unspaced form (few-shot answers then unspaced too) only for a tokenizer where the spaced letter is
  not one token; if neither works it raises :class:`ModelError` (use ``choice`` mode).

``choice`` mode, five continuations per question (cloze style, options not listed)::

    {few-shot: question\\n정답: answer text}\\n\\n ... {question}\\n정답:  +  " {option text}"

  Each option's score is the sum of its tokens' log-probabilities (``accuracy_raw``) and that sum
  divided by the option's length in characters (``accuracy``, lm-eval's ``acc_norm``). Characters,
  not tokens, so that the normalised score does not change when the vocabulary is extended.

Sequences are left-padded with an attention mask and explicit position ids (0 at each row's first
real token), so every row ends at the last column and only the last few positions' logits are kept
(``logits_to_keep``): a 262k vocabulary never materialises logits for the whole prompt. Questions are
split across ranks (``rank::world_size``) with every rank running the same number of forward passes
(short ranks repeat a question and drop the result), as ZeRO-3 requires.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from korcpt.corpus.mcq import LETTERS, MCQItem, MCQRecordError, parse_mcq_record
from korcpt.errors import DataError, ModelError
from korcpt.eval.perplexity import model_device
from korcpt.files import Rejected, iter_jsonl
from korcpt.log import get_logger, progress
from korcpt.model.lora import unwrap_base
from korcpt.model.loss import forward_kwargs

log = get_logger(__name__)

CHANCE = 1.0 / len(LETTERS)
ANSWER_CUE = "정답:"
GROUP_KEYS = ("exam_type", "subject")
_Z95 = 1.959963984540054


# ---------------------------------------------------------------------------------------------- loading

def load_mcq(path: str | Path) -> tuple[list[MCQItem], list[str]]:
    """Read a KorMedMCQA JSONL file, keeping the valid records and describing the others.

    Args:
        path: JSONL with one ``{"question", "A".."E", "answer" (1-based)}`` object per line.

    Returns:
        ``(items, skipped)``: the valid records in file order and one ``"FILE:LINE: why"`` message per
        line that was skipped (invalid JSON or UTF-8, missing option, answer out of range, ...).
        Blank lines are ignored silently.

    Raises:
        DataError: the file is missing, unreadable or has no non-blank line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MCQ file not found: {path}")
    items: list[MCQItem] = []
    skipped: list[str] = []
    try:
        for rec in iter_jsonl(path, allow_empty=True):
            if isinstance(rec, Rejected):
                skipped.append(str(rec))
                continue
            try:
                items.append(parse_mcq_record(rec.value))
            except MCQRecordError as exc:
                skipped.append(f"{rec.where}: {exc}")
    except OSError as exc:
        raise DataError(f"cannot read MCQ file {path}: {exc.strerror or exc}") from None
    if not items and not skipped:
        raise DataError(f"MCQ file is empty: {path}")
    return items, skipped


# ---------------------------------------------------------------------------------------------- prompts

def select_fewshot(item: MCQItem, pool: Sequence[MCQItem], k: int) -> list[MCQItem]:
    """Exactly ``k`` examples for ``item`` from ``pool``, deterministically, never the question itself.

    Examples with the same ``exam_type`` come first, then the others, each in pool order; an example
    equal to ``item`` or with the same question text is never chosen.

    Raises:
        DataError: the pool has fewer than ``k`` usable examples for this item.
    """
    if k <= 0:
        return []
    usable = [ex for ex in pool if ex != item and ex.question != item.question]
    exam_type = item.meta.get("exam_type")
    same = [ex for ex in usable if exam_type is not None and ex.meta.get("exam_type") == exam_type]
    chosen = (same + [ex for ex in usable if not (exam_type is not None and ex.meta.get("exam_type") == exam_type)])[:k]
    if len(chosen) < k:
        raise DataError(f"few-shot pool has {len(chosen)} usable examples for a question, expected {k} "
                        f"(lower --shots or give a larger --fewshot file)")
    return chosen


def format_question(item: MCQItem) -> str:
    """The question, the lettered options ``A. ...`` .. ``E. ...`` one per line, and ``정답:``."""
    lines = [item.question, *(f"{letter}. {text}" for letter, text in zip(LETTERS, item.options)), ANSWER_CUE]
    return "\n".join(lines)


def build_letter_prompt(item: MCQItem, fewshot: Sequence[MCQItem], *, answer_sep: str = " ") -> str:
    """The ``letter``-mode prompt: the given few-shot examples (each answered), then the question.

    Args:
        item: the question to ask.
        fewshot: the examples to show, in order (see :func:`select_fewshot`); each is followed by
            ``answer_sep`` and its answer letter, and examples are separated by a blank line.
        answer_sep: between ``정답:`` and an example's letter; " " unless the tokenizer needs "".

    Raises:
        ValueError: an example is the question itself.
    """
    parts = []
    for ex in fewshot:
        if ex == item or ex.question == item.question:
            raise ValueError("a few-shot example is the question being asked")
        parts.append(f"{format_question(ex)}{answer_sep}{ex.answer_letter}")
    parts.append(format_question(item))
    return "\n\n".join(parts)


def build_choice_context(item: MCQItem, fewshot: Sequence[MCQItem]) -> str:
    """The ``choice``-mode context: answered examples then ``question\\n정답:``; options are scored as
    the continuation ``" " + option``."""
    parts = []
    for ex in fewshot:
        if ex == item or ex.question == item.question:
            raise ValueError("a few-shot example is the question being asked")
        parts.append(f"{ex.question}\n{ANSWER_CUE} {ex.answer_text}")
    parts.append(f"{item.question}\n{ANSWER_CUE}")
    return "\n\n".join(parts)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def letter_token_ids(tokenizer, prompts: Sequence[str], answer_sep: str) -> list[int] | None:
    """The token ids of ``answer_sep + "A"`` .. ``"E"`` if, after every prompt, each is exactly one
    token that leaves the prompt's own tokens unchanged and the five differ; else None."""
    ids: list[int] | None = None
    for prompt in prompts:
        base = _encode(tokenizer, prompt, True)
        found = []
        for letter in LETTERS:
            full = _encode(tokenizer, prompt + answer_sep + letter, True)
            if len(full) != len(base) + 1 or full[: len(base)] != base:
                return None
            found.append(full[-1])
        if len(set(found)) != len(LETTERS) or (ids is not None and found != ids):
            return None
        ids = found
    return ids


# ---------------------------------------------------------------------------------------------- scoring

def wilson_interval(k: int, n: int, z: float = _Z95) -> list[float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``[0, 1]`` when ``n`` is 0).

    The bounds always hold the estimate: ``low <= k / n <= high``, exactly 0.0 / 1.0 for k = 0 / k = n.
    """
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Rounding can put a bound a few ulps on the wrong side of p (5.6e-17 > 0.0 for k = 0): clamp to p.
    return [min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))]


def _run_requests(model, seqs: list[list[int]], n_cont: list[int], *, letter_ids: list[int] | None,
                  batch_size: int, pad_id: int, desc: str) -> list[list[float]]:
    """Score token sequences in left-padded batches.

    Letter requests (``n_cont`` 0) give the five log-probs of ``letter_ids`` after the last token;
    continuation requests give ``[sum of log-probs of the last n_cont tokens]``.
    """
    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # longest first: an OOM shows at once
    out: list[list[float]] = [[] for _ in seqs]
    starts = range(0, len(order), batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        idx = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        keep = 1 if letter_ids is not None else max(n_cont[i] for i in idx) + 1
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, width - len(seqs[i]):] = 1
        # Left padding: the first real token of each row is position 0, pads sit at 0 too (masked out).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                 "position_ids": position_ids.to(device)}
        output = model(**forward_kwargs(model, batch), logits_to_keep=keep)
        logits = output.logits if hasattr(output, "logits") else output[0]
        logp = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        # logp[:, j] is the distribution of the token at column width - keep + j + 1.
        for row, i in enumerate(idx):
            if letter_ids is not None:
                out[i] = logp[row, -1, letter_ids].tolist()
            else:
                n = n_cont[i]
                targets = torch.tensor(seqs[i][-n:], device=logp.device)
                out[i] = [logp[row, keep - n - 1: keep - 1].gather(-1, targets[:, None]).sum().item()]
    return out


def _group_report(predictions: list[dict], key: str, correct_key: str) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        if key in p:
            groups[str(p[key])].append(p[correct_key])
    return {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())}


def score_mcq(
    model,
    tokenizer,
    items: Sequence[MCQItem | dict],
    *,
    mode: str = "letter",
    fewshot: Sequence[MCQItem] | None = None,
    shots: int = 0,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list] | None = None,
    max_questions: int = 0,
    max_length: int | None = None,
    skipped: Sequence[str] = (),
) -> dict:
    """Multiple-choice accuracy of a causal LM by likelihood (see the module docstring for the prompts).

    Args:
        model: the causal LM (plain, PEFT or Accelerate-prepared); eval mode for the pass, then restored.
        tokenizer: its tokenizer (adds ``<bos>`` itself).
        items: questions; raw dicts are validated here and invalid ones skipped, never raised.
        mode: ``"letter"`` (one forward per question) or ``"choice"`` (five continuations).
        fewshot: pool of answered examples; None with ``shots > 0`` draws them from ``items``
            (never the question itself). See :func:`select_fewshot`.
        shots: few-shot examples per prompt.
        batch_size: sequences per forward pass (a question is 1 sequence in letter mode, 5 in choice).
        rank, world_size: this process's share is ``items[rank::world_size]``.
        gather: all-gathers a Python list across ranks into one list (e.g.
            ``accelerate.utils.gather_object``); required when ``world_size > 1``.
        max_questions: score only the first N valid questions (0: all).
        max_length: skip questions whose prompt is longer than this many tokens (default: the model's
            ``max_position_embeddings`` when known).
        skipped: messages of records already skipped by :func:`load_mcq`, counted in ``n_skipped``.

    Returns:
        ``accuracy`` (fraction; length-normalised in choice mode), ``accuracy_raw`` (choice mode),
        ``n``, ``n_correct``, ``n_skipped``, ``skipped`` (messages, at most 50), ``ci95`` (Wilson,
        ``[low, high]``), ``chance``, ``mode``, ``shots``, ``by_group`` (``{"exam_type": {value:
        {"accuracy", "n"}}, "subject": ...}`` for the keys present), ``predictions`` (one dict per
        question, in input order), and in letter mode ``letter_tokens``. ``accuracy`` is NaN when no
        question could be scored. Every rank gets the same result.

    Raises:
        ValueError: an unknown mode, or ``world_size > 1`` without ``gather``.
        DataError: the few-shot pool cannot give ``shots`` examples (checked before any forward).
        ModelError: letter mode with a tokenizer whose answer letters are not single tokens.
    """
    if mode not in ("letter", "choice"):
        raise ValueError(f"mode must be 'letter' or 'choice', found {mode!r}")
    if world_size > 1 and gather is None:
        raise ValueError("score_mcq needs gather= when world_size > 1")
    valid, skip_msgs = _valid_items(items, skipped)
    if max_questions > 0:
        valid = valid[:max_questions]
    pool = list(fewshot) if fewshot is not None else valid
    examples = [select_fewshot(item, pool, shots) for item in valid]  # raises before any forward
    letter_sep, letter_ids = _letter_variant(tokenizer, valid, examples) if mode == "letter" else (" ", None)
    # every question's token sequences on all ranks, so that skips and the split agree
    encoded = _encode_questions(tokenizer, valid, examples, mode, letter_sep,
                                _model_max_length(model) if max_length is None else max_length, skip_msgs)
    mine, n_real = _rank_share(encoded, rank, world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores = _run_requests(model, [s for _, seqs, _ in mine for s in seqs],
                                   [c for _, _, conts in mine for c in conts], letter_ids=letter_ids,
                                   batch_size=max(1, batch_size), pad_id=pad_id, desc=f"mcq {mode}")
    finally:
        model.train(was_training)
    local = _predictions(mine[:n_real], scores, valid, mode)
    predictions = sorted(gather(local) if world_size > 1 else local, key=lambda p: p["index"])
    report = _report(predictions, skip_msgs, mode, shots, letter_sep, letter_ids)
    if skip_msgs:
        log.warning("MCQ: skipped %d question(s); first: %s", len(skip_msgs), skip_msgs[0])
    return report


def _valid_items(items: Sequence[MCQItem | dict], skipped: Sequence[str]) -> tuple[list[MCQItem], list[str]]:
    """The items that parse, and the skip messages (``skipped`` first, then one per invalid record)."""
    skip_msgs = list(skipped)
    valid: list[MCQItem] = []
    for pos, item in enumerate(items):
        if isinstance(item, MCQItem):
            valid.append(item)
            continue
        try:
            valid.append(parse_mcq_record(item))
        except MCQRecordError as exc:
            skip_msgs.append(f"item {pos}: {exc}")
    return valid, skip_msgs


def _model_max_length(model) -> int | None:
    config = unwrap_base(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def _letter_variant(tokenizer, valid: list[MCQItem], examples: list) -> tuple[str, list[int]]:
    """The answer separator (``" "`` or ``""``) after which A..E are single tokens, and their ids."""
    for letter_sep in (" ", ""):
        sample = [build_letter_prompt(it, ex, answer_sep=letter_sep) for it, ex in zip(valid[:3], examples[:3])]
        letter_ids = letter_token_ids(tokenizer, sample, letter_sep) if sample else [0] * len(LETTERS)
        if letter_ids is not None:
            return letter_sep, letter_ids
    raise ModelError("the tokenizer does not encode the answer letters A..E after '정답:' as one token "
                     "each (neither ' A' nor 'A'); use mode 'choice'")


def _encode_questions(tokenizer, valid: list[MCQItem], examples: list, mode: str, letter_sep: str,
                      max_length: int | None, skip_msgs: list[str]) -> list[tuple[int, list[list[int]], list[int]]]:
    """``(index into valid, token sequences, continuation lengths)`` per question that fits ``max_length``;
    one that does not is added to ``skip_msgs``."""
    encoded = []
    for pos, (item, ex) in enumerate(zip(valid, examples)):
        if mode == "letter":
            seqs = [_encode(tokenizer, build_letter_prompt(item, ex, answer_sep=letter_sep), True)]
            n_cont = [0]
        else:
            ctx = _encode(tokenizer, build_choice_context(item, ex), True)
            conts = [_encode(tokenizer, " " + text, False) for text in item.options]
            seqs = [ctx + c for c in conts]
            n_cont = [len(c) for c in conts]
        longest = max(len(s) for s in seqs)
        if max_length and longest > max_length:
            skip_msgs.append(f"question {pos}: prompt of {longest} tokens exceeds the model's {max_length}")
            continue
        encoded.append((pos, seqs, n_cont))
    return encoded


def _rank_share(encoded: list, rank: int, world_size: int) -> tuple[list, int]:
    """This rank's questions, padded with copies of the first so that every rank runs the same number
    of forward passes, and how many of them are its own."""
    per_rank = math.ceil(len(encoded) / world_size) if encoded else 0
    mine = encoded[rank::world_size]
    n_real = len(mine)
    return (mine + [encoded[0]] * (per_rank - n_real) if per_rank > n_real else mine), n_real


def _predictions(mine: list, scores: list[list[float]], valid: list[MCQItem], mode: str) -> list[dict]:
    """One prediction dict per question of ``mine`` from its scores (in order, padding questions after)."""
    local: list[dict] = []
    cursor = 0
    for pos, seqs, _ in mine:
        item_scores = scores[cursor:cursor + len(seqs)]
        cursor += len(seqs)
        item = valid[pos]
        pred: dict[str, Any] = {"index": pos}
        pred.update({key: item.meta[key] for key in ("exam_type", "subject", "year", "q_number") if key in item.meta})
        pred["answer"] = item.answer_letter
        if mode == "letter":
            logps = item_scores[0]
            choice = max(range(len(LETTERS)), key=lambda j: logps[j])
            pred.update(prediction=LETTERS[choice], correct=choice == item.answer, logprobs=logps)
        else:
            raw = [s[0] for s in item_scores]
            norm = [r / max(1, len(text)) for r, text in zip(raw, item.options)]
            choice = max(range(len(LETTERS)), key=lambda j: norm[j])
            choice_raw = max(range(len(LETTERS)), key=lambda j: raw[j])
            pred.update(prediction=LETTERS[choice], correct=choice == item.answer,
                        prediction_raw=LETTERS[choice_raw], correct_raw=choice_raw == item.answer,
                        logprobs=raw, logprobs_per_char=norm)
        local.append(pred)
    return local


def _report(predictions: list[dict], skip_msgs: list[str], mode: str, shots: int, letter_sep: str,
            letter_ids: list[int] | None) -> dict:
    n = len(predictions)
    n_correct = sum(p["correct"] for p in predictions)
    report: dict[str, Any] = {
        "accuracy": n_correct / n if n else float("nan"),
        "n": n,
        "n_correct": n_correct,
        "n_skipped": len(skip_msgs),
        "skipped": skip_msgs[:50],
        "ci95": wilson_interval(n_correct, n),
        "chance": CHANCE,
        "mode": mode,
        "shots": shots,
    }
    if mode == "choice":
        n_raw = sum(p["correct_raw"] for p in predictions)
        report["accuracy_raw"] = n_raw / n if n else float("nan")
        report["ci95_raw"] = wilson_interval(n_raw, n)
        report["normalisation"] = "per character"
    else:
        report["letter_tokens"] = {"variant": letter_sep + "A", "ids": letter_ids}
    report["by_group"] = {key: _group_report(predictions, key, "correct")
                          for key in GROUP_KEYS if any(key in p for p in predictions)}
    report["predictions"] = predictions
    return report
