"""Greedy text generation from rendered prompts, for ``predict`` and the before/after samples of a fit."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer


@torch.no_grad()
def generate_text(
    model: PreTrainedModel, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 32
) -> list[str]:
    """Greedy completions of already-rendered prompt strings (chat template or prompt template applied).

    Args:
        model: a causal LM (FALQON-converted or not).
        tokenizer: its tokenizer; prompts are left-padded so that every completion starts at the same column.
        prompts: rendered prompts; special tokens they contain are parsed, none are added.
        max_new_tokens: completion budget per prompt.

    Returns:
        The decoded completions, special tokens removed, stripped.
    """
    if not prompts:
        return []
    was_training = model.training
    padding_side = tokenizer.padding_side
    model.eval()
    try:
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(model.parameters()).device
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, new)
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
