"""Length-grouped, seeded batch sampling that resumes mid-epoch, and right-padding collation.

Lightning saves the state of a data loader that has ``state_dict``/``load_state_dict`` in each checkpoint and
restores it before iterating, so a resumed fit sees exactly the batches an uninterrupted fit would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from falqon_lit.prompts import IGNORE_INDEX


class ListDataset(Dataset):
    """A list of encoded examples ``{"input_ids": list[int], "labels": list[int]}``; a tuple of indices (a packed
    row, see ``falqon_lit.packing``) gets the list of those examples."""

    def __init__(self, examples: Sequence[dict[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | tuple[int, ...]) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, tuple):
            return [self.examples[i] for i in index]
        return self.examples[index]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar lengths, reproducible from ``(seed, epoch)``.

    Each epoch: permute all indices with a generator seeded by ``seed + epoch``, cut the permutation into mega-batches
    of ``batch_size * group_factor``, sort each by length (less padding), cut into batches, and shuffle the batch order.

    Args:
        lengths: sequence length of every example.
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        seed: base seed of the per-epoch shuffles.
        shuffle: ``False`` yields index order, in batches (validation).
        group_by_length: sort within mega-batches; ``False`` is a plain seeded shuffle.
        group_factor: mega-batch size in batches.
        num_replicas: data-parallel ranks; each takes every ``num_replicas``-th batch of the same epoch order
            (trimmed to a multiple of ``num_replicas`` so every rank steps equally often).
        rank: this process's data-parallel rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        group_factor: int = 16,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"LengthGroupedBatchSampler needs 0 <= rank < num_replicas, got {rank} and {num_replicas}")
        self.num_replicas, self.rank = num_replicas, rank
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.group_factor = group_by_length, group_factor
        self.epoch = 0
        self.skip = 0
        """Batches to skip at the start of the next iteration (set when resuming mid-epoch)."""
        # Lightning calls set_epoch on `batch_sampler.sampler`; this object is its own epoch-aware sampler.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch cancels any pending skip."""
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, in order."""
        batches = self._all_batches()
        if self.num_replicas == 1:
            return batches
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            return [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        if self.group_by_length:
            mega = self.batch_size * self.group_factor
            order = [i for s in range(0, n, mega) for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])]
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self.batches()[skip:]

    def padding_fraction(self, pad_to_multiple_of: int = 1, max_width: int | None = None) -> float:
        """Fraction of padding tokens in this rank's batches of the current epoch, as ``collate`` pads them."""
        real = padded = 0
        for batch in self.batches():
            real += sum(self.lengths[i] for i in batch)
            padded += len(batch) * padded_width(max(self.lengths[i] for i in batch), pad_to_multiple_of, max_width)
        return 1 - real / max(padded, 1)

    def __len__(self) -> int:
        total = (len(self.lengths) + self.batch_size - 1) // self.batch_size
        return total if self.num_replicas == 1 else total // self.num_replicas


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`LengthGroupedBatchSampler` whose state is ``(epoch, batches consumed)``.

    The owner counts consumed batches with :meth:`mark_consumed` (prefetching makes the sampler run ahead, so the
    sampler itself cannot know).
    """

    def __init__(self, *args: Any, batch_sampler: LengthGroupedBatchSampler, **kwargs: Any) -> None:
        super().__init__(*args, batch_sampler=batch_sampler, **kwargs)
        self.consumed = 0
        self._consumed_epoch = 0

    def mark_consumed(self) -> None:
        """Count one batch the training loop has taken."""
        if self._consumed_epoch != self.batch_sampler.epoch:
            self._consumed_epoch, self.consumed = self.batch_sampler.epoch, 0
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "consumed"}`` at checkpoint time."""
        consumed = self.consumed if self._consumed_epoch == self.batch_sampler.epoch else 0
        return {"epoch": self.batch_sampler.epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration starts after the batches already consumed in the saved epoch."""
        self.batch_sampler.epoch = self._consumed_epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        # A checkpoint written after the epoch's last batch resumes at the next epoch, which set_epoch selects.
        self.batch_sampler.skip = self.consumed if self.consumed < len(self.batch_sampler) else 0


def padded_width(longest: int, pad_to_multiple_of: int = 1, max_width: int | None = None) -> int:
    """Width of a batch whose longest example has ``longest`` tokens: rounded up to ``pad_to_multiple_of``, capped
    at ``max_width`` (never below ``longest``)."""
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return width if max_width is None else max(longest, min(width, max_width))


def collate(
    examples: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1, max_width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to ``pad_to_multiple_of`` and capped at ``max_width``: padding
    gets ``attention_mask`` 0 and label ``-100`` (never trained).

    Rounding up buckets the sequence lengths into a few shapes (multiples of 64 up to ``max_length`` give at most
    ``max_length / 64`` shapes), so compiled steps stop recompiling for every new length; 16 is a GEMM alignment.
    """
    width = padded_width(max(len(e["input_ids"]) for e in examples), pad_to_multiple_of, max_width)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(examples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Prompt strings for ``predict`` (tokenized by the generation helper)."""
    return {"prompt": [e["prompt"] for e in examples]}
