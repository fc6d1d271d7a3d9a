"""Shared fixtures of the trainer tests: a tiny chat tokenizer, a tiny random Llama and chat data on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import TINY_VOCAB, tiny_llama_config

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = "hello how are you doing today i am fine thanks what about the weather is nice sunny rain cat dog".split()


@pytest.fixture(scope="session")
def tiny_chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (320 tokens) with a ChatML chat template, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(12)) for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        model_max_length=256,
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("tiny_chat_tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dict() -> dict:
    """Config dict of the tiny random Llama (``tiny_models.tiny_llama_config``)."""
    return tiny_llama_config()


def write_chat_jsonl(path: Path, n: int = 48) -> Path:
    """``n`` short two-turn conversations with a learnable pattern (the reply echoes part of the question)."""
    with path.open("w") as f:
        for i in range(n):
            a, b, c = (_WORDS[(i * k) % len(_WORDS)] for k in (1, 3, 5))
            messages = [
                {"role": "user", "content": f"{a} {b} {c} {i}"},
                {"role": "assistant", "content": f"{c} {b} {a} thanks"},
            ]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "what about the cat"}, {"role": "assistant", "content": b}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def tiny_chat_jsonl(tmp_path: Path) -> Path:
    """A JSONL file of 48 chat conversations (``messages`` column)."""
    return write_chat_jsonl(tmp_path / "chat.jsonl")


@pytest.fixture
def tiny_trainer_parts(tiny_chat_tokenizer_dir: Path, tiny_llama_dict: dict, tiny_chat_jsonl: Path):
    """Factory of ``(FalqonLitModule, InstructionDataModule)`` on the tiny model and data; kwargs override."""
    from falqon_lit.data import InstructionDataModule
    from falqon_lit.module import FalqonLitModule

    def make(module_kwargs: dict | None = None, data_kwargs: dict | None = None):
        module = FalqonLitModule(
            **{"model": tiny_llama_dict, "tokenizer": str(tiny_chat_tokenizer_dir), **(module_kwargs or {})}
        )
        data = InstructionDataModule(
            **{
                "source": str(tiny_chat_jsonl),
                "max_length": 64,
                "batch_size": 4,
                "val_fraction": 0.2,
                **(data_kwargs or {}),
            }
        )
        return module, data

    return make
