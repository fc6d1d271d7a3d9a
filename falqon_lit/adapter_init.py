"""Directions of FALQON's frozen ``A``: gradient-informed initialisation and A refresh (issue 18).

FALQON trains only ``B``; ``A`` is frozen inside the FP8 weight ``[W; A]``, so the whole update ``B·A`` lives in the
row space of ``A``. Two ways to choose that space better than the paper's SVD of the quantization error:

- **gradient init** (LoRA-GA / LoRA-One for frozen-``A`` training): ``A`` = the top-r right singular directions of
  the dense weight gradient ``G = Σ gᵀ x`` of a few calibration batches, so the first steps of ``B`` follow the
  directions full fine-tuning would move most. ``G`` is accumulated by hooks on the layers' inputs and output
  gradients (:class:`WeightGradientCapture`); the melded layer itself never forms it.
- **A refresh**: after a flush (every row of ``B`` merged, ``B = 0``) the ``r`` rows of ``A`` are replaced by new
  directions and only those rows are requantized (:func:`set_lora_A`); the total update is then no longer confined
  to one rank-r subspace.

New directions are orthonormal rows scaled to :func:`a_row_norm`, the row norm of PEFT's kaiming-uniform ``A``:
with Adam the size of ``A`` sets how far one step of ``B`` moves ``W``, and this keeps it the same as with random
``A`` (times ``lora_alpha / rank`` when set).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from falqon_lit.config import FalqonConfig, InitMethod
from falqon_lit.fp8.numerics import E4M3, fp8_max, quantize, quantize_weight
from falqon_lit.layer_base import FalqonLayer

_LOWRANK_OVERSAMPLE = 16
"""Extra columns of the randomized SVD that finds the gradient's top directions (Halko et al.)."""


def a_row_norm(config: FalqonConfig) -> float:
    """Row norm of new ``A`` rows: PEFT's kaiming-uniform ``A`` has elements of variance ``1 / (3 in)``, so rows of
    norm ``1/√3`` whatever ``in`` is; times ``lora_alpha / rank`` when ``lora_alpha`` is set."""
    alpha_scale = 1.0 if config.lora_alpha is None else config.lora_alpha / config.rank
    return alpha_scale / math.sqrt(3.0)


def top_right_directions(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal ``(rank, in)``: the top-``rank`` right singular vectors of ``grad`` ``(out, in)``.

    A randomized SVD with oversampling and 4 power iterations (exact SVDs of a 7B model's 224 gradients would take
    minutes); its random sketch draws from a forked, fixed-seed generator, so the caller's RNG stream is untouched.
    On the CPU it runs on one thread: data-parallel ranks must find the same directions bit for bit from the same
    gradient, and CPU kernels round differently on different thread counts (Lightning's launcher gives rank 0 one
    thread and the ranks it starts all cores).
    """
    grad = grad.detach().float()
    q = min(rank + _LOWRANK_OVERSAMPLE, *grad.shape)
    devices = [grad.device] if grad.device.type == "cuda" else []
    threads = torch.get_num_threads()
    if grad.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            _, _, v = torch.svd_lowrank(grad, q=q, niter=4)  # v: (in, q)
    finally:
        torch.set_num_threads(threads)
    return v[:, :rank].t().contiguous()


def orthogonal_random_directions(previous: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal ``(rank, in)`` rows drawn at random in the orthogonal complement of ``previous``'s rows.

    Raises:
        ValueError: ``previous`` rows plus ``rank`` new ones do not fit in ``in`` dimensions.
    """
    in_features = previous.shape[1]
    if previous.shape[0] + rank > in_features:
        raise ValueError(
            f"random A refresh needs rank + previous rank <= in_features, got {rank} + {previous.shape[0]} > "
            f"{in_features}; use refresh directions 'gradient'"
        )
    basis = torch.linalg.qr(previous.detach().double().t()).Q  # (in, r_prev)
    draw = torch.randn(in_features, rank, generator=generator, dtype=torch.float64, device=generator.device)
    draw = draw.to(previous.device)
    draw -= basis @ (basis.t() @ draw)
    return torch.linalg.qr(draw).Q.t().float()  # (rank, in)


def refresh_generator(layer: FalqonLayer, refresh_index: int) -> torch.Generator:
    """A CPU generator seeded by the layer's salt and the refresh count: a resumed run draws the same directions."""
    return torch.Generator().manual_seed(zlib.crc32(f"{layer.salt}:{refresh_index}".encode()))


@torch.no_grad()
def set_lora_A(layer: FalqonLayer, lora_A_hp: torch.Tensor) -> None:
    """Replace the ``r`` rows of ``A`` in the melded FP8 weight, requantizing only those rows (both layouts).

    Row and block scales give the new rows fresh scales; a tensor scale is shared with ``W`` and kept (new rows
    beyond its FP8 range are scaled down to fit). ``W``'s rows keep every byte. A row-sharded layer replaces its
    replicated ``A``: every rank must pass the same ``lora_A_hp``.

    Raises:
        ValueError: a wrong shape, or ``B`` not zero (the old ``B·A`` would change meaning; flush first).
    """
    if tuple(lora_A_hp.shape) != (layer.rank, layer.in_features):
        raise ValueError(f"new A must have shape {(layer.rank, layer.in_features)}, got {tuple(lora_A_hp.shape)}")
    if bool(layer.local_lora_B().any()):  # sharded: this rank's rows
        raise ValueError("set_lora_A needs B == 0; flush the layer (merge B into W) before replacing A")
    a_fp8, a_scale = layer.lora_A_rows()
    a_hp = lora_A_hp.detach().float().to(a_fp8.device)
    if a_scale.numel() > 1:  # row or block scales: A's rows (their own block row) get fresh scales
        layer.write_lora_A(*quantize_weight(a_hp, layer.config.weight_scaling))
    else:
        # The scale is W's too; new rows beyond its range are shrunk as a whole (clamping would bend directions).
        limit = fp8_max(E4M3) * a_scale
        layer.write_lora_A(quantize(a_hp * (limit / a_hp.abs().amax()).clamp(max=1.0), a_scale, E4M3), None)


class WeightGradientCapture:
    """Accumulate the dense weight gradient ``G = Σ gᵀ x`` ``(out, in)`` (float32) of layers during backward.

    A forward hook keeps each layer's input and registers a hook on its output's gradient, where the product is
    added; nothing changes in the layers' own forward or backward. One ``(out, in)`` float32 tensor per layer is
    held while capturing (4 bytes per weight), plus each layer's input until its backward. Use as a context
    manager around the forward and backward passes to capture.
    """

    def __init__(self, layers: Mapping[str, FalqonLayer]) -> None:
        self.layers = dict(layers)
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> WeightGradientCapture:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(layer: FalqonLayer, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x_2d = inputs[0].detach().reshape(-1, layer.in_features)  # (M, in)

            def add(grad: torch.Tensor) -> None:
                g_2d = grad.detach().reshape(-1, layer.out_features)  # (M, out)
                # In the activations' dtype (bf16 under autocast: a tensor-core GEMM, float32 accumulation inside),
                # summed over batches in float32; directions do not need more.
                dtype = torch.promote_types(g_2d.dtype, x_2d.dtype)
                product = (g_2d.to(dtype).t() @ x_2d.to(dtype)).float()  # (out, in)
                if name in self.grads:
                    self.grads[name] += product
                else:
                    self.grads[name] = product

            output.register_hook(add)

        return hook


def gradient_directions(layers: Mapping[str, FalqonLayer], grads: Mapping[str, torch.Tensor]) -> dict:
    """New ``A`` per layer from captured gradients: top-r right singular directions scaled to :func:`a_row_norm`.

    Raises:
        ValueError: a layer without a captured gradient (it took no part in the loss).
    """
    missing = sorted(set(layers) - set(grads))
    if missing:
        raise ValueError(
            f"no weight gradient was captured for {len(missing)} layers ({missing[:3]}); make them reach the loss"
        )
    return {
        name: a_row_norm(layer.config) * top_right_directions(grads[name], layer.rank) for name, layer in layers.items()
    }


def calibrate_gradient_init(
    model: nn.Module,
    losses: Iterable[Callable[[], torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Gradient-informed ``A`` for every FALQON layer of ``model`` whose config asks for ``init: gradient``.

    Args:
        model: the converted model; its ``B`` must be zero (before training).
        losses: one closure per calibration batch, each running a forward pass and returning the loss.
        reduce: sums a gradient over data-parallel ranks (every rank must choose the same ``A``); ``None`` locally.

    Returns:
        The number of layers re-initialised. Leaves no gradient on any parameter.
    """
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, FalqonLayer) and m.config.init == InitMethod.GRADIENT
    }
    if not layers:
        return 0
    with WeightGradientCapture(layers) as capture:
        for loss in losses:
            loss().backward()
    for param in model.parameters():
        param.grad = None
    grads = capture.grads if reduce is None else {n: reduce(g) for n, g in capture.grads.items()}
    for name, lora_A in gradient_directions(layers, grads).items():
        set_lora_A(layers[name], lora_A)
    return len(layers)


def refresh_A(layers: Mapping[str, FalqonLayer], directions: Mapping[str, torch.Tensor]) -> int:
    """A refresh: flush every layer (merge all of ``B`` with its configured rounding, ``B = 0``), then requantize
    its ``A`` rows to the new directions. The caller resets the optimizer state of ``B`` (its moments were in the
    old ``A``'s coordinates).

    Returns:
        The rows the flush merged.
    """
    merged = sum(layer.flush(layer.config.merge_rounding) for layer in layers.values())
    for name, layer in layers.items():
        set_lora_A(layer, directions[name])
    return merged


def random_directions(layers: Mapping[str, FalqonLayer], refresh_index: int) -> dict[str, torch.Tensor]:
    """New ``A`` per layer at random, orthogonal to its current ``A``, scaled to :func:`a_row_norm`."""
    return {
        name: a_row_norm(layer.config)
        * orthogonal_random_directions(layer.lora_A(), layer.rank, refresh_generator(layer, refresh_index))
        for name, layer in layers.items()
    }
