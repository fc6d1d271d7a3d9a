"""Fused Triton proxy merge (CUDA) against the eager merge on the same FP8 bytes."""

from __future__ import annotations

import pytest
import torch
from fp8_devices import requires_cuda_fp8

from falqon_lit import merge_kernel
from falqon_lit.config import ScaleGranularity
from falqon_lit.numerics import E4M3, dequantize, quantize_dynamic
from falqon_lit.proxy import merge_rows, select_rows


def test_merge_kernel_not_used_on_cpu():
    assert not merge_kernel.available(torch.zeros(2, 2, dtype=E4M3))


@pytest.mark.gpu
@requires_cuda_fp8
@pytest.mark.parametrize("granularity", list(ScaleGranularity))
@pytest.mark.parametrize(("out_f", "in_f", "rank"), [(96, 64, 16), (512, 4096, 64), (256, 1000, 16)])
def test_merge_rows_fused_matches_eager_merge(granularity, out_f, in_f, rank):
    torch.manual_seed(torch.seed() % 2**31)
    melded = torch.randn(out_f + rank, in_f, device="cuda") * 0.05
    w_fp8, w_scale = quantize_dynamic(melded, E4M3, granularity)
    w_t = w_fp8.t().contiguous()
    lora_b = torch.randn(out_f, rank, device="cuda") * 0.02
    lora_b[3] = 50.0  # one large row: saturates with a tensor scale
    lora_b[5] = 1e-9  # one tiny row: every update lost to rounding
    rows = torch.unique(torch.cat([select_rows(lora_b, 8), torch.tensor([3, 5], device="cuda")]))
    row_scaled = w_scale.numel() > 1
    w_before, w_scale_before = w_fp8.clone(), w_scale.clone()
    a_hp = dequantize(w_fp8[out_f:], w_scale[out_f:] if row_scaled else w_scale)
    eager = merge_rows(w_fp8[rows], w_scale[rows] if row_scaled else w_scale, lora_b[rows], a_hp, granularity)

    stats = merge_kernel.merge_rows_fused(rows, lora_b, w_fp8, w_t, w_scale, out_f)
    got = w_fp8[rows]
    # Summation order of B·A differs (fp32): a value on a rounding boundary may land one FP8 step away.
    same = got.view(torch.uint8) == eager.rows_fp8.view(torch.uint8)
    assert same.float().mean() > 0.99
    got_hp = dequantize(got, w_scale[rows] if row_scaled else w_scale)
    want_hp = dequantize(eager.rows_fp8, eager.rows_scale)
    # One E4M3 step is 2^(e-3) in scaled units; in real units allow twice that (the scale is not a power of two)
    # plus one subnormal step.
    step = torch.pow(2.0, torch.floor(torch.log2(want_hp.abs().clamp(min=1e-30))) - 3)
    subnormal = float(w_scale.max()) * 2.0**-9
    assert torch.all((got_hp - want_hp).abs() <= 2 * step + subnormal)
    assert torch.equal(w_t[:, rows].t().contiguous().view(torch.uint8), got.view(torch.uint8))  # both layouts
    untouched = torch.ones(out_f + rank, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert torch.equal(w_fp8[untouched].view(torch.uint8), w_before[untouched].view(torch.uint8))
    assert int(stats[0]) == int(eager.saturated)
    # "Lost" = a non-zero update whose dequantized value did not move, judged on the fused result itself (the
    # eager merge can differ where a fresh row scale moved by one ulp).
    old_scale = w_scale_before[rows] if row_scaled else w_scale_before
    old_hp = dequantize(w_before[rows], old_scale)
    new_hp = dequantize(got, w_scale[rows] if row_scaled else w_scale)
    nonzero_update = (lora_b[rows].double() @ a_hp.double()) != 0
    assert int(stats[1]) == int((nonzero_update & (new_hp == old_hp)).sum())
    assert torch.allclose(stats[2], eager.magnitude, rtol=1e-4)
