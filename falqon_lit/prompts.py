"""Records to conversations, conversations to token ids with only assistant turns trained.

A record becomes a list of ``{"role", "content"}`` messages whatever its columns (``messages``, ShareGPT
``conversations``, Alpaca ``instruction``/``input``/``output``, ``question``/``answer``, ``prompt``/``response``).
A conversation is rendered as alternating *pieces*: prompt text (labels ``-100``) and assistant text (trained),
either through the tokenizer's chat template or through a named prompt template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase as Tokenizer

IGNORE_INDEX = -100

CHAT = "chat"
"""Template name that selects the tokenizer's own chat template."""
PROMPT_TEMPLATES: dict[str, str] = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{prompt}\n\n### Response:\n"
    ),
    "plain": "{prompt}\n",
}
"""Named prompt templates: ``{prompt}`` is the user turn; the assistant turn follows, ended by the eos token."""
TEMPLATES = (CHAT, *PROMPT_TEMPLATES)

_PAIRS = (("instruction", "output"), ("question", "answer"), ("prompt", "response"), ("prompt", "completion"))
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Message = dict[str, str]


def check_template(name: str) -> str:
    """Validate a template name.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name not in TEMPLATES:
        raise ValueError(f"--data.template must be one of {list(TEMPLATES)}, got {name!r}")
    return name


def to_messages(record: Mapping[str, Any]) -> list[Message]:
    """Normalise one record to chat messages.

    Raises:
        ValueError: the record has none of the known column layouts.
    """
    if "messages" in record:
        try:
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]
        except (KeyError, TypeError):
            shown = str(record["messages"])[:80]
            raise ValueError(f"'messages' must be a list of {{'role', 'content'}} objects, got {shown}") from None
    if "conversations" in record:
        return [
            {"role": _SHAREGPT_ROLES.get(str(m.get("from", m.get("role"))), "user"), "content": str(m.get("value", ""))}
            for m in record["conversations"]
        ]
    for prompt_key, answer_key in _PAIRS:
        if prompt_key in record and answer_key in record:
            prompt = str(record[prompt_key])
            if prompt_key == "instruction" and record.get("input"):
                prompt = f"{prompt}\n\n{record['input']}"
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record[answer_key])}]
    layouts = ["messages", "conversations", *(f"{p}/{a}" for p, a in _PAIRS)]
    raise ValueError(f"record has columns {sorted(record)}; expected one of {layouts}")


def _chat_pieces(messages: list[Message], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, trained) pieces at assistant turn boundaries."""
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix-stably, so assistant turns "
                "cannot be located; use a named --data.template (e.g. 'plain')"
            )
        pieces += [(prefix[len(rendered) :], False), (full[len(prefix) :], True)]
        rendered = full
    return pieces


def _template_pieces(messages: list[Message], template: str, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    pieces: list[tuple[str, bool]] = []
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pending: list[str] = [system] if system else []
    for message in messages:
        if message["role"] == "assistant":
            prompt = PROMPT_TEMPLATES[template].format(prompt="\n\n".join(pending))
            pieces += [(prompt, False), (message["content"] + (tokenizer.eos_token or ""), True)]
            pending = []
        elif message["role"] != "system":
            pending.append(message["content"])
    return pieces


def render_prompt(messages: list[Message], template: str, tokenizer: Tokenizer) -> str:
    """The prompt text that asks for the next assistant turn after ``messages`` (for generation)."""
    if template == CHAT:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    pieces = _template_pieces([*messages, {"role": "assistant", "content": ""}], template, tokenizer)
    return bos + "".join(text for text, _ in pieces[:-1])


def encode(messages: list[Message], template: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: labels are ``-100`` everywhere but on assistant turns.

    Each piece is tokenized on its own, exactly as a generation prompt would be, so train and inference agree.
    """
    if template == CHAT:
        pieces = _chat_pieces(messages, tokenizer)
    else:
        pieces = _template_pieces(messages, template, tokenizer)
        if tokenizer.bos_token_id is not None and pieces:
            pieces[0] = (tokenizer.bos_token + pieces[0][0], False)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
