"""Sequence packing: several conversations per row of exactly ``max_length`` tokens, one fixed batch shape.

A packed batch follows the ``transformers`` packed-sequence convention: ``position_ids`` restart at 0 for every
conversation and the model gets no 2-D ``attention_mask``; ``transformers.masking_utils`` then finds the
conversation boundaries where the positions restart and builds a block-diagonal causal mask (eager, sdpa, flex) or
varlen flash-attention calls, so no token attends across a boundary. The padding tail of a row is one more segment
(positions restarting at 0) that nothing else attends to and that is never a target.

Loss weighting is unchanged by packing: the loss is the mean next-token cross-entropy over every trained token in
the batch, so a batch of packed rows has exactly the loss of the same conversations padded one per row. The first
token of each conversation is never a target (the unpacked shift never predicts it); packing masks its label so the
last token of one conversation does not learn to predict the first token of the next.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from falqon_lit.batching import IGNORE_INDEX, LengthGroupedBatchSampler

Row = tuple[int, ...]
"""Example indices packed into one row, in order."""


def pack_rows(order: Sequence[int], lengths: Sequence[int], capacity: int) -> list[Row]:
    """Best-fit decreasing: put each example (longest first) into the open row it fills most tightly.

    Args:
        order: example indices to pack (their order breaks ties between equal lengths).
        lengths: token count of every example (each ``<= capacity``).
        capacity: tokens per row.

    Returns:
        Rows of example indices whose lengths sum to at most ``capacity``.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted: bisect finds the tightest row that fits
    for i in sorted(order, key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([])
            row, room = len(rows) - 1, capacity
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return [tuple(r) for r in rows]


class PackedBatchSampler(LengthGroupedBatchSampler):
    """Batches of ``batch_size`` packed rows, reproducible from ``(seed, epoch)`` and resumable mid-epoch.

    Each epoch: permute all examples with a generator seeded by ``seed + epoch``, cut the permutation into windows
    of about ``group_factor`` batches of tokens, pack each window with :func:`pack_rows`, cut the rows into batches
    and shuffle the batch order. A batch is a list of rows (tuples of example indices); :class:`ListDataset`
    returns a row's examples and :func:`collate_packed` builds the tensors. Epoch, skip and data-parallel split
    work as in :class:`LengthGroupedBatchSampler`.

    Args:
        lengths: token count of every example (each ``<= max_length``).
        batch_size: rows per batch.
        max_length: tokens per row.
        seed: base seed of the per-epoch shuffles.
        shuffle: ``False`` packs the examples in index order and keeps the batch order.
        group_factor: packing window in batches.
        num_replicas: data-parallel ranks.
        rank: this process's data-parallel rank.

    Raises:
        ValueError: an example longer than ``max_length``, or a bad ``rank``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        max_length: int,
        seed: int = 0,
        shuffle: bool = True,
        group_factor: int = 16,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(lengths, batch_size, seed, shuffle, True, group_factor, num_replicas, rank)
        if any(n > max_length for n in self.lengths):
            raise ValueError(f"PackedBatchSampler got an example longer than max_length {max_length}; truncate first")
        self.max_length = max_length
        self._cache: tuple[int, list[list[Row]]] | None = None

    def _all_batches(self) -> list[list[Row]]:  # type: ignore[override]
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        window_tokens = self.group_factor * self.batch_size * self.max_length
        rows: list[Row] = []
        start, tokens = 0, 0
        for end, i in enumerate(order, start=1):
            tokens += self.lengths[i]
            if tokens >= window_tokens or end == n:
                rows += pack_rows(order[start:end], self.lengths, self.max_length)
                start, tokens = end, 0
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._cache = (self.epoch, batches)
        return batches

    def __len__(self) -> int:
        return len(self.batches())

    def padding_fraction(self, pad_to_multiple_of: int = 1, max_width: int | None = None) -> float:
        """Fraction of padding tokens in this rank's batches of the current epoch (rows are always full width)."""
        batches = self.batches()
        real = sum(self.lengths[i] for batch in batches for row in batch for i in row)
        return 1 - real / max(len(batches) * self.batch_size * self.max_length, 1)


def collate_packed(
    rows: list[list[dict[str, Any]]], pad_token_id: int, max_length: int, num_rows: int
) -> dict[str, torch.Tensor]:
    """``(num_rows, max_length)`` tensors of packed rows: ids, labels, ``position_ids`` and a real-token mask.

    ``attention_mask`` marks real tokens (1) against padding (0), as in unpacked batches, for token counts; the
    model is called with ``position_ids`` and no mask (see the module docstring). Missing rows (the last batch of an
    epoch) are all padding, so every batch has the same shape.
    """
    input_ids = torch.full((num_rows, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((num_rows, max_length), dtype=torch.long)
    position_ids = torch.zeros((num_rows, max_length), dtype=torch.long)
    for r, examples in enumerate(rows):
        at = 0
        for e in examples:
            n = len(e["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:])  # the first token is never a target
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        attention_mask[r, :at] = 1
        position_ids[r, at:] = torch.arange(max_length - at)  # the padding tail: a segment of its own
    for r in range(len(rows), num_rows):
        position_ids[r] = torch.arange(max_length)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
