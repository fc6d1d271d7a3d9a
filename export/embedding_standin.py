"""The input embedding and output head of an ONNX export, stored once in the export dtype (bf16 by default).

Traced as they are, a float32 model gives the graph a float32 embedding table and, for the head, a transposed
float32 copy of it (the exporter folds ``lm_head``'s transpose into a new initializer): twice the vLLM folder.
Here both read one ``(vocab, hidden)`` initializer in ``--dtype`` and ``Cast`` it to the compute dtype at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class _StoredEmbedding(nn.Module):
    """``Gather`` from a ``--dtype`` table, then ``Cast`` to the compute dtype."""

    def __init__(self, table: torch.Tensor, compute: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", table)
        self.compute = compute

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).to(self.compute)


class _StoredHead(nn.Module):
    """``x @ Cast(table)ᵀ``: the transpose is a graph node, not a stored copy."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.to(x.dtype).transpose(0, 1))


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


@contextlib.contextmanager
def stored_embeddings(model: nn.Module, dtype: torch.dtype, compute: torch.dtype) -> Iterator[set[int]]:
    """Swap a plain ``nn.Embedding`` input and bias-free ``nn.Linear`` head for stand-ins holding ``dtype`` tables
    (one shared table when tied); yields the ids of those tables (callers must not cast them); restores on exit."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps: dict[str, nn.Module] = {}
    table = None
    if type(embedding) is nn.Embedding:
        table = embedding.weight.detach().to(dtype)
        swaps[_name_of(model, embedding)] = _StoredEmbedding(table, compute)
    if type(head) is nn.Linear and head.bias is None:
        tied = table is not None and head.weight is embedding.weight
        swaps[_name_of(model, head)] = _StoredHead(table if tied else head.weight.detach().to(dtype))
    originals = {name: model.get_submodule(name) for name in swaps}
    try:
        for name, module in swaps.items():
            model.set_submodule(name, module)
        yield {id(m.weight) for m in swaps.values()}
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
