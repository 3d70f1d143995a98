"""New-token embedding rows distilled from the base model (Token Distillation, Dobler et al. 2025).

Mental model::

    corpus ──extended tokenizer──> windows holding new tokens ──base tokenizer──> the same text in base pieces
                                          │                                               │
                        model reads the new rows (student)             frozen model reads the pieces (teacher)
                                          └──── MSE of hidden states after L layers ──────┘
                                                at every position both segmentations share
                                                -> gradient into the new input rows only

The extension (:mod:`korcpt.vocab.extend`) only merges base tokens, so every boundary of the extended
segmentation is one of the base segmentation: each extended token ``j`` lines up with the base token that
ends where it ends, and the frozen model's hidden state there is what the new row should lead to. One
window trains every new token it holds, and the positions *after* a new token (where a mean-of-pieces
row costs most) are matched too. Nothing but the new input rows changes; the teacher is the same model
reading base ids only, so no second copy of the model is held.

Output rows (Gemma ties its head to its embedding, and a distilled input row is a poor output row):

* ``tied``: the distilled input row serves as output row too.
* ``mean``: the mean of the pieces' rows (the untrained default of :mod:`korcpt.model.embeddings`).
* ``piece_fit``: the base model's probability of the token's piece sequence, ``p(a) p(b|a) ...``, as a
  row: the first piece's row plus ``r * u``, where ``u`` satisfies ``h . u ~= 1`` on the final hidden
  states (a ridge fit: Gemma's head has no bias) and ``r`` is the mean log-probability of the other
  pieces after the first, measured by the frozen model at the token's occurrences.
* ``ntp``: next-token prediction of the new output rows alone, everything else frozen, on the final
  hidden states of the windows read with the distilled input rows (``output_positions`` of them: every
  one whose target is a new token and a weighted ``output_base_share`` of the rest, cached once with
  each position's log-normaliser over the base rows; each step is a small matrix product), started from
  ``mean`` and pulled toward it (``output_pull``).

The result is a directory written beside ``out_dir`` and renamed into place: ``rows.safetensors``
(``input`` and ``output``, ``[new tokens, hidden]`` float32, and the first id) and ``report.json``
(settings; the cost, also logged before anything runs; each stage's seconds; the distance on held-out
windows before and after; each token's contexts and distance; the tokens with too few contexts and what
they got).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from korcpt.errors import DataError, ModelError
from korcpt.log import get_logger, progress
from korcpt.model.embeddings import pieces_of, write_rows
from korcpt.model.lora import NewTokenRows, module_name, replace_module
from korcpt.model.zero3 import full_shape
from korcpt.vocab.extend import read_texts

log = get_logger(__name__)

OUTPUT_MODES = ("tied", "mean", "piece_fit", "ntp")


@dataclass
class DistillOptions:
    """Options of the distillation stage; ``tools/distill_rows.py`` takes its flag defaults from here."""

    model: str
    """Base model: a preset, local directory, .gguf file or hub id (as model.name of a run config)."""
    tokenizer: Path
    """The extended tokenizer directory (tools/extend_tokenizer.py)."""
    corpus: Path
    """The corpus the tokenizer was learned on: raw_text_mixed.jsonl ({"text"} lines); copies are read once."""
    out_dir: Path
    """Output directory (rows.safetensors, report.json); built beside it and renamed into place."""
    # Budget defaults measured on the demo (bench/bench_quality.py, bench/README.md).
    contexts_per_token: int = 4
    """Windows kept per new token: a window is read while one of its new tokens has fewer than this.
    Measured on the demo (bench/bench_distill.py): 1, 2, 4, 8 gave untrained held-out bpc +5.0%, +2.9%,
    +1.5%, +0.5% of the base for 65, 90, 110, 126 s on 2 CPU cores; 4 is about a minute on one H100 for
    MedGemma 4B with 20,000 new tokens. The CPU demo passes 2 to stay under half its training time."""
    context_tokens: int = 32
    """Extended tokens per window (after <bos>)."""
    depth: float = 0.33
    """Share of the decoder layers whose output (through the final norm) is matched: 1.0 is the head's
    input; a third measured as good on the demo at a third of the cost."""
    epochs: int = 1
    """Passes over the kept windows."""
    lr: float = 1e-3
    """Adam learning rate of the input rows."""
    batch_size: int = 8
    """Windows per optimizer step."""
    output: str = "ntp"
    """How the output rows are made: tied, mean, piece_fit or ntp (see the module doc); ntp measured best."""
    output_steps: int = 100
    """Optimizer steps of the ntp output rows over the cached hidden states."""
    output_base_share: float = 0.25
    """Share of the fit positions whose target is a base token that the ntp fit keeps, each weighted by its
    inverse (every position whose target is a new token is kept): the base head's log-normaliser at each
    kept position is the stage's largest cost."""
    output_pull: float = 1e-2
    """Pull of the ntp output rows toward the mean of their pieces (squared distance summed over rows)."""
    output_positions: int = 32768
    """Positions whose final hidden states fit the output rows (windows sampled up to this many)."""
    eval_windows: int = 32
    """Windows held out of training to measure the distance before and after (at most this many)."""
    min_contexts: int = 1
    """A token seen in fewer windows than this keeps the mean of its pieces' rows (input and output)."""
    seed: int = 0
    """Seed of the window order."""
    dtype: str = "auto"
    """Parameter dtype of the model (auto: bfloat16 on CUDA, float32 on CPU); the rows are float32."""
    device: str = "cpu"
    """cpu, cuda, cuda:0."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers."""
    peak_tflops: float = 0.0
    """Dense TFLOP/s of the device for the printed time estimate (0: no estimate)."""


@dataclass
class Window:
    """One stretch of a document in both segmentations: ``student`` (extended ids) and ``teacher`` (base
    ids), each after ``<bos>``; ``pairs[k] = (student position, teacher position)`` of the k-th aligned
    position from the first new token on."""

    student: list[int]
    teacher: list[int]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    new: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- windows


def unique_texts(corpus: Path) -> list[str]:
    """The corpus's documents, each once (the 5 copies of a medical record are one context, not five)."""
    seen, out = set(), []
    for text in read_texts(corpus):
        if text not in seen:
            seen.add(text)
            out.append(text)
    if not out:
        raise DataError(f"corpus {corpus} holds no documents")
    return out


def _ends(encoding) -> list[int]:
    return [end for _, end in encoding.offsets]


def document_windows(text: str, base_tok, new_tok, first_new: int, context_tokens: int) -> Iterator[Window]:
    """Windows of ``context_tokens`` extended tokens of ``text`` that hold a new token, with their base ids.

    Worked example: base ``▁간 염 은`` (ends 2, 3, 4), extended ``▁간염 은`` (ends 3, 4). The extended
    token ``▁간염`` ends at char 3, where base token ``염`` ends: student position 1 (after <bos>) pairs
    with teacher position 2, and ``은`` (student 2) with teacher 3.
    """
    x = new_tok.backend_tokenizer.encode(text, add_special_tokens=False)
    b = base_tok.backend_tokenizer.encode(text, add_special_tokens=False)
    base_at_end = {}
    for i, end in enumerate(_ends(b)):
        base_at_end[end] = i  # the last base token ending at a char (byte-fallback pieces share offsets)
    x_ends = _ends(x)
    bos = base_tok.bos_token_id
    head = [bos] if bos is not None else []
    b_start = 0
    for start in range(0, len(x.ids), context_tokens):
        ids = x.ids[start:start + context_tokens]
        last_b = base_at_end.get(x_ends[start + len(ids) - 1])
        if last_b is None or last_b < b_start:
            break  # segmentations no longer line up (not an extension of this base): stop the document
        window = Window(student=head + ids, teacher=head + b.ids[b_start:last_b + 1])
        new_seen = False
        for k, token in enumerate(ids):
            new_seen = new_seen or token >= first_new
            if token >= first_new:
                window.new.append(token)
            j = base_at_end.get(x_ends[start + k])
            if new_seen and j is not None and j >= b_start:
                window.pairs.append((len(head) + k, len(head) + j - b_start))
        b_start = last_b + 1
        if window.new:
            yield window


def select_windows(texts: list[str], base_tok, new_tok, first_new: int, opts: DistillOptions) -> list[Window]:
    """Windows in a seeded order, each kept while one of its new tokens has fewer than
    ``contexts_per_token`` kept windows."""
    order = list(range(len(texts)))
    random.Random(opts.seed).shuffle(order)
    counts: dict[int, int] = {}
    kept = []
    for i in order:
        for window in document_windows(texts[i], base_tok, new_tok, first_new, opts.context_tokens):
            distinct = set(window.new)
            if all(counts.get(t, 0) >= opts.contexts_per_token for t in distinct):
                continue
            kept.append(window)
            for t in distinct:
                counts[t] = counts.get(t, 0) + 1
    return kept


# --------------------------------------------------------------------------------------------- model


def decoder_of(model):
    """The text decoder (embedding + layers + final norm) of a causal LM or of Gemma 3's multimodal class."""
    decoder = model.get_decoder()
    if not hasattr(decoder, "layers"):
        raise ModelError(f"{type(model).__name__}: cannot find the decoder layers to distil through")
    return decoder


@contextlib.contextmanager
def first_layers(decoder, layers: int) -> Iterator[None]:
    """Run only the first ``layers`` decoder layers inside the block; the final norm still applies."""
    full = decoder.layers
    if layers < len(full):
        decoder.layers = torch.nn.ModuleList(list(full)[:layers])
    try:
        yield
    finally:
        decoder.layers = full


def _batch(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _hidden(decoder, seqs: list[list[int]], pad: int, device) -> torch.Tensor:
    ids, mask = _batch(seqs, pad, device)
    return decoder(input_ids=ids, attention_mask=mask).last_hidden_state


def _gather(hidden: torch.Tensor, windows: list[Window], side: int) -> torch.Tensor:
    rows = [torch.full((len(w.pairs),), i, dtype=torch.long) for i, w in enumerate(windows)]
    cols = [torch.tensor([p[side] for p in w.pairs], dtype=torch.long) for w in windows]
    return hidden[torch.cat(rows).to(hidden.device), torch.cat(cols).to(hidden.device)]


def window_loss(decoder, windows: list[Window], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per aligned position, the squared distance of the student's hidden state from the teacher's,
    relative to the teacher's squared norm; and the mean of those (the loss)."""
    with torch.no_grad():
        target = _gather(_hidden(decoder, [w.teacher for w in windows], pad, device), windows, 1).float()
    student = _gather(_hidden(decoder, [w.student for w in windows], pad, device), windows, 0).float()
    per_position = (student - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)
    return per_position.mean(), per_position.detach()


def add_token_losses(sums: dict[int, list[float]], windows: list[Window], per_position: torch.Tensor,
                     first: int) -> None:
    """Add each new token's relative distance at its own positions to ``sums`` (token -> [sum, count])."""
    k = 0
    for w in windows:
        for s, _ in w.pairs:
            if w.student[s] >= first:
                entry = sums.setdefault(w.student[s], [0.0, 0])
                entry[0] += float(per_position[k])
                entry[1] += 1
            k += 1


def mean_loss(decoder, windows: list[Window], pad: int, device, batch_size: int) -> float:
    """Mean relative distance over every aligned position of ``windows`` (no gradient)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            _, per_position = window_loss(decoder, windows[start:start + batch_size], pad, device)
            total += float(per_position.sum())
            n += per_position.numel()
    return total / max(n, 1)


# --------------------------------------------------------------------------------------------- cost


def matched_layers(decoder, depth: float) -> int:
    """How many of ``decoder``'s layers the distillation runs: ``depth`` of them, at least one."""
    return max(1, round(depth * len(decoder.layers)))


def flops_per_token(model, layers: int) -> float:
    """Forward FLOPs per token of the first ``layers`` decoder layers (2 per weight; attention over a short
    window is small beside them and left out)."""
    blocks = list(decoder_of(model).layers)[:layers]
    return 2.0 * sum(p.numel() for block in blocks for p in block.parameters())


def cost(model, windows: list[Window], held_out: list[Window], fit: list[Window], first: int, count: int,
         opts: DistillOptions) -> dict:
    """Tokens read and FLOPs, before anything runs. Input rows: per epoch a teacher forward and a student
    forward and backward (~3 forwards) of the matched layers over the training windows, and the held-out
    windows read before and after. Output rows (ntp, piece_fit): the fit windows through every layer, then
    at each kept position (ntp: ``output_base_share``) the head's log-normaliser and ``output_steps``
    products with the new rows."""
    teacher = sum(len(w.teacher) for w in windows)
    student = sum(len(w.student) for w in windows)
    held = sum(len(w.teacher) + len(w.student) for w in held_out)
    per_token = flops_per_token(model, matched_layers(decoder_of(model), opts.depth))
    flops = per_token * (opts.epochs * (teacher + 2 * student) + 2 * held)
    positions = sum(len(w.student) - 1 for w in fit) if opts.output in ("ntp", "piece_fit") else 0
    head = model.get_output_embeddings().weight
    vocab, hidden = (int(n) for n in full_shape(head))
    out_flops = positions * flops_per_token(model, len(decoder_of(model).layers))
    if opts.output == "ntp":
        new_targets = sum(t >= first for w in fit for t in w.student[1:])
        kept = new_targets + opts.output_base_share * (positions - new_targets)
        out_flops += kept * (2 * vocab * hidden + opts.output_steps * count * hidden * 6)
    elif positions:
        out_flops += positions * 2 * vocab * hidden
    out = {"windows": len(windows), "held_out_windows": len(held_out), "teacher_tokens": teacher,
           "student_tokens": student, "held_out_tokens": held, "output_positions": positions,
           "tokens_read": opts.epochs * (teacher + student) + 2 * held + positions,
           "flops_per_token": per_token, "flops_input_rows": flops, "flops_output_rows": out_flops,
           "flops": flops + out_flops}
    if opts.peak_tflops:
        out["minutes_at_40pct_mfu"] = out["flops"] / (0.4 * opts.peak_tflops * 1e12) / 60
    return out


# --------------------------------------------------------------------------------------------- output rows


def bias_direction(hidden: torch.Tensor) -> torch.Tensor:
    """u with ``h . u ~= 1`` over the rows of ``hidden`` (ridge): adding ``c * u`` to an output row adds
    about ``c`` to its logit everywhere, the bias Gemma's head lacks."""
    h = hidden.double()
    ridge = h.T @ h + 1e-2 * len(h) * torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
    return torch.linalg.solve(ridge, h.T @ torch.ones(len(h), dtype=h.dtype, device=h.device)).float()


def output_windows(windows: list[Window], positions: int, seed: int) -> list[Window]:
    """A seeded sample of ``windows`` holding about ``positions`` student positions (all when fewer)."""
    order = list(range(len(windows)))
    random.Random(seed + 1).shuffle(order)
    out, n = [], 0
    for i in order:
        if n >= positions:
            break
        out.append(windows[i])
        n += len(windows[i].student) - 1
    return out


def _final_states(model, windows: list[Window], pad: int, device, batch_size: int, student: bool):
    """(final hidden states, next-token targets) at every position of the windows' student (or teacher) ids,
    float32 on ``device`` (the fits that follow run where the model runs)."""
    decoder = decoder_of(model)
    hs, targets = [], []
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            seqs = [w.student if student else w.teacher for w in chunk]
            hidden = _hidden(decoder, seqs, pad, device).float()
            for i, s in enumerate(seqs):
                hs.append(hidden[i, :len(s) - 1])
                targets.append(torch.tensor(s[1:], device=hidden.device))
    return torch.cat(hs), torch.cat(targets)


def _base_log_normaliser(h: torch.Tensor, weight: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """logsumexp of the base head's logits at each row of ``h`` (in chunks: [chunk, vocab] at a time, in
    the head's dtype as the model computes them; in place, 22% faster than torch.logsumexp on 2 CPU cores)."""
    out = []
    for i in range(0, len(h), chunk):
        logits = (h[i:i + chunk].to(weight.dtype) @ weight.T).float()
        top = logits.amax(-1, keepdim=True)
        out.append(top[:, 0] + logits.sub_(top).exp_().sum(-1).log())
    return torch.cat(out)


def piece_fit_rows(model, windows: list[Window], pieces: dict[int, list[int]], head_weight: torch.Tensor,
                   pad: int, device, batch_size: int) -> tuple[torch.Tensor, dict[int, float]]:
    """Output rows ``row(first piece) + r * u`` (module doc); returns them and each token's ``r``."""
    h, targets = _final_states(model, windows, pad, device, batch_size, student=False)
    u = bias_direction(h)
    logz = _base_log_normaliser(h, head_weight)
    w = head_weight
    logp = (h * w[targets].float()).sum(-1) - logz  # log p(base target | context), every teacher position
    # r_t: mean over t's occurrences of log p(piece 2..k | context, piece 1), read off the teacher's windows
    by_first: dict[tuple[int, ...], list[float]] = {}
    seq = torch.cat([torch.tensor(w.teacher[1:]) for w in windows]).tolist()
    wanted = {tuple(p) for p in pieces.values() if len(p) > 1}
    longest = max((len(p) for p in wanted), default=0)
    for pos in range(len(seq)):
        for k in range(2, longest + 1):
            key = tuple(seq[pos:pos + k])
            if len(key) == k and key in wanted:
                by_first.setdefault(key, []).append(float(logp[pos + 1:pos + k].sum()))
    rows, r = [], {}
    first = min(pieces)
    for token in sorted(pieces):
        ids = pieces[token]
        seen = by_first.get(tuple(ids), [])
        r[token] = sum(seen) / len(seen) if seen else 0.0
        rows.append(w[ids[0]].float() + r[token] * u if ids else w[:first].float().mean(0))
    return torch.stack(rows).cpu(), r


def keep_positions(h: torch.Tensor, targets: torch.Tensor, first: int, base_share: float, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every position whose target is a new token, and a seeded ``base_share`` of the others, each of those
    weighted ``1 / base_share`` so that the weighted loss estimates the loss over all of them."""
    is_new = targets >= first
    if base_share >= 1.0:
        return h, targets, torch.ones(len(h), device=h.device)
    draw = torch.rand(len(h), generator=torch.Generator().manual_seed(seed + 2)).to(h.device)
    keep = is_new | (draw < base_share)
    weight = torch.where(is_new[keep], 1.0, 1.0 / base_share)
    return h[keep], targets[keep], weight


def ntp_rows(model, windows: list[Window], init: torch.Tensor, first: int, pad: int, device,
             opts: DistillOptions) -> tuple[torch.Tensor, list[float]]:
    """Output rows for the new tokens trained by next-token prediction alone (module doc); returns them and
    the loss (nats per position) before and after."""
    h, targets = _final_states(model, windows, pad, device, opts.batch_size, student=True)
    h, targets, weight = keep_positions(h, targets, first, opts.output_base_share, opts.seed)
    head = model.get_output_embeddings().weight[:first].detach()
    logz_base = _base_log_normaliser(h, head)
    is_new = targets >= first
    base_logit = torch.zeros(len(h), device=h.device)
    base_logit[~is_new] = (h[~is_new] * head[targets[~is_new]].float()).sum(-1)
    init = init.detach().float().to(h.device)
    rows = init.clone().requires_grad_(True)
    optim = torch.optim.Adam([rows], lr=opts.lr)
    new_index = (targets - first).clamp(0, len(init) - 1)

    def nll() -> torch.Tensor:
        logits = h @ rows.T
        logz = torch.logaddexp(logz_base, torch.logsumexp(logits, -1))
        target = torch.where(is_new, logits.gather(1, new_index[:, None])[:, 0], base_logit)
        return ((logz - target) * weight).sum() / weight.sum()

    with torch.no_grad():
        before = float(nll())
    for _ in progress(range(opts.output_steps), desc="output rows", unit="step"):
        optim.zero_grad()
        # the pull keeps rows of tokens seen a few times near their start: without it they overfit the
        # windows (held-out bpc worse than the mean rows', bench/README.md)
        loss = nll() + opts.output_pull * (rows - init).pow(2).sum()
        loss.backward()
        optim.step()
    with torch.no_grad():
        return rows.detach().cpu(), [before, float(nll())]


# --------------------------------------------------------------------------------------------- the stage


def _load(opts: DistillOptions):
    from korcpt.config import ModelConfig
    from korcpt.model.load import load_model_and_tokenizer

    from korcpt import assets

    device = torch.device(opts.device)
    mcfg = ModelConfig(name=opts.model, tokenizer=str(opts.tokenizer), dtype=opts.dtype,
                       attn_implementation=opts.attn_implementation)
    model, new_tok, new_ids = load_model_and_tokenizer(mcfg, device)
    if not new_ids:
        raise ModelError(f"tokenizer {opts.tokenizer} adds no token to {opts.model}: nothing to distil")
    base_tok = assets.load_tokenizer(opts.model)
    return model.to(device).eval(), base_tok, new_tok, new_ids


def _check(opts: DistillOptions) -> None:
    if opts.output not in OUTPUT_MODES:
        raise ModelError(f"output is {opts.output!r}, expected one of {', '.join(OUTPUT_MODES)}")
    for name in ("contexts_per_token", "context_tokens", "batch_size", "epochs"):
        if getattr(opts, name) < 1:
            raise ModelError(f"{name} is {getattr(opts, name)}, expected at least 1")
    if not 0 < opts.depth <= 1:
        raise ModelError(f"depth is {opts.depth}, expected a share of the decoder layers in (0, 1]")
    if opts.output_positions < 1 or opts.output_steps < 0 or opts.min_contexts < 0 or opts.lr <= 0:
        raise ModelError("output_positions must be >= 1, output_steps and min_contexts >= 0, lr > 0")
    if not 0 < opts.output_base_share <= 1:
        raise ModelError(f"output_base_share is {opts.output_base_share}, expected a share in (0, 1]")


def distill_rows(opts: DistillOptions) -> dict:
    """Distil the new tokens' input rows and make their output rows; write ``out_dir`` (module doc).

    Returns:
        The report (also ``out_dir/report.json``).

    Raises:
        DataError: an unreadable or empty corpus, or no window holding a new token.
        ModelError: bad options, or a tokenizer that adds nothing to the model.
    """
    _check(opts)
    start = time.perf_counter()
    torch.manual_seed(opts.seed)
    model, base_tok, new_tok, new_ids = _load(opts)
    first, count = new_ids[0], len(new_ids)
    device = torch.device(opts.device)
    pad = new_tok.pad_token_id if new_tok.pad_token_id is not None else 0
    texts = unique_texts(Path(opts.corpus))
    windows = select_windows(texts, base_tok, new_tok, first, opts)
    if not windows:
        raise DataError(f"no window of {opts.corpus} holds a new token of {opts.tokenizer}")
    # every 10th window (at most eval_windows) measures the distance before and after, never trained on
    held_out = windows[::10][:opts.eval_windows] if len(windows) >= 10 else []
    train_windows = [w for w in windows if not any(w is h for h in held_out)]
    counts = Counter(t for w in train_windows for t in set(w.new))  # contexts a row is trained on
    fit_windows = output_windows(windows, opts.output_positions, opts.seed)
    spend = cost(model, train_windows, held_out, fit_windows, first, count, opts)
    log.info("distilling %d new rows from %d windows: %s tokens read, %.3g FLOPs%s", count, len(train_windows),
             f"{spend['tokens_read']:,}", spend["flops"],
             f", ~{spend['minutes_at_40pct_mfu']:.1f} min at 40% of {opts.peak_tflops} TFLOP/s"
             if "minutes_at_40pct_mfu" in spend else "")

    for p in model.parameters():
        p.requires_grad_(False)
    decoder = decoder_of(model)
    emb = decoder.embed_tokens
    mean_rows = emb.weight.detach()[first:first + count].float().clone()
    rows = NewTokenRows(emb, first, count)
    replace_module(decoder, module_name(decoder, emb), rows)
    stages = {"prepare": time.perf_counter() - start}
    try:
        input_rows, losses = _train_input_rows(decoder, rows, train_windows, held_out, pad, device, opts)
    finally:
        replace_module(decoder, module_name(decoder, rows), emb)
    few = sorted(t for t in new_ids if counts.get(t, 0) < opts.min_contexts)
    input_rows[[t - first for t in few]] = mean_rows[[t - first for t in few]]
    stages["input_rows"] = time.perf_counter() - start - stages["prepare"]
    with torch.no_grad():  # the model now reads the distilled rows (the output side needs its hidden states)
        emb.weight[first:first + count] = input_rows.to(emb.weight.dtype)
    out_rows, extra = output_rows(model, fit_windows, base_tok, new_tok, mean_rows, input_rows, first, pad,
                                    device, opts)
    out_rows[[t - first for t in few]] = mean_rows[[t - first for t in few]]
    stages["output_rows"] = time.perf_counter() - start - stages["prepare"] - stages["input_rows"]
    per_token = losses.pop("per_token")
    report = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "method": "token distillation over whole windows (korcpt.model.distill)",
        "first_id": first, "new_tokens": count, "hidden_size": int(input_rows.shape[1]),
        "cost": spend, "seconds": round(time.perf_counter() - start, 2),
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()}, **losses, **extra,
        "too_few_contexts": {"count": len(few), "min_contexts": opts.min_contexts,
                             "got": "the mean of the pieces' rows (input and output)",
                             "tokens": [new_tok.convert_ids_to_tokens(t) for t in few]},
        "tokens": [{"id": t, "token": new_tok.convert_ids_to_tokens(t), "contexts": counts.get(t, 0),
                    "loss_last_epoch": per_token.get(t)} for t in new_ids],
    }
    write_rows(Path(opts.out_dir), input_rows, out_rows, first, report)
    return report


def _train_input_rows(decoder, rows: NewTokenRows, windows: list[Window], held_out: list[Window], pad: int, device,
                      opts: DistillOptions) -> tuple[torch.Tensor, dict]:
    """Adam on the new input rows; returns them and the losses: held-out distance before (mean init) and
    after, each epoch's mean training distance, and each token's distance at its own positions in the last
    epoch (before each step)."""
    bs = opts.batch_size
    full_layers = decoder.layers
    layers = matched_layers(decoder, opts.depth)
    with first_layers(decoder, layers):
        before = mean_loss(decoder, held_out, pad, device, bs) if held_out else None
        optim = torch.optim.Adam([rows.rows], lr=opts.lr)
        rng = random.Random(opts.seed)
        epochs, per_token = [], {}
        bar = progress(total=opts.epochs * math.ceil(len(windows) / bs), desc="distil rows", unit="step")
        for epoch in range(opts.epochs):
            order = list(range(len(windows)))
            rng.shuffle(order)
            total, n = 0.0, 0
            for s in range(0, len(order), bs):
                chunk = [windows[i] for i in order[s:s + bs]]
                loss, per_position = window_loss(decoder, chunk, pad, device)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                if epoch == opts.epochs - 1:
                    add_token_losses(per_token, chunk, per_position, rows.first)
                total, n = total + float(per_position.sum()), n + per_position.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.4f}")
            epochs.append(total / max(n, 1))
        bar.close()
        after = mean_loss(decoder, held_out, pad, device, bs) if held_out else None
    log.info("hidden-state distance (relative, after %d of %d layers): %d held-out windows %s; training epochs %s",
             layers, len(full_layers), len(held_out),
             f"mean init {before:.4f} -> distilled {after:.4f}" if held_out else "(too few windows)",
             ", ".join(f"{e:.4f}" for e in epochs))
    return rows.rows.detach().float().clone(), {
        "loss_mean_init": before, "loss_final": after, "loss_per_epoch": epochs,
        "per_token": {t: v[0] / v[1] for t, v in per_token.items()}}


def output_rows(model, windows, base_tok, new_tok, mean_rows, input_rows, first, pad, device, opts
                ) -> tuple[torch.Tensor, dict]:
    """The new tokens' output rows as ``opts.output`` says (module doc), and what the fit reports."""
    if opts.output == "tied":
        return input_rows.clone(), {}
    if opts.output == "mean":
        return mean_rows.clone(), {}
    if opts.output == "piece_fit":
        head = model.get_output_embeddings().weight.detach()
        pieces = pieces_of(base_tok, new_tok, range(first, first + len(mean_rows)))
        fitted, r = piece_fit_rows(model, windows, pieces, head, pad, device, opts.batch_size)
        return fitted, {"piece_fit_r_mean": sum(r.values()) / len(r)}
    trained, ntp = ntp_rows(model, windows, mean_rows, first, pad, device, opts)
    log.info("output rows by next-token prediction: %.4f -> %.4f nats per position", *ntp)
    return trained, {"ntp_loss": ntp}
