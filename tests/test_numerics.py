"""FP8 numerics: exact round-trips, saturation, scale rules, SQNR."""

from __future__ import annotations

import pytest
import torch

from falqon_lit.config import GemmRole, ScaleGranularity
from falqon_lit.fp8.numerics import (
    E4M3,
    E5M2,
    amax,
    amax_to_scale,
    dequantize,
    fp8_max,
    hash_bits,
    quantize,
    quantize_dynamic,
    quantize_stochastic,
    saturating_cast,
    sqnr_db,
)
from falqon_lit.fp8.quantizer import Float8Quantizer


def _representable(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random finite FP8 values, built from random bytes (so every one is exactly representable)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype).float()
    return torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("log2_scale", [-7, 0, 5])
def test_quantize_dequantize_exact_for_representable(dtype, log2_scale):
    torch.manual_seed(0)
    scale = torch.tensor([2.0**log2_scale])
    x_hp = _representable(dtype, (64, 32), seed=log2_scale + 10) * scale  # power-of-two scale: still representable
    x_fp8 = quantize(x_hp, scale, dtype)
    assert x_fp8.dtype == dtype
    assert torch.equal(dequantize(x_fp8, scale, torch.float64), x_hp.double())


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_saturates_overflow(dtype):
    x = torch.tensor([1e9, -1e9, 3 * fp8_max(dtype), float(fp8_max(dtype))])
    out = quantize(x, torch.ones(1), dtype).float()
    assert torch.isfinite(out).all()
    assert out.tolist() == [fp8_max(dtype), -fp8_max(dtype), fp8_max(dtype), fp8_max(dtype)]


def test_saturating_cast_clamps_infinities_to_the_finite_range():
    # float8_e4m3fn has no inf; whether a plain cast of an overflow saturates or gives NaN depends on the device.
    out = saturating_cast(torch.tensor([1000.0, float("inf"), -float("inf")]), E4M3).float()
    assert out.tolist() == [448.0, 448.0, -448.0]


@pytest.mark.parametrize("granularity", list(ScaleGranularity))
def test_amax_to_scale_maps_amax_to_fp8_max(granularity):
    torch.manual_seed(1)
    x = torch.randn(8, 40) * torch.logspace(-3, 3, 8).unsqueeze(1)
    scale = amax_to_scale(amax(x, granularity), E4M3)
    expected_shape = (1,) if granularity == ScaleGranularity.TENSOR else (8, 1)
    assert scale.shape == expected_shape and scale.dtype == torch.float32
    x_fp8 = quantize(x, scale, E4M3).float()
    # Each scaling group's largest magnitude lands on (or one rounding step from) the format's max.
    group_max = x_fp8.abs().amax() if granularity == ScaleGranularity.TENSOR else x_fp8.abs().amax(dim=1)
    assert torch.all(group_max >= 416) and torch.all(group_max <= 448)


def test_quantize_dynamic_zero_tensor_has_finite_scale():
    x_fp8, scale = quantize_dynamic(torch.zeros(4, 16), E4M3, ScaleGranularity.ROW)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(x_fp8.float(), torch.zeros(4, 16))


def test_quantize_dynamic_row_scales_are_independent():
    torch.manual_seed(2)
    x = torch.randn(6, 32)
    x_fp8, scale = quantize_dynamic(x, E4M3, ScaleGranularity.ROW)
    x_big = x.clone()
    x_big[0] *= 1000  # changing one row must not touch the other rows' bytes
    big_fp8, big_scale = quantize_dynamic(x_big, E4M3, ScaleGranularity.ROW)
    assert torch.equal(big_fp8[1:].view(torch.uint8), x_fp8[1:].view(torch.uint8))
    assert torch.equal(big_scale[1:], scale[1:])


@pytest.mark.parametrize(
    ("role", "dtype"), [(GemmRole.INPUT, E4M3), (GemmRole.WEIGHT, E4M3), (GemmRole.GRAD_OUTPUT, E5M2)]
)
def test_quantizer_role_picks_format(role, dtype):
    q = Float8Quantizer(role, ScaleGranularity.TENSOR)(torch.randn(4, 16))
    assert q.data.dtype == dtype and q.scale.shape == (1,)


def test_quantizer_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        Float8Quantizer(GemmRole.INPUT, ScaleGranularity.TENSOR)(torch.randn(2, 3, 16))


def test_fp8_max_rejects_non_fp8():
    with pytest.raises(TypeError, match="FP8 dtype"):
        fp8_max(torch.bfloat16)


def test_sqnr_of_e4m3_roundtrip_matches_format_precision():
    torch.manual_seed(3)
    x = torch.randn(256, 256)
    x_fp8, scale = quantize_dynamic(x, E4M3, ScaleGranularity.ROW)
    # 3 mantissa bits give ~ 6.02 * 4 + 1.76 - a few dB of range loss; measured ~31 dB for Gaussian data.
    db = sqnr_db(x, dequantize(x_fp8, scale))
    print(f"E4M3 per-row SQNR on N(0,1): {db:.1f} dB")
    assert 28 < db < 35
    assert sqnr_db(x, x) > 200


def _e4m3_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E4M3 values just below and above each ``x`` (float64; equal when ``x`` is representable)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = grid[torch.isfinite(grid)].unique()  # sorted, -448 .. 448
    upper = torch.searchsorted(grid, x.double()).clamp(max=grid.numel() - 1)
    lower = torch.searchsorted(grid, x.double(), right=True).sub(1).clamp(min=0)
    return grid[lower], grid[upper]


def test_quantize_stochastic_picks_a_neighbour_and_is_unbiased():
    torch.manual_seed(torch.seed() % 2**31)  # fresh values every run
    x = (torch.randn(4000) * torch.logspace(-4, 2.4, 4000)).clamp(-448, 448)  # subnormal through E4M3 max
    lower, upper = _e4m3_neighbours(x)
    draws = 400
    total = torch.zeros_like(x, dtype=torch.float64)
    for draw in range(draws):
        bits = hash_bits(torch.arange(x.numel()) + draw * 0x632BE5AB)
        got = quantize_stochastic(x, torch.ones(1), bits).double()
        assert torch.all((got == lower) | (got == upper))
        total += got
    spacing = (upper - lower).clamp(min=2.0**-9)
    # Mean of Bernoulli draws: standard error ≤ spacing / (2·sqrt(400)) = spacing / 40; allow 6 standard errors.
    assert torch.all((total / draws - x.double()).abs() <= 0.15 * spacing)
    nearest = x.to(torch.float8_e4m3fn).double()
    assert float((nearest - x).abs().max()) <= float((0.5 * spacing).max())  # the grid helper is right


def test_quantize_stochastic_saturates_and_keeps_representable_values():
    x = torch.tensor([500.0, -1e9, 448.0, -448.0, 0.0, 2.0**-9, 1.5, -0.25])
    bits = hash_bits(torch.arange(x.numel()))
    got = quantize_stochastic(x, torch.ones(1), bits).double()
    assert got.tolist() == [448.0, -448.0, 448.0, -448.0, 0.0, 2.0**-9, 1.5, -0.25]


def test_hash_bits_are_32_bit_and_spread():
    bits = hash_bits(torch.arange(1 << 16))
    assert int(bits.min()) >= 0 and int(bits.max()) < 2**32
    assert bits.unique().numel() == bits.numel()  # a bijection on 32-bit keys
    assert abs(float(bits.double().mean()) / 2**32 - 0.5) < 0.01
