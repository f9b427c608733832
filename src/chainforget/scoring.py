"""Multiple-choice scoring.

``letter`` mode (default): the prompt lists lettered options and ends with ``Answer:``; the prediction is the
argmax of the next-token log-probability over the option letters (`` A``, `` B``, ...), one forward pass per
question. ``text`` mode: each option's text is scored as a continuation of the question (``...\nAnswer:``
+ `` <option>``): summed log-probability (lm-eval's ``acc``) or divided by the option's length in bytes
(its ``acc_norm``). Letter-mode prompts are sorted by length and left-padded in batches (:func:`left_pad`,
shared with training); explicit position ids make a padded row score like the same row alone. Text mode packs
each question with all its options into rows without padding (:func:`score_text`). Either way only the
positions that are scored reach the LM head.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from chainforget.errors import ConfigError
from chainforget.progress import bar_options
from chainforget.tasks import LETTERS, Example, TaskData, question_text


@dataclass
class Scores:
    """Per-example predictions, in the order the examples were given."""

    pred: np.ndarray  # int, index of the chosen option
    option_logprobs: list[list[float]]  # next-token log-probability of each option letter


def letter_token_ids(tokenizer, count: int) -> list[int]:
    """Token ids of `` A``, `` B``, ...; each must be a single token for letter-mode scoring."""
    ids = []
    for letter in LETTERS[:count]:
        encoded = tokenizer.encode(f" {letter}", add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"tokenizer splits ' {letter}' into {len(encoded)} tokens; letter mode needs one token")
        ids.append(encoded[0])
    return ids


def encode_prompt(tokenizer, prompt: str, max_seq_len: int) -> list[int]:
    """Token ids of ``prompt``, keeping the last ``max_seq_len`` (the options and ``Answer:`` matter most)."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    return ids[-max_seq_len:]


def check_prompt_fits(tokenizer, data: dict[str, TaskData], max_seq_len: int, field: str) -> None:
    """Refuse a ``max_seq_len`` that would cut into the lettered choices of any prompt of ``data`` (train and eval).

    :func:`encode_prompt` keeps a prompt's last ``max_seq_len`` tokens, so the tokens from choice ``A`` to the
    closing ``Answer:`` must fit: cutting the question only shortens the context, cutting a choice leaves the
    model letters to pick from that it was never shown. ``field`` names the setting in the error.
    """
    cut: dict[str, tuple[int, int]] = {}
    need = 0
    for name, task in data.items():
        examples = task.train + task.eval
        encoded = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
        long = [(e, ids) for e, ids in zip(examples, encoded) if len(ids) > max_seq_len]  # only these can lose a choice
        tails = [tail for tail in choice_tokens(tokenizer, long) if tail > max_seq_len]
        if tails:
            cut[name] = (len(tails), len(examples))
            need = max(need, *tails)  # a prompt that is not cut needs at most max_seq_len: the cut ones set the bar
    if cut:
        counts = " and ".join(f"{short} of {total} {name} prompts" for name, (short, total) in cut.items())
        raise ConfigError(
            f"{field}: {max_seq_len} cuts the answer choices of {counts} (the longest choices and answer cue take "
            f"{need} tokens); use at least {need}"
        )


def choice_tokens(tokenizer, encoded: list[tuple[Example, list[int]]]) -> list[int]:
    """Per example (with its whole prompt's token ids), how many of the prompt's last tokens hold the choices from
    ``A.`` on and the answer cue.

    The prompt up to just before ``A.`` is encoded too; the tokens after the longest common prefix with the whole
    prompt are the choices' (a token merging the question's last characters with ``A`` counts as theirs)."""
    if not encoded:
        return []
    # every prompt is the question, "\nA. ...", ..., "\nAnswer:" (tasks.multiple_choice_prompt)
    heads = tokenizer([question_text(e) + "\n" for e, _ in encoded], add_special_tokens=True)["input_ids"]
    tails = []
    for (_, ids), head in zip(encoded, heads):
        common = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
        tails.append(len(ids) - common)
    return tails


def left_pad(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` with ``position_ids`` counting real tokens only, so the
    last position of every row is its last real token and padding does not shift positions."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def autocast_for(device: torch.device, precision: str):
    if "bf16" in precision:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if "16" in precision and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def score_letters(
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 32,
    max_seq_len: int = 384,
    precision: str = "32-true",
    desc: str = "eval",
    progress: bool = True,
) -> Scores:
    """Score ``examples`` with ``model``; returns predictions and option log-probabilities."""
    device = next(model.parameters()).device
    letters = letter_token_ids(tokenizer, max(len(e.choices) for e in examples))
    encoded = [encode_prompt(tokenizer, e.prompt, max_seq_len) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id
    preds = np.zeros(len(examples), dtype=np.int64)
    logprobs: list[list[float]] = [[] for _ in examples]
    was_training = model.training
    model.eval()
    with tqdm(total=len(examples), desc=desc, unit="q", disable=not progress, **bar_options()) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = {k: v.to(device) for k, v in left_pad([encoded[i] for i in batch], pad).items()}
            with autocast_for(device, precision):
                logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
            option_lp = logits.float().log_softmax(-1)[:, letters].cpu()
            for row, i in enumerate(batch):
                values = option_lp[row, : len(examples[i].choices)]
                preds[i] = int(values.argmax())
                logprobs[i] = values.tolist()
            bar.update(len(batch))
    model.train(was_training)
    return Scores(preds, logprobs)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them: trailing spaces
    of the context move to the continuation, the whole string is encoded once and cut at the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    head = tokenizer.encode(context, add_special_tokens=False)
    return head, whole[len(head) :]


def encode_option(tokenizer, example: Example, option: int, max_seq_len: int) -> tuple[list[int], int]:
    """Question + `` <option text>`` as text-mode scoring reads it (``...\nAnswer:`` then the option), keeping the
    last ``max_seq_len`` tokens, and how many of them are the option's."""
    head, tail = encode_pair(tokenizer, question_text(example) + "\nAnswer:", f" {example.choices[option]}")
    ids = (head + tail)[-max_seq_len:]
    return ids, min(len(tail), len(ids) - 1)  # the first kept token has no position before it to predict it


def option_bytes(example: Example) -> list[int]:
    """Each option's length in bytes as a continuation (`` <option>``): ``text_norm``'s divisor, lm-eval's too."""
    return [len(f" {choice}".encode()) for choice in example.choices]


@torch.no_grad()
def score_text(
    model,
    tokenizer,
    examples: list[Example],
    *,
    normalize: str = "sum",
    batch_size: int = 32,
    max_seq_len: int = 384,
    precision: str = "32-true",
    progress: bool = False,
    reuse_context: bool = True,
    row_tokens: int = 512,
) -> Scores:
    """Score every option's text as a continuation; ``normalize="length"`` divides by its length in bytes.

    ``reuse_context`` encodes each question once with all its options after it, questions packed into rows
    of ``row_tokens`` (the fast path); ``False`` runs question + option as one sequence per option, left-padded
    batches of ``batch_size`` (the straightforward path).
    """
    if reuse_context:
        totals = _text_packed(model, tokenizer, examples, row_tokens, max_seq_len, precision, progress)
        return _text_scores(totals, examples, normalize)
    device = next(model.parameters()).device
    pairs = []  # (example index, option index, context ids + continuation ids, continuation length)
    for i, example in enumerate(examples):
        for j in range(len(example.choices)):
            pairs.append((i, j, *encode_option(tokenizer, example, j, max_seq_len)))
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][2]))
    totals = [[0.0] * len(e.choices) for e in examples]
    was_training = model.training
    model.eval()
    with tqdm(total=len(pairs), desc="eval (text)", unit="option", disable=not progress, **bar_options()) as bar:
        for start in range(0, len(order), batch_size):
            batch = [pairs[k] for k in order[start : start + batch_size]]
            inputs = {k: v.to(device) for k, v in left_pad([p[2] for p in batch], tokenizer.pad_token_id).items()}
            keep = max(p[3] for p in batch) + 1
            with autocast_for(device, precision):
                logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            logprobs = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
            targets = inputs["input_ids"][:, -(keep - 1) :]
            picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
            for row, (i, j, _, length) in enumerate(batch):
                totals[i][j] = float(picked[row, -length:].sum())
            bar.update(len(batch))
    model.train(was_training)
    return _text_scores(totals, examples, normalize)


def _text_scores(totals: list[list[float]], examples: list[Example], normalize: str) -> Scores:
    if normalize == "length":
        totals = [[v / n for v, n in zip(row, option_bytes(e))] for row, e in zip(totals, examples)]
    return Scores(np.array([int(np.argmax(row)) for row in totals], dtype=np.int64), totals)


def _encode_questions(tokenizer, examples, max_seq_len) -> list[tuple[list[int], list[list[int]]]]:
    """Per question its context ids (cut from the left so the longest option still fits ``max_seq_len``) and
    every option's continuation ids, split as lm-evaluation-harness splits them."""
    encoded = []
    for example in examples:
        context = question_text(example) + "\nAnswer:"
        split = [encode_pair(tokenizer, context, f" {choice}") for choice in example.choices]
        head = split[0][0]
        if any(h != head for h, _ in split):  # an option merged with the context's last token: no shared prefix
            raise ValueError(f"example {example.id}: options change the context's tokens; use reuse_context=False")
        longest = max(len(t) for _, t in split)
        encoded.append((head[-(max_seq_len - longest) :], [t for _, t in split]))
    return encoded


def _pack_row(questions: list[tuple[list[int], list[list[int]]]]):
    """Questions laid end to end in one row, each as its context followed by all its options.

    Returns ids and position ids ``(1, L)``, a boolean mask ``(1, 1, L, L)`` under which a token sees the
    earlier tokens of its own question's context and of its own option only (positions restart after the
    context for every option), and the ``(predicting position, target token, option number)`` triples that
    sum to each option's log-probability: an option's first token is predicted by the context's last
    position, every later one by the option's previous token.
    """
    ids, positions, segment, part, triples = [], [], [], [], []
    option_number = 0
    for number, (context, options) in enumerate(questions):
        context_end = len(ids) + len(context) - 1
        ids += context
        positions += range(len(context))
        segment += [number] * len(context)
        part += [0] * len(context)
        for j, option in enumerate(options):
            start = len(ids)
            ids += option
            positions += range(len(context), len(context) + len(option))
            segment += [number] * len(option)
            part += [j + 1] * len(option)
            predictors = [context_end] + list(range(start, start + len(option) - 1))
            triples += [(p, token, option_number) for p, token in zip(predictors, option)]
            option_number += 1
    segment, part = torch.tensor(segment), torch.tensor(part)
    index = torch.arange(len(ids))
    mask = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
    mask &= (part[None, :] == 0) | (part[None, :] == part[:, None])
    return torch.tensor([ids]), torch.tensor([positions]), mask[None, None], triples


def _text_packed(model, tokenizer, examples, row_tokens, max_seq_len, precision, progress) -> list[list[float]]:
    """Summed option log-probabilities, every question's context encoded once with all its options after it,
    questions packed without padding into rows of at most ``row_tokens`` tokens, logits only where an
    option token is predicted."""
    device = next(model.parameters()).device
    encoded = _encode_questions(tokenizer, examples, max_seq_len)
    sizes = [len(context) + sum(len(o) for o in options) for context, options in encoded]
    order = sorted(range(len(examples)), key=lambda i: -sizes[i])
    capacity = max(row_tokens, max(sizes))
    rows, filled = [[]], 0
    for i in order:
        if filled + sizes[i] > capacity:
            rows.append([])
            filled = 0
        rows[-1].append(i)
        filled += sizes[i]
    totals = [[0.0] * len(e.choices) for e in examples]
    was_training = model.training
    model.eval()
    with tqdm(total=len(examples), desc="eval (text, packed)", unit="q", disable=not progress, **bar_options()) as bar:
        for row in rows:
            ids, positions, mask, triples = _pack_row([encoded[i] for i in row])
            predictors = sorted({p for p, _, _ in triples})
            where = {p: k for k, p in enumerate(predictors)}
            with autocast_for(device, precision):
                logits = model(
                    input_ids=ids.to(device),
                    position_ids=positions.to(device),
                    attention_mask=mask.to(device),
                    logits_to_keep=torch.tensor(predictors, device=device),
                    use_cache=False,
                ).logits[0]
            logprobs = logits.float().log_softmax(-1)
            picked = logprobs[[where[p] for p, _, _ in triples], [t for _, t, _ in triples]].cpu()
            owners = torch.tensor([o for _, _, o in triples])
            sums = torch.zeros(int(owners.max()) + 1, dtype=picked.dtype).index_add_(0, owners, picked).tolist()
            for i in row:
                count = len(examples[i].choices)
                totals[i], sums = sums[:count], sums[count:]
            bar.update(len(row))
    model.train(was_training)
    return totals
