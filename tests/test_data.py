"""InstructionDataModule, prompt rendering with label masks, and length-grouped resumable batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from falqon_lit.batching import LengthGroupedBatchSampler, ResumableDataLoader, collate
from falqon_lit.data import InstructionDataModule
from falqon_lit.prompts import IGNORE_INDEX, encode, render_prompt, to_messages

CONVERSATION = [
    {"role": "user", "content": "hello cat"},
    {"role": "assistant", "content": "hi dog"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine"},
]


def _trained_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


def test_encode_chat_template_masks_all_but_assistant_turns(tiny_chat_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    input_ids, labels = encode(CONVERSATION, "chat", tokenizer)
    # Hand-checked ChatML rendering: only the two assistant contents and their end-of-turn markers are trained.
    assert tokenizer.decode(input_ids) == (
        "<|im_start|>user\nhello cat<|im_end|>\n<|im_start|>assistant\nhi dog<|im_end|>\n"
        "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine<|im_end|>\n"
    )
    assert _trained_text(tokenizer, input_ids, labels) == "hi dog<|im_end|>\nfine<|im_end|>\n"
    prompt = tokenizer("<|im_start|>user\nhello cat<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    n_prompt = len(prompt["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt] == input_ids[n_prompt]


def test_encode_plain_template_trains_reply_and_eos(tiny_chat_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_tokenizer_dir)
    input_ids, labels = encode(CONVERSATION[:2], "plain", tokenizer)
    assert tokenizer.decode(input_ids) == "<|endoftext|>hello cat\nhi dog<|im_end|>"
    assert _trained_text(tokenizer, input_ids, labels) == "hi dog<|im_end|>"
    assert render_prompt(CONVERSATION[:1], "plain", tokenizer) == "<|endoftext|>hello cat\n"


@pytest.mark.parametrize(
    ("record", "expected_user"),
    [
        ({"instruction": "add", "input": "1 2", "output": "3"}, "add\n\n1 2"),
        ({"question": "q?", "answer": "a"}, "q?"),
        ({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}, "q?"),
    ],
)
def test_to_messages_normalises_layouts(record: dict, expected_user: str) -> None:
    messages = to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == expected_user


def test_to_messages_unknown_layout_names_columns() -> None:
    with pytest.raises(ValueError, match=r"record has columns \['foo'\]"):
        to_messages({"foo": 1})


def test_collate_pads_without_training_padding() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_pads_to_a_multiple_for_fp8_gemms() -> None:
    examples = [{"input_ids": [5] * n, "labels": [5] * n} for n in (17, 3)]
    batch = collate(examples, 0, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (2, 32)  # 17 rounded up, not to 17 + 16
    assert batch["labels"][0, 17:].eq(-100).all() and batch["attention_mask"].sum(dim=1).tolist() == [17, 3]
    assert collate(examples[1:], 0, pad_to_multiple_of=16)["input_ids"].shape == (1, 16)
    assert torch.equal(collate(examples, 0)["input_ids"], batch["input_ids"][:, :17])  # default: longest


def test_length_grouped_sampler_deterministic_per_epoch_and_groups_lengths() -> None:
    lengths = [(i * 37) % 101 for i in range(64)]
    a, b = LengthGroupedBatchSampler(lengths, 4, seed=3), LengthGroupedBatchSampler(lengths, 4, seed=3)
    assert list(a) == list(b)
    assert sorted(i for batch in a for i in batch) == list(range(64))
    b.set_epoch(1)
    assert list(a) != list(b)
    # Within a mega-batch the sampler sorts by length, so batches are much tighter than random ones.
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in a)
    assert spread < 64 / 4 * 101 / 4


def test_resumable_loader_skips_consumed_batches() -> None:
    sampler = LengthGroupedBatchSampler(list(range(20)), 4, seed=1)
    loader = ResumableDataLoader(list(range(20)), batch_sampler=sampler)
    full = [b.tolist() for b in loader]
    for _ in range(2):
        loader.mark_consumed()
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 2}
    fresh = ResumableDataLoader(list(range(20)), batch_sampler=LengthGroupedBatchSampler(list(range(20)), 4, seed=1))
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[2:]
    assert [b.tolist() for b in fresh] == full  # the skip applies once


def _setup(data: InstructionDataModule, tokenizer_dir: Path) -> InstructionDataModule:
    data.tokenizer_path = str(tokenizer_dir)
    data.setup("fit")
    return data


def test_datamodule_split_is_deterministic_and_disjoint(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    first = _setup(InstructionDataModule(str(tiny_chat_jsonl), val_fraction=0.25, seed=7), tiny_chat_tokenizer_dir)
    again = _setup(InstructionDataModule(str(tiny_chat_jsonl), val_fraction=0.25, seed=7), tiny_chat_tokenizer_dir)
    other = _setup(InstructionDataModule(str(tiny_chat_jsonl), val_fraction=0.25, seed=8), tiny_chat_tokenizer_dir)
    assert (len(first.train_data), len(first.val_data)) == (36, 12)
    assert first.val_conversations == again.val_conversations != other.val_conversations
    val = {json.dumps(m) for m in first.val_conversations}
    train_records = [json.loads(line)["messages"] for line in tiny_chat_jsonl.read_text().splitlines()]
    assert sum(json.dumps(m) in val for m in train_records) == 12


def test_datamodule_truncates_and_counts(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    # The 16 three-turn conversations are 55-59 tokens long, the two-turn ones 30-32.
    data = _setup(InstructionDataModule(str(tiny_chat_jsonl), max_length=40, val_fraction=0.0), tiny_chat_tokenizer_dir)
    assert (data.truncated, data.dropped, len(data.train_data)) == (16, 0, 48)
    assert max(len(e["input_ids"]) for e in data.train_data.examples) == 40


def test_datamodule_drops_examples_without_trained_tokens(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    # The first assistant token sits at position 23 or 24: a 24-token cut leaves some with no target at all.
    data = _setup(InstructionDataModule(str(tiny_chat_jsonl), max_length=24, val_fraction=0.0), tiny_chat_tokenizer_dir)
    assert data.truncated == 48
    assert 0 < data.dropped < 48
    assert len(data.train_data) == 48 - data.dropped


@pytest.mark.parametrize("template", ["chat", "alpaca", "plain"])
def test_datamodule_templates_build_batches(
    template: str, tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path
) -> None:
    data = _setup(InstructionDataModule(str(tiny_chat_jsonl), template=template, batch_size=5), tiny_chat_tokenizer_dir)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 5
    assert ((batch["labels"] != IGNORE_INDEX) <= batch["attention_mask"].bool()).all()
    assert data.sample_prompts(1)[0]


def test_summary_dataloader_reads_validation_in_process(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    data = _setup(InstructionDataModule(str(tiny_chat_jsonl), num_workers=2, batch_size=4), tiny_chat_tokenizer_dir)
    loader = data.summary_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers  # nothing left running after a partial read
    workers = data.val_dataloader()
    assert workers.num_workers == 2
    for ours, theirs in zip(loader, workers, strict=True):  # the same batches in the same order
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_datamodule_missing_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--data.source '.*nope.jsonl' does not exist"):
        InstructionDataModule(str(tmp_path / "nope.jsonl"))


def test_datamodule_unknown_template_fails() -> None:
    with pytest.raises(ValueError, match=r"--data.template must be one of \['chat', 'alpaca', 'plain'\], got 'x'"):
        InstructionDataModule("chitchat", template="x")


def test_datamodule_empty_file_fails(tmp_path: Path, tiny_chat_tokenizer_dir: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="has no records"):
        _setup(InstructionDataModule(str(empty)), tiny_chat_tokenizer_dir)


def test_datamodule_max_length_over_context_fails(tiny_trainer_parts) -> None:
    from lightning.pytorch import Trainer

    module, data = tiny_trainer_parts(data_kwargs={"max_length": 4096})
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"--data.max_length 4096 exceeds the model's context length 256"):
        trainer.fit(module, datamodule=data)


def test_batch_sampler_splits_epoch_over_data_parallel_ranks() -> None:
    from falqon_lit.batching import LengthGroupedBatchSampler

    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11]
    single = LengthGroupedBatchSampler(lengths, batch_size=2, seed=3)
    ranks = [LengthGroupedBatchSampler(lengths, batch_size=2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    every = single.batches()  # 6 batches: 3 per rank, interleaved in the single-process order
    assert ranks[0].batches() == every[0:6:2] and ranks[1].batches() == every[1:6:2]
    assert len(ranks[0]) == len(ranks[1]) == 3
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        LengthGroupedBatchSampler(lengths, batch_size=2, num_replicas=2, rank=2)


def test_datamodule_packs_training_batches_only(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    auto = _setup(InstructionDataModule(str(tiny_chat_jsonl), max_length=64, batch_size=3), tiny_chat_tokenizer_dir)
    assert not auto.packs_training()  # packing=None: packed only when a Trainer trains on a GPU
    data = _setup(
        InstructionDataModule(str(tiny_chat_jsonl), max_length=64, batch_size=3, packing=True), tiny_chat_tokenizer_dir
    )
    train = list(data.train_dataloader())
    assert {tuple(b["input_ids"].shape) for b in train} == {(3, 64)} and all("position_ids" in b for b in train)
    # Every trained token of the epoch is trained once, packed or not (first tokens are never targets).
    unpacked = list(auto.train_dataloader())
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in train) == sum(
        int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in unpacked
    )
    assert all("position_ids" not in b for b in data.val_dataloader())


def test_datamodule_buckets_unpacked_widths(tiny_chat_jsonl: Path, tiny_chat_tokenizer_dir: Path) -> None:
    data = InstructionDataModule(str(tiny_chat_jsonl), max_length=60, batch_size=4, pad_to_multiple_of=16)
    widths = {b["input_ids"].shape[1] for b in _setup(data, tiny_chat_tokenizer_dir).train_dataloader()}
    assert widths <= {16, 32, 48, 60}  # multiples of 16, capped at max_length
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        InstructionDataModule(str(tiny_chat_jsonl), pad_to_multiple_of=0)
