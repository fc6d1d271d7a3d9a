"""Row-wise proxy update: exactly the chosen rows change, in both layouts, by B·A in real units."""

from __future__ import annotations

import pytest
import reference
import torch
from fp8_devices import DEVICES
from torch import nn

from falqon_lit.config import BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity
from falqon_lit.fp8.numerics import E4M3, quantize_dynamic
from falqon_lit.layer import FalqonLinear
from falqon_lit.proxy import merge_bits, merge_rows, row_scores, select_rows, select_rows_batched


def _layer(device: str, weight_scaling: ScaleGranularity, b_policy: BPolicy, b_std: float = 0.02) -> FalqonLinear:
    torch.manual_seed(torch.seed() % 2**31)  # fresh values every run
    # nearest merges: what reference.merge computes (stochastic merges have their own tests below)
    config = FalqonConfig(
        rank=16, weight_scaling=weight_scaling, b_policy=b_policy, merge_rounding=Rounding.NEAREST, transpose_cache=True
    )  # with the transposed copy: merges must update both layouts
    layer = FalqonLinear.from_linear(nn.Linear(64, 96, device=device), config)
    with torch.no_grad():
        layer.lora_B.normal_(0, b_std)
    return layer


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _e4m3_half_step(value: torch.Tensor) -> torch.Tensor:
    """Half the spacing of E4M3 values around |value| (normal: 2^(e-3), subnormal: 2^-9)."""
    exponent = torch.floor(torch.log2(value.abs().clamp(min=2.0**-6)))
    return 0.5 * torch.pow(2.0, exponent - 3)


def test_select_rows_picks_largest_l1_rows():
    b = torch.zeros(10, 4)
    b[3] = torch.tensor([1.0, -1.0, 0.0, 0.0])  # L1 2
    b[7] = torch.tensor([0.0, 0.0, -3.0, 0.0])  # L1 3
    b[1] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # L1 0.5
    assert row_scores(b)[7] == 3
    assert select_rows(b, 2).tolist() == [3, 7]
    assert select_rows(b, 50).numel() == 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 300])
def test_select_rows_batched_equals_per_layer_selection(device, k):
    torch.manual_seed(torch.seed() % 2**31)
    bs = [torch.randn(96, 16, device=device) for _ in range(5)]
    got = select_rows_batched(bs, k)
    assert got.shape == (5, min(k, 96))
    for b, rows in zip(bs, got, strict=True):
        assert torch.equal(rows, select_rows(b, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_proxy_update_changes_only_chosen_rows(device, weight_scaling):
    layer = _layer(device, weight_scaling, BPolicy.ZERO)
    before_fp8, before_scale = layer.weight_fp8.clone(), layer.weight_scale.clone()
    expected_rows = select_rows(layer.lora_B, 6)
    rows = layer.proxy_update(6)
    assert torch.equal(rows, expected_rows)
    changed = (_bytes(layer.weight_fp8) != _bytes(before_fp8)).any(dim=1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(rows.tolist())  # a merged row may round back to itself, nothing else moves
    keep = torch.ones(layer.weight_fp8.shape[0], dtype=torch.bool, device=device)
    keep[rows] = False
    assert torch.equal(_bytes(layer.weight_fp8)[keep], _bytes(before_fp8)[keep])  # every other byte identical
    if weight_scaling == ScaleGranularity.ROW:
        assert torch.equal(layer.weight_scale[keep], before_scale[keep])
    else:
        assert torch.equal(layer.weight_scale, before_scale)
    assert torch.equal(_bytes(layer.weight_t_fp8), _bytes(layer.weight_fp8.t().contiguous()))  # both layouts
    assert int(layer.merge_rows) == 6 and int(layer.merge_calls) == 1


def test_merge_rows_row_result_does_not_depend_on_the_rows_merged_with_it():
    # A row-sharded rank merges only its own share of the global top-k, so a row's merge must not depend on which
    # rows merge with it. A float32 GEMM picks its kernel (and summation order) by shape: a row alone (GEMV) and the
    # same row among 32 round differently; a fresh row scale (amax / 448) shows any last-bit difference.
    torch.manual_seed(torch.seed() % 2**31)
    k, rank, width = 32, 16, 512
    w_fp8, w_scale = quantize_dynamic(torch.randn(k, width) * 1e-3, E4M3, ScaleGranularity.ROW)  # B·A dominates
    lora_B, lora_A = torch.randn(k, rank), torch.randn(rank, width)
    together = merge_rows(w_fp8, w_scale, lora_B, lora_A, ScaleGranularity.ROW, None)
    for i in range(k):
        alone = merge_rows(w_fp8[i : i + 1], w_scale[i : i + 1], lora_B[i : i + 1], lora_A, ScaleGranularity.ROW, None)
        assert torch.equal(alone.rows_scale, together.rows_scale[i : i + 1]), i
        assert torch.equal(_bytes(alone.rows_fp8), _bytes(together.rows_fp8[i : i + 1])), i


@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_proxy_update_merges_b_times_a_in_real_units(weight_scaling):
    layer = _layer("cpu", weight_scaling, BPolicy.ZERO)
    snapshot = FalqonLinear.from_linear(nn.Linear(64, 96), layer.config)
    snapshot.load_state_dict(layer.state_dict())
    rows = layer.proxy_update(8)
    ref_fp8, ref_scale = reference.merge(snapshot, rows)
    got = layer.weight_fp8[rows].float() * (layer.weight_scale[rows] if layer.weight_scale.numel() > 1 else 1)
    want = ref_fp8.float() * (ref_scale if ref_scale.numel() > 1 else 1)
    # The layer sums in float32, the reference in float64: a value sitting on a rounding boundary may land one
    # FP8 step apart; all others are identical bytes.
    same = _bytes(layer.weight_fp8[rows]) == _bytes(ref_fp8)
    assert same.float().mean() > 0.99
    assert torch.all((got - want).abs() <= 2 * _e4m3_half_step(want) + 1e-12)


@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_proxy_update_b_policy_zero_clears_all_of_b(weight_scaling):
    layer = _layer("cpu", weight_scaling, BPolicy.ZERO)
    layer.proxy_update(4)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.b_is_zero()


@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_proxy_update_b_policy_keep_clears_only_merged_rows_and_stays_exact(weight_scaling):
    layer = _layer("cpu", weight_scaling, BPolicy.KEEP)
    b_before = layer.lora_B.detach().clone()
    rows = layer.proxy_update(4)
    zeroed = (layer.lora_B == 0).all(dim=1).nonzero().squeeze(1)
    assert torch.equal(zeroed, rows)
    others = torch.ones(96, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(layer.lora_B[others], b_before[others])
    assert not layer.b_is_zero()
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x).double(), reference.forward(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
@pytest.mark.parametrize("b_policy", list(BPolicy))
def test_flush_makes_dense_weight_equal_deq_w_plus_ba(weight_scaling, b_policy):
    layer = _layer("cpu", weight_scaling, b_policy)
    if b_policy == BPolicy.KEEP:
        layer.proxy_update(10)  # leave a residual in the other rows
    dense_before = layer.to_dense(torch.float64)
    merged = layer.flush()
    assert merged == 96 - (10 if b_policy == BPolicy.KEEP else 0)
    assert torch.count_nonzero(layer.lora_B) == 0
    after = layer.dequantized_weight(torch.float64)
    # Every element is the FP8 rounding of deq(W) + B A: within half an FP8 step (in real units), or clamped.
    scale = layer.weight_scale_rows.double()
    tolerance = _e4m3_half_step(dense_before / scale) * scale * (1 + 1e-6) + 1e-12
    saturated = (dense_before / scale).abs() > torch.finfo(E4M3).max
    assert torch.all(((after - dense_before).abs() <= tolerance) | saturated)
    assert layer.flush() == 0  # idempotent: nothing left to merge


@pytest.mark.parametrize("device", DEVICES)  # CUDA: the fused Triton merge; CPU: the eager one
@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_stochastic_merges_apply_small_updates_on_average(device, weight_scaling):
    """Twenty updates of at most 10% of an FP8 step: nearest rounding loses them all, stochastic applies their sum."""
    torch.manual_seed(torch.seed() % 2**31)
    base = nn.Linear(64, 96, device=device)
    with torch.no_grad():  # every weight in one binade (one FP8 step) and below the range's edge
        base.weight.copy_(torch.sign(torch.randn(96, 64)) * torch.empty(96, 64).uniform_(0.6, 0.85))
        base.weight[:, 0] = 1.0  # each row's amax: scaled values in [269, 381], spacing 32 scale units
    delta_b = torch.randn(96, 16, dtype=torch.float64, device=device)
    gains = {}
    for rounding in Rounding:
        # SVD init: column 0 is exact in FP8, so A's column 0 is ~0 and no update moves a row's amax (its scale).
        config = FalqonConfig(
            rank=16, weight_scaling=weight_scaling, b_policy=BPolicy.KEEP, merge_rounding=rounding, init=InitMethod.SVD
        )
        layer = FalqonLinear.from_linear(base, config, name="probe")
        a = layer.lora_A(torch.float64)
        step = 32 * layer.weight_scale_rows.double()
        update = delta_b / (delta_b @ a).abs().amax(dim=1, keepdim=True) * step * 0.1  # |δB·A| ≤ 10% of a step
        w_before = layer.dequantized_weight(torch.float64)
        for _ in range(20):
            with torch.no_grad():
                layer.lora_B += update.float()
            layer.proxy_update(96)  # all rows, every time
        wanted = 20 * (update @ a)
        moved = layer.dequantized_weight(torch.float64) - w_before
        gains[rounding] = float((moved * wanted).sum() / (wanted * wanted).sum())  # 1 = arrived on average
    assert gains[Rounding.NEAREST] == 0.0  # each update was below half a step: all lost
    assert 0.9 < gains[Rounding.STOCHASTIC] < 1.1, gains


def test_stochastic_merge_bits_depend_on_layer_row_and_merge_count():
    rows = torch.tensor([3, 5])
    first = merge_bits(rows, 32, torch.tensor(1), salt=7)
    assert torch.equal(first, merge_bits(rows, 32, torch.tensor(1), salt=7))  # deterministic (ranks agree)
    assert torch.equal(first[1], merge_bits(torch.tensor([5]), 32, torch.tensor(1), salt=7)[0])  # per row
    for other in (merge_bits(rows, 32, torch.tensor(2), salt=7), merge_bits(rows, 32, torch.tensor(1), salt=8)):
        assert (first != other).float().mean() > 0.99


def test_proxy_update_counts_saturation_and_updates_lost_to_rounding():
    torch.manual_seed(21)
    # tensor scale: clamps on merge; nearest rounding: loses what is below half an FP8 step
    config = FalqonConfig(rank=16, weight_scaling=ScaleGranularity.TENSOR, merge_rounding=Rounding.NEAREST)
    layer = FalqonLinear.from_linear(nn.Linear(64, 96), config)
    with torch.no_grad():
        layer.lora_B.zero_()
        layer.lora_B[0] = 1e6  # pushes row 0 far past the FP8 range of the kept tensor scale
        layer.lora_B[1] = 1e-12  # far below half an FP8 step: every non-zero update of row 1 is lost
    layer.proxy_update(2)
    assert int(layer.merge_saturated) == 1
    nonzero_updates_row1 = int((layer.lora_A().abs().sum(dim=0) > 0).sum())
    assert int(layer.merge_lost) >= nonzero_updates_row1 > 0


def test_proxy_update_rejects_non_positive_k():
    layer = _layer("cpu", ScaleGranularity.TENSOR, BPolicy.ZERO)
    with pytest.raises(ValueError, match="k > 0"):
        layer.proxy_update(0)


def test_optimizer_step_on_b_turns_the_residual_back_on():
    layer = _layer("cpu", ScaleGranularity.TENSOR, BPolicy.ZERO)
    layer.proxy_update(4)
    x = torch.randn(4, 64)
    y_zero = layer(x)
    opt = torch.optim.SGD([layer.lora_B], lr=1.0)
    layer(x).sum().backward()
    opt.step()  # in-place write: B is no longer known to be zero
    assert not layer.b_is_zero()
    assert torch.allclose(layer(x).double(), reference.forward(layer, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer(x), y_zero)
