"""ProxyUpdater: the CUDA-graph replay of the whole-model proxy update equals the eager per-layer loop bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from fp8_devices import DEVICES
from torch import nn

from falqon_lit.config import BPolicy, FalqonConfig, Rounding, ScaleGranularity
from falqon_lit.layer import FalqonLinear
from falqon_lit.proxy_updater import ProxyUpdater

_STATE = ("weight_fp8", "weight_t_fp8", "weight_scale", "lora_B", "merge_rows", "merge_saturated", "merge_lost")


def _layers(
    device: str,
    weight_scaling: ScaleGranularity,
    b_policy: BPolicy,
    rounding: Rounding = Rounding.NEAREST,
    transpose_cache: bool = True,
) -> list[FalqonLinear]:
    torch.manual_seed(torch.seed() % 2**31)
    settings = {"weight_scaling": weight_scaling, "b_policy": b_policy, "merge_rounding": rounding}
    cfg = FalqonConfig(rank=16, transpose_cache=transpose_cache, **settings)
    return [
        FalqonLinear.from_linear(nn.Linear(64, n, device=device), cfg, f"l{i}") for i, n in enumerate((96, 96, 128))
    ]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:  # no transposed copy
        return a is b
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
@pytest.mark.parametrize("b_policy", list(BPolicy))
@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("transpose_cache", [False, True])
def test_proxy_updater_matches_eager_loop(device, weight_scaling, b_policy, rounding, transpose_cache):
    eager = _layers(device, weight_scaling, b_policy, rounding, transpose_cache)
    graphed = copy.deepcopy(eager)
    updater = ProxyUpdater(graphed)
    x = torch.randn(8, 64, device=device)
    for step in range(5):  # eager warm-up, capture + replay, then replays
        for a, b in zip(eager, graphed, strict=True):
            with torch.no_grad():
                delta = torch.randn_like(a.lora_B) * 0.05
                a.lora_B.add_(delta)  # in-place, like an optimizer step
                b.lora_B.add_(delta)
        k = 4 if step % 2 else 6  # two values of k: two graphs
        for layer in eager:
            layer.proxy_update(k)
        updater(k)
        for a, b in zip(eager, graphed, strict=True):
            for name in _STATE:
                assert _same(getattr(a, name), getattr(b, name)), (step, name)
            assert a.b_is_zero() == b.b_is_zero()
            assert torch.equal(a(x), b(x))


def _same_random_b(layers: list[FalqonLinear], copies: list[FalqonLinear]) -> None:
    with torch.no_grad():
        for a, b in zip(layers, copies, strict=True):
            a.lora_B.normal_()
            b.lora_B.copy_(a.lora_B)


@pytest.mark.parametrize("device", DEVICES)
def test_proxy_updater_recaptures_after_buffers_move(device):
    layers = _layers(device, ScaleGranularity.ROW, BPolicy.ZERO)
    reference = copy.deepcopy(layers)
    updater = ProxyUpdater(layers)
    for _ in range(3):
        _same_random_b(layers, reference)
        updater(4)
        for layer in reference:
            layer.proxy_update(4)
    for layer in layers:  # a checkpoint load rebuilds the transposed copy: new storage
        layer.load_state_dict(layer.state_dict())
    _same_random_b(layers, reference)
    updater(4)
    for layer in reference:
        layer.proxy_update(4)
    for a, b in zip(layers, reference, strict=True):
        assert _same(a.weight_t_fp8, b.weight_t_fp8) and _same(a.weight_fp8, b.weight_fp8)


def test_proxy_updater_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one FalqonLinear"):
        ProxyUpdater([])
    with pytest.raises(ValueError, match="k > 0"):
        ProxyUpdater(_layers("cpu", ScaleGranularity.TENSOR, BPolicy.ZERO))(0)
