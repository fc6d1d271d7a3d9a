"""Collectives and the autograd function of row-sharded FALQON layers (see ``falqon_lit.sharded``).

FP8 tensors travel as bytes (gloo has no float8 type). Gradients of ``B`` are averaged over ranks, as DDP does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from falqon_lit.fp8.numerics import E4M3
from falqon_lit.fp8.quantizer import Float8Tensor
from falqon_lit.functional import MeldedArgs, melded_forward, melded_grad_input, transposed

# ------------------------------------------------------------------------------------------------- collectives
# torch 2.13 renamed the single-tensor collectives (the old names warn FutureWarning); older torch has only those.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``local`` along dim 0 (FP8 travels as bytes: gloo has no float8 type)."""
    world = dist.get_world_size(group)
    as_bytes = local.dtype in (E4M3, torch.float8_e5m2)
    src = local.contiguous().view(torch.uint8) if as_bytes else local.contiguous()
    out = torch.empty((world * src.shape[0], *src.shape[1:]), dtype=src.dtype, device=src.device)
    _all_gather(out, src, group=group)
    return out.view(local.dtype) if as_bytes else out


def reduce_scatter_rows_mean(full: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's rows of the mean of ``full`` over ranks (the DDP gradient average, scattered)."""
    world = dist.get_world_size(group)
    out = torch.empty((full.shape[0] // world, *full.shape[1:]), dtype=full.dtype, device=full.device)
    _reduce_scatter(out, full.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out.div_(world)


def gather_melded(
    weight_fp8: torch.Tensor,
    weight_scale: torch.Tensor,
    lora_A_fp8: torch.Tensor,
    lora_A_scale: torch.Tensor,
    group: dist.ProcessGroup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full melded ``[W; A]`` ``(out + r, in)`` and its scale ``(1,)`` or ``(out + r, 1)`` from the shards."""
    melded = torch.cat([all_gather_rows(weight_fp8, group).view(torch.uint8), lora_A_fp8.view(torch.uint8)])
    if weight_scale.numel() == 1 and lora_A_scale.numel() == 1:  # one tensor scale for [W; A]
        return melded.view(E4M3), weight_scale
    return melded.view(E4M3), torch.cat([all_gather_rows(weight_scale, group), lora_A_scale])


class ShardedMeldedFunction(torch.autograd.Function):
    """FALQON's melded forward/backward on row shards; saves only the local shards, ``O_A`` and local ``B``."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        lora_B: torch.Tensor,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        lora_A_fp8: torch.Tensor,
        lora_A_scale: torch.Tensor,
        group: dist.ProcessGroup,
        args: MeldedArgs,
    ) -> torch.Tensor:
        out_features = lora_B.shape[0] * dist.get_world_size(group)
        x_2d = x.reshape(-1, x.shape[-1])  # (M, in)
        melded, scale = gather_melded(weight_fp8, weight_scale, lora_A_fp8, lora_A_scale, group)
        o, o_a = melded_forward(x_2d, Float8Tensor(melded, scale), out_features, args.act_scaling, args.backend)
        del melded  # the gathered weight lives only for this GEMM (re-gathered in backward)
        y = torch.addmm(o, o_a, all_gather_rows(lora_B, group).t().to(o.dtype)) if args.residual else o
        ctx.save_for_backward(o_a, lora_B, weight_fp8, weight_scale, lora_A_fp8, lora_A_scale)
        ctx.group, ctx.args = group, args
        return y.reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor):  # type: ignore[override]
        o_a, lora_B, weight_fp8, weight_scale, lora_A_fp8, lora_A_scale = ctx.saved_tensors
        group = ctx.group
        out_features = lora_B.shape[0] * dist.get_world_size(group)
        grad_2d = grad_y.reshape(-1, out_features)  # (M, out)
        grad_x = grad_b = None

        # grad_weight (Alg. 1): dL/dB = gᵀ · O_A on this rank's tokens, then mean over ranks, scattered by rows.
        if ctx.needs_input_grad[1]:
            grad_b_full = (grad_2d.t() @ o_a.to(grad_2d.dtype)).to(lora_B.dtype)  # (out, r)
            grad_b = reduce_scatter_rows_mean(grad_b_full, group)  # (out / world, r)

        # grad_input (Alg. 1), on the re-gathered weight.
        if ctx.needs_input_grad[0]:
            melded, scale = gather_melded(weight_fp8, weight_scale, lora_A_fp8, lora_A_scale, group)
            weight_t = transposed(melded)  # (in, out + r) row-major, as FalqonLinear's stored transpose
            del melded
            grad_x_2d = melded_grad_input(
                grad_2d,
                Float8Tensor(weight_t, scale),
                all_gather_rows(lora_B, group) if ctx.args.residual else None,
                ctx.args.act_scaling,
                ctx.args.backend,
                out_dtype=grad_y.dtype,
            )
            grad_x = grad_x_2d.reshape(*grad_y.shape[:-1], weight_t.shape[0])

        return grad_x, grad_b, None, None, None, None, None, None
