"""Sequence packing: rows, position ids, label masks, attention that never crosses a conversation, equal losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp8_devices import DEVICES
from tiny_models import TINY_VOCAB, tiny_llama

from falqon_lit.batching import IGNORE_INDEX, ListDataset, ResumableDataLoader, collate
from falqon_lit.packing import PackedBatchSampler, collate_packed, pack_rows

ATTENTION = ["eager", "sdpa"]


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Random conversations: the first third of each is prompt (label -100), the rest trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _model(attention: str, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama().double().eval().to(device)
    model.set_attn_implementation(attention)
    return model


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Per-position next-token losses ``(B, T-1)``, 0 where nothing is trained (the module's loss, unreduced)."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if packed:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.cpu()


def test_pack_rows_places_every_example_once_within_capacity() -> None:
    lengths = torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = pack_rows(range(300), lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 64
    # Best-fit decreasing wastes little: at most one row's worth of slack beyond the lower bound, per 10 rows.
    assert len(rows) <= -(-sum(lengths) // 64) * 1.1 + 1


def test_collate_packed_restarts_positions_and_masks_first_labels() -> None:
    a, b = _examples([5, 4])
    batch = collate_packed([[a, b]], pad_token_id=0, max_length=12, num_rows=2)
    assert batch["input_ids"].shape == batch["position_ids"].shape == (2, 12)  # a missing row is all padding
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert batch["position_ids"][1].tolist() == list(range(12))
    assert batch["input_ids"][0, :9].tolist() == a["input_ids"] + b["input_ids"]
    # b's first token is not a target of a's last token; the rest of b's labels are b's own.
    assert batch["labels"][0, :9].tolist() == [IGNORE_INDEX, *a["labels"][1:], IGNORE_INDEX, *b["labels"][1:]]
    assert batch["labels"][0, 9:].eq(IGNORE_INDEX).all() and batch["labels"][1].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(dim=1).tolist() == [9, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_attention_never_crosses_a_conversation(attention: str, device: str) -> None:
    model = _model(attention, device)
    first, second = _examples([7, 9], seed=2)
    other_first = _examples([7], seed=3)[0]  # a different conversation in the first slot
    with torch.no_grad():
        packed = collate_packed([[first, second]], 0, 20, 1)
        changed = collate_packed([[other_first, second]], 0, 20, 1)
        alone = _token_losses(model, collate([second], 0), packed=False)[0]
        losses = _token_losses(model, packed, packed=True)[0, 7:15]
        changed_losses = _token_losses(model, changed, packed=True)[0, 7:15]
        # Control: the same rows with running positions (one long sequence) do see the first conversation.
        leaky = {**packed, "position_ids": torch.arange(20)[None]}
        leaky_changed = {**changed, "position_ids": torch.arange(20)[None]}
        leaked = _token_losses(model, leaky, packed=True)[0, 7:15]
        leaked_changed = _token_losses(model, leaky_changed, packed=True)[0, 7:15]
    # As if the conversation were alone (to the float32 rounding of Llama's RMSNorm, which upcasts to float32 only).
    torch.testing.assert_close(losses, alone, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(changed_losses, losses, rtol=1e-6, atol=1e-7)
    assert (leaked - leaked_changed).abs().max() > 1e-3  # a leaked token would have changed the loss


@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_loss_equals_unpacked_loss_on_the_same_conversations(attention: str) -> None:
    model = _model(attention)
    examples = _examples([11, 30, 5, 17, 24, 9, 3], seed=4)
    rows = pack_rows(range(len(examples)), [len(e["input_ids"]) for e in examples], 32)
    assert any(len(row) > 1 for row in rows)
    with torch.no_grad():
        packed_losses = _token_losses(model, collate_packed([[examples[i] for i in r] for r in rows], 0, 32, 8), True)
        unpacked = collate(examples, 0)
        unpacked_losses = _token_losses(model, unpacked, packed=False)
    trained = (unpacked["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert trained == (collate_packed([examples], 0, 99, 1)["labels"] != IGNORE_INDEX).sum()
    # Token-mean over all trained tokens of the batch, the module's loss, in both layouts.
    torch.testing.assert_close(packed_losses.sum() / trained, unpacked_losses.sum() / trained, rtol=1e-6, atol=0)


def test_module_packed_and_unpacked_losses_agree(tiny_trainer_parts) -> None:
    """The FALQON module end to end (FP8 layers, per-token activation scales): the same conversations, two layouts."""
    module, data = tiny_trainer_parts()
    module.configure_model()
    data.prepare(module.tokenizer)
    examples = data.train_data.examples[:6]
    rows = pack_rows(range(6), [len(e["input_ids"]) for e in examples], data.max_length)
    packed = collate_packed([[examples[i] for i in r] for r in rows], module.tokenizer.pad_token_id, 64, len(rows))
    unpacked = collate(examples, module.tokenizer.pad_token_id)
    assert len(rows) < 6
    with torch.no_grad():
        packed_loss, _, packed_targets = module.loss_and_predictions(packed)
        unpacked_loss, _, unpacked_targets = module.loss_and_predictions(unpacked)
    assert (packed_targets != IGNORE_INDEX).sum() == (unpacked_targets != IGNORE_INDEX).sum()
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)


def test_packed_sampler_is_deterministic_complete_and_resumable() -> None:
    lengths = torch.randint(2, 40, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    data = ListDataset(_examples(lengths))

    def loader() -> ResumableDataLoader:
        sampler = PackedBatchSampler(lengths, batch_size=4, max_length=48, seed=3, group_factor=4)
        return ResumableDataLoader(data, batch_sampler=sampler, collate_fn=lambda rows: collate_packed(rows, 0, 48, 4))

    first, again = loader(), loader()
    assert first.batch_sampler.batches() == again.batch_sampler.batches()
    rows = [row for batch in first.batch_sampler.batches() for row in batch]
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert len(first) == len(first.batch_sampler.batches()) and first.batch_sampler.padding_fraction() < 0.1
    again.batch_sampler.set_epoch(1)
    assert again.batch_sampler.batches() != first.batch_sampler.batches()
    full = [b["input_ids"] for b in first]
    assert {tuple(t.shape) for t in full} == {(4, 48)}  # one shape for the whole epoch
    for _ in range(3):
        first.mark_consumed()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip([b["input_ids"] for b in resumed], full[3:], strict=True))


def test_packed_sampler_rejects_examples_longer_than_a_row() -> None:
    with pytest.raises(ValueError, match="longer than max_length 8"):
        PackedBatchSampler([3, 9], batch_size=2, max_length=8)
