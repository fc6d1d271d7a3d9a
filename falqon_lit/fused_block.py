"""The decoder block around the FP8 layers: Liger Kernel's Triton kernels, fused norm quantization, a loss without
full logits.

On CUDA with ``liger-kernel`` installed (``pip install 'falqon-lit[gpu]'``), ``apply_liger_block`` gives the
families in ``LIGER_FAMILIES`` Liger's rotary embedding, RMSNorm and SwiGLU (``silu(gate) * up``; the projections
stay FALQON layers), and ``fused_linear_cross_entropy`` computes the next-token loss chunk by chunk from the last
hidden states, so the ``tokens × vocab`` logits never materialize. Elsewhere nothing is patched and the loss comes
from the logits: the same numbers, unfused. Norms and MLPs are rebound on this model's instances only (not through
Liger's ``apply_liger_kernel_to_*``, whose class-level patches would reach every model built later, CPU ones
included); rotary embeddings can only be replaced module-wide (``apply_rotary_pos_emb`` of the family's
``modeling_*`` module), so that replacement runs Liger's kernel for CUDA tensors and the original function for
any other.
On CUDA with Triton the norms in front of per-token-scaled projection groups, and the SwiGLU before down_proj,
then write the next GEMM's FP8 input (``fused_inputs``), replacing Liger's RMSNorm and SwiGLU there.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from collections.abc import Callable

import torch
from torch import nn

from falqon_lit.fp8 import triton_norm_quantize
from falqon_lit.fused_inputs import SILU_CLASSES, install_fused_inputs

LIGER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values whose blocks Liger Kernel patches here."""

LinearCrossEntropy = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int], tuple[torch.Tensor, torch.Tensor]
]
"""``(head weight (V, H), hidden (N, H), targets (N,), head bias, ignore_index) -> (mean loss, predictions (N,))``."""


def liger_missing(model: nn.Module, device: torch.device) -> str | None:
    """Why Liger's kernels cannot run for ``model`` on ``device`` (``None`` when they can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if device.type != "cuda":
        return f"Liger Kernel needs CUDA, the model runs on {device.type}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'falqon-lit[gpu]')"
    if model_type not in LIGER_FAMILIES:
        return f"model type {model_type!r} is not one of {LIGER_FAMILIES}"
    return None


def _liger_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_rms_norm

    return liger_rms_norm(hidden_states, self.weight, self.variance_epsilon)  # offset 0, Llama casting, as Liger's


def _liger_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_swiglu

    return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _cuda_rotary(original: Callable) -> Callable:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args, **kwargs):
        return (liger_rotary_pos_emb if q.is_cuda else original)(q, k, cos, sin, *args, **kwargs)

    rotary.falqon_original = original
    return rotary


def apply_liger_block(model: nn.Module) -> None:
    """Liger's rotary embedding, RMSNorm and SwiGLU for ``model`` (its loss stays ours: ``fused_linear_cross_entropy``).

    Call only when ``liger_missing`` returned ``None``.
    """
    family = model.config.model_type
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if not hasattr(modeling.apply_rotary_pos_emb, "falqon_original"):
        modeling.apply_rotary_pos_emb = _cuda_rotary(modeling.apply_rotary_pos_emb)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_liger_norm_forward, module)
        act = type(getattr(module, "act_fn", None)).__name__
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in SILU_CLASSES:
            module.forward = types.MethodType(_liger_mlp_forward, module)


def apply_fused_block(model: nn.Module, device: torch.device) -> tuple[bool, str]:
    """Everything of the fused block that runs on ``device`` (after ``convert_model`` grouped the projections).

    Returns:
        ``(whether the loss should run Liger's fused linear cross-entropy, a one-line description)``.
    """
    missing = liger_missing(model, device)
    if missing is None:
        apply_liger_block(model)
    probe = torch.empty(0, 1, device=device)
    norms, mlps = install_fused_inputs(model) if triton_norm_quantize.available(probe) else (0, 0)
    liger = "Liger Kernel rotary/RMSNorm/SwiGLU/loss" if missing is None else f"no Liger ({missing})"
    return missing is None, f"fused block: grouped projections, {liger}, FP8-writing norms/SwiGLUs {norms}/{mlps}"


def liger_linear_cross_entropy(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Liger's fused linear cross-entropy: mean loss over trained tokens and the argmax predictions, chunked."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, return_predicted_tokens=True)
    out = loss_fn(weight, hidden, targets, bias)
    return out.loss, out.predicted_tokens.clamp(min=0)  # -1 marks ignored tokens; their prediction is not scored


def fused_linear_cross_entropy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    linear_ce: LinearCrossEntropy = liger_linear_cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss of a causal LM from its last hidden states and ``lm_head``, with no full logits.

    Returns:
        ``(loss, preds (N,), targets (N,))`` with ``N = B·(T-1)`` and ``targets == ignore_index`` where nothing is
        trained, as the logits path returns them.
    """
    decoder = model.get_decoder()
    # Packed rows (position ids restarting per conversation) keep their block-diagonal attention here too.
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H): position t predicts token t+1
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    head = model.get_output_embeddings()
    loss, preds = linear_ce(head.weight, hidden, targets, head.bias, ignore_index)
    return loss, preds, targets
