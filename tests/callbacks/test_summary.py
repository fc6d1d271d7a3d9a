"""``FitSummary`` output: the sample prompt is what the user said, not the rendered chat template."""

from __future__ import annotations

from falqon_lit.callbacks.summary import _last_user_turn


def test_summary_prompt_is_the_last_user_message_before_the_first_reply() -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "how  are\nyou?"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "later question"},
    ]
    assert _last_user_turn(messages) == "how are you?"
    assert _last_user_turn([{"role": "user", "content": "x" * 300}], width=10) == "x" * 10 + "…"
