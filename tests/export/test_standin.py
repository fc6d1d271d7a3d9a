"""Export stand-ins: the FALQON layer's forward in plain torch ops (float32 and float64) and the widened Llama parts."""

from __future__ import annotations

import itertools

import pytest
import reference
import torch
from tiny_models import tiny_llama
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from falqon_lit.config import FalqonConfig, ScaleGranularity
from falqon_lit.export.standin import ActivationMode, _DequantLinear, _WideRMSNorm, _WideRotary
from falqon_lit.layer import FalqonLinear

SCALINGS = list(itertools.product(ScaleGranularity, ScaleGranularity))  # (weight, activation)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(("weight_scaling", "act_scaling"), SCALINGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_standin_computes_the_layers_forward(weight_scaling, act_scaling, seed):
    torch.manual_seed(seed)
    config = FalqonConfig(rank=16, weight_scaling=weight_scaling, act_scaling=act_scaling)
    layer = FalqonLinear.from_linear(nn.Linear(96, 80), config)  # B is zero, as after the export's flush
    x = torch.randn(3, 5, 96) * torch.logspace(-2, 1, 96)  # columns over three decades, as real activations
    want = reference.forward(layer, x.double())  # float64 oracle on the same FP8 bytes
    wide = _DequantLinear(layer, ActivationMode.FP8, torch.float64)(x.double())
    narrow = _DequantLinear(layer, ActivationMode.FP8, torch.float32)(x)
    with torch.no_grad():
        trainer = layer(x)
    # deq(W) is rounded to float32 in the stand-ins (DequantizeLinear's output type): ~6e-8 relative.
    assert wide.dtype == torch.float64 and _rel(wide, want) < 1e-6
    assert narrow.dtype == torch.float32 and _rel(narrow, trainer) < 1e-5
    # Without FP8 activation rounding the output moves by the activation quantization error: a few percent.
    unrounded = _DequantLinear(layer, ActivationMode.FLOAT, torch.float64)(x.double())
    assert _rel(unrounded, want) > 1e-3


def test_wide_rmsnorm_is_huggingfaces_in_the_input_dtype():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    x = torch.randn(2, 7, 64)
    wide = _WideRMSNorm(norm)
    assert torch.equal(wide(x), norm(x))  # float32: the same operations, bit for bit
    got = wide(x.double())
    assert got.dtype == torch.float64 and _rel(got, norm(x.double())) < 1e-6
    exact = norm.weight.double() * x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    assert _rel(got, exact) < 1e-13  # computed in float64, not through float32 as Hugging Face does


def test_wide_rotary_is_huggingfaces_in_the_input_dtype():
    config = tiny_llama().config
    rotary = LlamaRotaryEmbedding(config)
    wide = _WideRotary(rotary)
    position_ids = torch.arange(37)[None].expand(2, -1)
    x = torch.randn(2, 37, 8)
    for got, want in zip(wide(x, position_ids), rotary(x, position_ids), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(wide(x.double(), position_ids), rotary(x.double(), position_ids), strict=True):
        assert got.dtype == torch.float64 and _rel(got, want) < 1e-5
        assert not torch.equal(got, want)  # Hugging Face's are float32 values widened; these are float64's own
