"""The tiny random Llama used across trainer, distributed and evaluation tests (one definition, plain module)."""

from __future__ import annotations

TINY_VOCAB = 320


def tiny_llama_config(**overrides: object) -> dict:
    """Config dict of a 2-layer random Llama whose linears are FP8-aligned (hidden 64, FFN 128, kv width 32)."""
    return {
        "model_type": "llama",
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **overrides,
    }


def tiny_llama(**overrides: object):
    """A ``LlamaForCausalLM`` of :func:`tiny_llama_config` (random weights from the current torch seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in tiny_llama_config(**overrides).items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**config))
