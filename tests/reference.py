"""Float64 plain-matmul versions of FALQON's algorithms, on the same FP8 bytes the layer stores and produces.

Quantization itself uses ``falqon_lit.fp8.numerics`` (tested on its own against hand-built representable values), so
the reference and the layer see identical FP8 bytes; everything after dequantization is float64 ``@``.
"""

from __future__ import annotations

import torch

from falqon_lit.config import ScaleGranularity
from falqon_lit.fp8.numerics import E4M3, E5M2, dequantize, expand_scale, is_block_scale, quantize_dynamic
from falqon_lit.layer import FalqonLinear


def melded_weight(layer: FalqonLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deq(W), deq(A))`` in float64 from the layer's stored bytes."""
    n = layer.out_features
    full = dequantize(layer.weight_fp8, layer.weight_scale, torch.float64)  # (out + r, in)
    return full[:n], full[n:]


def forward(layer: FalqonLinear, x: torch.Tensor) -> torch.Tensor:
    """Alg. 1 forward: ``deq(Q(x)) (W + B A)ᵀ + bias`` in float64."""
    w, a = melded_weight(layer)
    x_2d = x.reshape(-1, x.shape[-1])
    x_fp8, x_scale = quantize_dynamic(x_2d, E4M3, layer.config.act_scaling)
    x_hp = dequantize(x_fp8, x_scale, torch.float64)
    y = x_hp @ w.t() + (x_hp @ a.t()) @ layer.lora_B.detach().double().t()
    if layer.bias is not None:
        y = y + layer.bias.detach().double()
    return y.reshape(*x.shape[:-1], layer.out_features)


def grad_lora_B(layer: FalqonLinear, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``gᵀ · O_A`` with ``O_A = deq(Q(x)) deq(A)ᵀ``, float64."""
    _, a = melded_weight(layer)
    x_2d = x.reshape(-1, x.shape[-1])
    x_fp8, x_scale = quantize_dynamic(x_2d, E4M3, layer.config.act_scaling)
    o_a = dequantize(x_fp8, x_scale, torch.float64) @ a.t()
    return grad_y.reshape(-1, layer.out_features).double().t() @ o_a


def grad_input(layer: FalqonLinear, grad_y: torch.Tensor, residual: bool) -> torch.Tensor:
    """``deq(Q_e5m2([g | g B] ⊙ s)) · [W_fp8; A_fp8]`` (row scales folded into g), float64 after quantization;
    block scales stay with the weight: ``deq(Q([g | g B])) · deq([W; A])``, with E4M3 for 1 × 128 gradient groups."""
    n = layer.out_features
    g = grad_y.reshape(-1, n)
    rows = n + layer.rank if residual else n
    if residual:
        g = torch.cat([g, g @ layer.lora_B.detach().to(g.dtype)], dim=1)
    w_fp8 = layer.weight_fp8[:rows].to(torch.float64)
    if is_block_scale(layer.weight_scale):
        w_fp8 = dequantize(layer.weight_fp8[:rows], layer.weight_scale[:rows], torch.float64)
        w_scale = torch.ones((), dtype=torch.float64)
    elif layer.weight_scale.numel() > 1:
        g = g.float() * layer.weight_scale[:rows].reshape(1, -1)
        w_scale = torch.ones((), dtype=torch.float64)
    else:
        w_scale = layer.weight_scale.double()
    grad_dtype = E4M3 if layer.config.act_scaling == ScaleGranularity.BLOCK else E5M2  # DeepSeek-V3: E4M3 in groups
    g_fp8, g_scale = quantize_dynamic(g, grad_dtype, layer.config.act_scaling)
    return (dequantize(g_fp8, g_scale, torch.float64) @ (w_fp8 * w_scale)).reshape(*grad_y.shape[:-1], -1)


def merge(layer_before: FalqonLinear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 2 for the given rows: ``Q(deq(W[rows]) + B[rows] A)`` with the layer's scale rule (row: fresh row
    scales; tensor and block: the kept scales, clamped); (bytes, scale)."""
    n = layer_before.out_features
    _, a = melded_weight(layer_before)
    row_scaled = layer_before.weight_scale.numel() > 1
    scale = layer_before.weight_scale[rows] if row_scaled else layer_before.weight_scale
    w_rows = dequantize(layer_before.weight_fp8[rows], scale, torch.float64)
    new_hp = (w_rows + layer_before.lora_B.detach()[rows].double() @ a).float()
    assert rows.max() < n
    if layer_before.config.weight_scaling == ScaleGranularity.ROW:
        return quantize_dynamic(new_hp, E4M3, ScaleGranularity.ROW)
    limit = torch.finfo(E4M3).max
    return (new_hp / expand_scale(scale, new_hp.shape[1])).clamp(-limit, limit).to(E4M3), scale


def group_grad_input(layers: list[FalqonLinear], grad_ys: list[torch.Tensor], residual: list[bool]) -> torch.Tensor:
    """Grouped input gradient: ``deq(Q_e5m2([g_1 | g_1 B_1 | g_2 | ...] ⊙ s)) · [W_1; A_1; W_2; ...]`` in float64,
    one quantization of the concatenated gradient (a zero tail for a projection without residual)."""
    pieces, weights, scales = [], [], []
    for layer, grad_y, has_residual in zip(layers, grad_ys, residual, strict=True):
        g = grad_y.reshape(-1, layer.out_features)
        tail = g @ layer.lora_B.detach().to(g.dtype) if has_residual else g.new_zeros(g.shape[0], layer.rank)
        pieces += [g, tail]
        weights.append(layer.weight_fp8.to(torch.float64))
        scales.append(layer.weight_scale.expand(layer.out_features + layer.rank, 1))
    g, w_fp8, w_scale = torch.cat(pieces, dim=1), torch.cat(weights), torch.cat(scales)
    if layers[0].weight_scale.numel() > 1:
        g, w_scale = g.float() * w_scale.reshape(1, -1), torch.ones((), dtype=torch.float64)
    else:
        w_scale = layers[0].weight_scale.double()
    g_fp8, g_scale = quantize_dynamic(g, E5M2, layers[0].config.act_scaling)
    return (dequantize(g_fp8, g_scale, torch.float64) @ (w_fp8 * w_scale)).reshape(*grad_ys[0].shape[:-1], -1)


def linear_cross_entropy(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused ``lm_head`` + cross-entropy (float32 logits, as the trainer's logits path): (mean loss, argmax)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
    return loss, logits.argmax(dim=-1)
