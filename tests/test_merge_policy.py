"""Merge threshold of the proxy update (``falqon_lit.merge_policy``) against a float64 table of E4M3 values."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
from fp8_devices import DEVICES
from torch import nn

from falqon_lit.config import BPolicy, FalqonConfig, Rounding, ScaleGranularity
from falqon_lit.fp8.numerics import E4M3
from falqon_lit.layer import FalqonLinear
from falqon_lit.merge_policy import e4m3_step, steps_moved
from falqon_lit.proxy_updater import ProxyUpdater


def _e4m3_table() -> torch.Tensor:
    """Every finite non-negative E4M3 value, ascending, in float64 (from the bytes, independent of the code)."""
    values = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8).view(E4M3).to(torch.float64)
    return values[torch.isfinite(values) & (values >= 0)].unique().sort().values


def _reference_step(values_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gap from each |value| to the next larger E4M3 value (the gap below at the maximum), float64, real units."""
    table = _e4m3_table()
    gaps = torch.cat([table[1:] - table[:-1], (table[-1:] - table[-2:-1])])
    index = torch.searchsorted(table, values_fp8.cpu().to(torch.float64).abs())
    return (gaps[index] * scale.cpu().double()).to(values_fp8.device)


def test_e4m3_step_matches_the_float64_table() -> None:
    table = _e4m3_table()
    values = torch.stack([table, -table]).to(E4M3)  # both signs
    scale = torch.tensor([[0.37], [3e-4]])
    assert torch.equal(e4m3_step(values, scale).double(), _reference_step(values, scale).float().double())


def _layer(granularity: ScaleGranularity, threshold: float, device: str = "cpu") -> FalqonLinear:
    torch.manual_seed(torch.seed() % 2**31)
    config = FalqonConfig(
        rank=16,
        weight_scaling=granularity,
        b_policy=BPolicy.KEEP,
        merge_rounding=Rounding.NEAREST,
        merge_threshold=threshold,
        transpose_cache=True,
    )
    return FalqonLinear.from_linear(nn.Linear(64, 96, device=device), config)


@pytest.mark.parametrize("device", DEVICES)  # CUDA: the Triton merge kernel
@pytest.mark.parametrize("granularity", list(ScaleGranularity))
def test_merge_threshold_merges_large_rows_and_keeps_small_ones_in_B(
    granularity: ScaleGranularity, device: str
) -> None:
    layer = _layer(granularity, threshold=1.0, device=device)
    with torch.no_grad():  # row sizes spread over orders of magnitude around one FP8 step
        layer.lora_B.copy_(torch.randn(96, 16) * torch.logspace(-4, 0, 96).unsqueeze(1))
    snapshot = FalqonLinear.from_linear(nn.Linear(64, 96, device=device), layer.config)
    snapshot.load_state_dict(layer.state_dict())
    b_before = layer.lora_B.detach().clone()
    rows = torch.arange(96, device=device)
    # float64 reference of the rule: mean |B[i]·A| / (E4M3 step at each weight) >= 1
    w_fp8, scale = layer.weight_fp8[:96].clone(), layer.weight_scale_rows.clone()
    delta = b_before.double() @ reference.melded_weight(layer)[1]
    moved = (delta.abs() / _reference_step(w_fp8, scale)).mean(dim=1)
    # float32 vs float64 products: a row within rounding of the threshold could go either way; none is that close
    assert ((moved - 1.0).abs() > 1e-4).all()
    assert torch.allclose(steps_moved(w_fp8, scale, delta.float()).double(), moved, rtol=1e-5)
    merge = moved >= 1.0
    assert 10 < int(merge.sum()) < 86  # both kinds present

    layer.proxy_update(96, rows)
    held = ~merge
    assert torch.equal(layer.lora_B[held], b_before[held]) and not layer.lora_B[merge].any()
    assert torch.equal(layer.weight_fp8[:96][held].view(torch.uint8), w_fp8[held].view(torch.uint8))
    ref_bytes, _ = reference.merge(snapshot, rows[merge])
    same = layer.weight_fp8[:96][merge].view(torch.uint8) == ref_bytes.view(torch.uint8)
    assert same.float().mean() > 0.99  # float32 vs float64 sums: a boundary value may round one step apart
    assert torch.equal(layer.weight_t_fp8.view(torch.uint8), layer.weight_fp8.t().contiguous().view(torch.uint8))


def test_merge_threshold_zero_merges_every_chosen_row() -> None:
    layer = _layer(ScaleGranularity.ROW, threshold=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-5)
    rows = torch.arange(0, 96, 3)
    layer.proxy_update(rows.numel(), rows)
    assert not layer.lora_B[rows].any() and layer.lora_B.any()


def test_merge_threshold_config_is_validated() -> None:
    with pytest.raises(ValueError, match="needs b_policy 'keep'"):
        FalqonConfig(merge_threshold=1.0, b_policy=BPolicy.ZERO)
    with pytest.raises(ValueError, match="merge_threshold must be >= 0"):
        FalqonConfig(merge_threshold=-1.0)
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        FalqonConfig(lora_alpha=0)


@pytest.mark.parametrize("device", DEVICES)  # CUDA: the threshold runs inside the captured graph
def test_merge_threshold_in_the_whole_model_update_equals_the_eager_loop(device: str) -> None:
    eager = [_layer(ScaleGranularity.ROW, threshold=0.5, device=device) for _ in range(3)]
    graphed = copy.deepcopy(eager)
    updater = ProxyUpdater(graphed)
    initial = [layer.weight_fp8.view(torch.uint8).clone() for layer in eager]
    held_first, merged_last = [], []
    for step in range(5):  # eager warm-up, capture + replay, then replays
        for a, b in zip(eager, graphed, strict=True):
            with torch.no_grad():
                delta = torch.randn_like(a.lora_B) * 10.0 ** (step - 4)  # rows cross the threshold over the steps
                a.lora_B.add_(delta)
                b.lora_B.add_(delta)
        before = [layer.weight_fp8.view(torch.uint8).clone() for layer in eager]
        for layer in eager:
            layer.proxy_update(8)
        updater(8)
        if step == 0:  # updates far below one FP8 step: every chosen row is held
            held_first = [torch.equal(a.weight_fp8.view(torch.uint8), w) for a, w in zip(eager, initial, strict=True)]
        if step == 4:  # updates far above: chosen rows merge
            merged_last = [
                not torch.equal(a.weight_fp8.view(torch.uint8), w) for a, w in zip(eager, before, strict=True)
            ]
        for a, b in zip(eager, graphed, strict=True):
            assert torch.equal(a.lora_B, b.lora_B), step
            assert torch.equal(a.weight_fp8.view(torch.uint8), b.weight_fp8.view(torch.uint8)), step
            assert torch.equal(a.weight_scale, b.weight_scale), step
    assert [int(layer.merge_calls) for layer in eager] == [5] * 3
    assert held_first == [True] * 3 and merged_last == [True] * 3
