"""Fused Triton proxy merge (CUDA) against the eager merge on the same FP8 bytes."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from fp8_devices import requires_cuda_fp8

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8 import triton_merge
from falqon_lit.fp8.numerics import E4M3, dequantize, quantize_dynamic
from falqon_lit.fp8.triton_merge import FUSED_GRANULARITIES
from falqon_lit.proxy import MergeResult, merge_bits, merge_rows, select_rows


class _Layer(NamedTuple):
    """The buffers of one layer that a merge touches, plus the rows it merges."""

    w_fp8: torch.Tensor
    w_t: torch.Tensor
    w_scale: torch.Tensor
    lora_b: torch.Tensor
    rows: torch.Tensor
    out_f: int

    def clone(self) -> _Layer:
        return _Layer(*(t.clone() if isinstance(t, torch.Tensor) else t for t in self))


def _random_layer(granularity: ScaleGranularity, out_f: int, in_f: int, rank: int, top_k: int = 8) -> _Layer:
    """Fresh random ``[W; A]`` and ``B`` (a new seed each run), with a saturating, a tiny and a zero row of ``B``.

    Merges the ``top_k`` largest rows of ``B`` and the three special ones.
    """
    torch.manual_seed(torch.seed() % 2**31)
    melded = torch.randn(out_f + rank, in_f, device="cuda") * 0.05
    w_fp8, w_scale = quantize_dynamic(melded, E4M3, granularity)
    lora_b = torch.randn(out_f, rank, device="cuda") * 0.02
    # Scaled random rows, not constant ones: a constant row's update c·ΣA[:, j] cancels exactly when a column of A's
    # bytes sums to zero, and whether a float32 sum then gives exactly zero (an update, or none) depends on its order.
    lora_b[3] *= 2500  # one large row (entries ~50): saturates with a tensor scale
    lora_b[5] *= 5e-8  # one tiny row (entries ~1e-9): every update lost to nearest rounding
    lora_b[7] = 0.0  # one zero row: keeps its bytes and scale
    rows = torch.unique(torch.cat([select_rows(lora_b, top_k), torch.tensor([3, 5, 7], device="cuda")]))
    return _Layer(w_fp8, w_fp8.t().contiguous(), w_scale, lora_b, rows, out_f)


def _eager_merge(layer: _Layer, granularity: ScaleGranularity, bits: torch.Tensor | None = None) -> MergeResult:
    row_scaled = layer.w_scale.numel() > 1
    a_hp = dequantize(layer.w_fp8[layer.out_f :], layer.w_scale[layer.out_f :] if row_scaled else layer.w_scale)
    rows_scale = layer.w_scale[layer.rows] if row_scaled else layer.w_scale
    return merge_rows(layer.w_fp8[layer.rows], rows_scale, layer.lora_b[layer.rows], a_hp, granularity, bits)


def _fused_merge(layer: _Layer, **rounding: object) -> torch.Tensor:
    """Run the fused merge in place on ``layer``'s buffers; returns its statistics."""
    return triton_merge.merge_rows_fused(
        layer.rows, layer.lora_b, layer.w_fp8, layer.w_t, layer.w_scale, layer.out_f, **rounding
    )


def _merge_both_ways(
    before: _Layer, granularity: ScaleGranularity, merge_count: torch.Tensor | None = None, salt: int = 0
) -> _Layer:
    """Merge a copy of ``before`` with the fused kernel, check it against the eager merge, and return it."""
    bits = None if merge_count is None else merge_bits(before.rows, before.w_fp8.shape[1], merge_count, salt)
    eager = _eager_merge(before, granularity, bits)
    after = before.clone()
    stats = _fused_merge(after, merge_count=merge_count, salt=salt)
    _assert_fused_matches_eager(before, after, stats, eager)
    return after


def _assert_fused_matches_eager(before: _Layer, after: _Layer, stats: torch.Tensor, eager: MergeResult) -> None:
    """The fused merge (``before`` → ``after``) did what the eager merge did, up to the order of B·A's sums."""
    rows, row_scaled = before.rows, before.w_scale.numel() > 1
    got, got_scale = after.w_fp8[rows], after.w_scale[rows] if row_scaled else after.w_scale
    # Summation order of B·A differs (fp32): a value on a rounding boundary may land one FP8 step away.
    same = got.view(torch.uint8) == eager.rows_fp8.view(torch.uint8)
    assert same.float().mean() > 0.99
    got_hp = dequantize(got, got_scale)
    want_hp = dequantize(eager.rows_fp8, eager.rows_scale)
    # One E4M3 step is 2^(e-3) in scaled units; in real units allow twice that (the scale is not a power of two)
    # plus one subnormal step.
    step = torch.pow(2.0, torch.floor(torch.log2(want_hp.abs().clamp(min=1e-30))) - 3)
    subnormal = float(after.w_scale.max()) * 2.0**-9
    assert torch.all((got_hp - want_hp).abs() <= 2 * step + subnormal)
    assert torch.equal(after.w_t[:, rows].t().contiguous().view(torch.uint8), got.view(torch.uint8))  # both layouts
    untouched = torch.ones(before.w_fp8.shape[0], dtype=torch.bool, device=rows.device)
    untouched[rows] = False
    assert torch.equal(after.w_fp8[untouched].view(torch.uint8), before.w_fp8[untouched].view(torch.uint8))
    assert torch.equal(after.w_t[:, untouched].view(torch.uint8), before.w_t[:, untouched].view(torch.uint8))
    assert int(stats[0]) == int(eager.saturated)
    # "Lost" = a non-zero update whose dequantized value did not move, judged on the fused result itself (the
    # eager merge can differ where a fresh row scale moved by one ulp).
    old_hp = dequantize(before.w_fp8[rows], before.w_scale[rows] if row_scaled else before.w_scale)
    a_hp = dequantize(before.w_fp8[before.out_f :], before.w_scale[before.out_f :] if row_scaled else before.w_scale)
    nonzero_update = (before.lora_b[rows].double() @ a_hp.double()) != 0
    assert int(stats[1]) == int((nonzero_update & (got_hp == old_hp)).sum())
    assert torch.allclose(stats[2], eager.magnitude, rtol=1e-4)


def test_triton_merge_not_used_on_cpu():
    assert not triton_merge.available(torch.zeros(2, 2, dtype=E4M3), ScaleGranularity.ROW)


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", FUSED_GRANULARITIES)  # block scales run eager
@pytest.mark.parametrize(("out_f", "in_f", "rank"), [(96, 64, 16), (512, 4096, 64), (256, 1000, 16)])
def test_merge_rows_fused_matches_eager_merge(granularity, out_f, in_f, rank):
    """Round to nearest (no merge counter given)."""
    _merge_both_ways(_random_layer(granularity, out_f, in_f, rank), granularity)


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", FUSED_GRANULARITIES)  # block scales run eager
def test_merge_rows_fused_stochastic_matches_eager_merge(granularity):
    """Stochastic rounding: the bits of ``merge_bits`` (count read on device), the rule of ``quantize_stochastic``."""
    out_f, in_f, rank = 256, 1000, 16
    salt = 0xDEADBEEF  # above 2³¹: the salt's product with the hash constant leaves int32
    count = torch.tensor(3, device="cuda")
    before = _random_layer(granularity, out_f, in_f, rank)
    after = _merge_both_ways(before, granularity, merge_count=count, salt=salt)

    again = before.clone()
    _fused_merge(again, merge_count=count, salt=salt)
    assert torch.equal(again.w_fp8.view(torch.uint8), after.w_fp8.view(torch.uint8))  # deterministic
    count.add_(1)  # in place, as the layer's counter buffer: the kernel reads the new value
    other = before.clone()
    _fused_merge(other, merge_count=count, salt=salt)
    assert not torch.equal(other.w_fp8.view(torch.uint8), after.w_fp8.view(torch.uint8))  # fresh bits


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", FUSED_GRANULARITIES)  # block scales run eager
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize(("out_f", "in_f", "rank", "top_k"), [(300, 200, 256, 70), (64, 4100, 32, 64)])
def test_merge_rows_fused_tile_edges(granularity, stochastic, out_f, in_f, rank, top_k):
    """Tile edges: a partial last block of rows (72 rows), all rows of W, rank 256 (chunked), a partial column block."""
    count = torch.tensor(5, device="cuda") if stochastic else None
    _merge_both_ways(_random_layer(granularity, out_f, in_f, rank, top_k), granularity, merge_count=count, salt=11)


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", FUSED_GRANULARITIES)  # block scales run eager
def test_merge_rows_fused_single_row(granularity):
    """A block of rows holding one merged row."""
    before = _random_layer(granularity, 96, 64, 16)
    _merge_both_ways(before._replace(rows=before.rows[-1:]), granularity)


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", FUSED_GRANULARITIES)  # block scales run eager
def test_merge_rows_fused_without_transposed_copy(granularity):
    """A layer with ``transpose_cache=False`` passes no ``weight_t_fp8``: the same merge, into one layout."""
    before = _random_layer(granularity, 256, 1000, 16)
    cached = _merge_both_ways(before, granularity)
    lean = before.clone()._replace(w_t=None)
    _fused_merge(lean)
    assert torch.equal(lean.w_fp8.view(torch.uint8), cached.w_fp8.view(torch.uint8))
    assert torch.equal(lean.w_scale, cached.w_scale)


@pytest.mark.gpu
@requires_cuda_fp8
def test_merge_rows_fused_counts_saturation_at_the_fp8_max_as_eager():
    """Rows whose update is zero (row 0) or far below an ulp (row 1) at a ±448 byte have ``amax / s`` within an ulp
    of 448, so "saturated" hinges on the last bit of ``448·s`` and of the division: the fused merge must round both
    as torch does (no FMA, IEEE division) for every tensor scale. The flake of tile_edges[64-4100-32-64-*-tensor]."""
    torch.manual_seed(0)
    out_f, in_f, rank = 32, 64, 16
    for scale in (torch.rand(256) * 1e-2 + 1e-4).tolist():  # many mantissas of s
        w_hp = (torch.randn(out_f + rank, in_f, device="cuda") * 100).clamp(-440, 440)
        w_hp[0, 5], w_hp[1, 9] = 448.0, -448.0
        w_fp8 = w_hp.to(E4M3)
        lora_b = torch.randn(out_f, rank, device="cuda") * 1e-3
        lora_b[0] = 0.0
        lora_b[1] *= 1e-9
        rows = torch.tensor([0, 1, 2], device="cuda")
        layer = _Layer(w_fp8, w_fp8.t().contiguous(), torch.tensor([scale], device="cuda"), lora_b, rows, out_f)
        eager = _eager_merge(layer, ScaleGranularity.TENSOR)
        stats = _fused_merge(layer.clone())
        assert int(stats[0]) == int(eager.saturated), f"tensor scale {scale!r}"
