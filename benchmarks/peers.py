"""The LoRA fine-tuning peers that FALQON is measured against (train-step benchmark and quality study).

Every peer is PEFT LoRA on the same target linears, with adapters in the base layer's dtype (bf16 for a bf16
model: ``autocast_adapter_dtype=False``, where PEFT's default would upcast them to fp32) and no dropout. Only the
frozen base linears differ:

- ``peft-bf16``: the model's own ``nn.Linear``.
- ``torchao-fp8-lora``: torchao float8 training (``convert_to_float8_training``: dynamic tensorwise scaling, E4M3
  forward, E5M2 gradients), eager like every variant here (torchao's fast path fuses its casts with torch.compile).
  torchao 0.18's backward computes the weight-gradient FP8 GEMM even for a frozen weight (autograd then drops it),
  so this peer runs three FP8 GEMMs per layer and step.
- ``te-fp8-lora``: Transformer Engine ``te.Linear`` (bf16 params, the frozen weight copied in), FP8 current scaling
  (E4M3 forward, E5M2 gradients) under :func:`peer_autocast`; PEFT wraps it with its ``TeLinear`` adapter. TE skips
  the weight gradient of a frozen weight. The FP8 weight is re-quantized every forward (no weight caching).
- ``peft-bf16-liger``: ``peft-bf16`` with Liger Kernel's rotary, RMSNorm, SwiGLU and fused linear cross-entropy
  (``apply_liger_kernel_to_llama``: no full logits), what a careful bf16 LoRA user runs; add ``torch.compile`` of
  the blocks for the best-tuned bf16 peer.
- ``qlora-nf4``: bitsandbytes ``Linear4bit`` as in QLoRA (NF4, double quantization, blocksize 64, bf16 compute).
  Of ``prepare_model_for_kbit_training`` only the freezing is kept: norms and embeddings stay in the model's dtype
  (as for every peer), and gradient checkpointing is the caller's choice.

FP8 peers leave a targeted linear in bf16 (with a warning) when a dimension is not a multiple of 16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LinearFilter = Callable[[nn.Module, str], bool]


class PeerUnavailableError(RuntimeError):
    """A peer's package or device is missing here; the message is the benchmark's ``skipped: ...`` text."""


def _target_filter(targets: list[str], *, fp8: bool) -> LinearFilter:
    """``(module, fqn) -> bool`` of the linears PEFT will adapt (torchao's ``module_filter_fn`` signature)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.rpartition(".")[2] not in targets:
            return False
        if fp8 and (module.in_features % 16 or module.out_features % 16):
            warnings.warn(
                f"{fqn} ({module.in_features} -> {module.out_features}) stays bf16: FP8 GEMMs need both dims % 16 == 0",
                stacklevel=2,
            )
            return False
        return True

    return keep


def _swap_linears(model: nn.Module, keep: LinearFilter, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace each linear that ``keep`` selects by ``make(linear)``, one at a time.

    Only names are collected up front, so each replaced linear (and its weight, unless ``make`` kept it) is freed
    before the next one is built: a 7B-shaped model never holds two copies of its weights.
    """
    fqns = [fqn for fqn, module in model.named_modules() if keep(module, fqn)]
    for fqn in fqns:
        model.set_submodule(fqn, make(model.get_submodule(fqn)))


def _to_float8_training(model: nn.Module, targets: list[str]) -> None:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=_target_filter(targets, fp8=True), config=Float8LinearConfig())


def _te_linear(linear: nn.Linear) -> nn.Module:
    import transformer_engine.pytorch as te

    weight = linear.weight
    layer = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


def _to_te(model: nn.Module, targets: list[str]) -> None:
    _swap_linears(model, _target_filter(targets, fp8=True), _te_linear)


def _nf4_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    # Built on the meta device, then given the quantized weight: no fp32 weight is ever allocated.
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,  # QLoRA's double quantization of the absmax statistics
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
    )
    layer.weight = weight.to(linear.weight.device)  # the move quantizes (on the weight's own device)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def _to_nf4(model: nn.Module, targets: list[str]) -> None:
    _swap_linears(model, _target_filter(targets, fp8=False), _nf4_linear)
    model.is_loaded_in_4bit = True  # PEFT wraps bnb.nn.Linear4bit with its 4-bit LoRA layer only under this flag


def _apply_liger(model: nn.Module) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=model)


def _te_fp8_autocast() -> contextlib.AbstractContextManager:
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8CurrentScaling

    return te.autocast(recipe=Float8CurrentScaling())


@dataclass(frozen=True)
class _Peer:
    package: str | None
    """Import name of the package the peer needs, or None."""
    needs_cuda: bool
    """Whether the peer's kernels run only on CUDA."""
    replace_base: Callable[[nn.Module, list[str]], None] | None
    """Swaps the targeted base linears in place, or None to keep them."""
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Context that forward and backward run under."""
    patch_model: Callable[[nn.Module], None] | None = None
    """Patches the model's other modules (norms, MLP activation, loss) in place, or None."""


_PEERS = {
    "peft-bf16": _Peer(None, False, None),
    "torchao-fp8-lora": _Peer("torchao", False, _to_float8_training),
    "te-fp8-lora": _Peer("transformer_engine", True, _to_te, _te_fp8_autocast),
    "qlora-nf4": _Peer("bitsandbytes", True, _to_nf4),
    "peft-bf16-liger": _Peer("liger_kernel", True, None, patch_model=_apply_liger),
}
PEERS = tuple(_PEERS)


def _peer(name: str) -> _Peer:
    if name not in _PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    return _PEERS[name]


def check_available(name: str) -> None:
    """Raise if peer ``name`` cannot be built on this machine.

    Raises:
        ValueError: ``name`` is not one of ``PEERS``.
        PeerUnavailableError: its package is not installed, or it needs CUDA and there is none.
    """
    peer = _peer(name)
    if peer.package is not None and importlib.util.find_spec(peer.package) is None:
        raise PeerUnavailableError(f"skipped: {peer.package} not installed")
    if peer.needs_cuda and not torch.cuda.is_available():
        raise PeerUnavailableError(f"skipped: {name} needs a CUDA device")


def build_peer(model: nn.Module, name: str, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    """Wrap a Hugging Face Llama-like ``model`` (modified in place) as peer ``name``.

    Args:
        model: the causal LM, on the device and in the dtype it will train in.
        name: one of ``PEERS``.
        rank: LoRA rank r.
        alpha: LoRA alpha (the adapter output is scaled by ``alpha / rank``).
        targets: names of the adapted linears (``q_proj``, ...), matched against the last part of module names.

    Returns:
        The PEFT model; its only trainable parameters are the LoRA adapters. Run its forward and backward under
        :func:`peer_autocast`.

    Raises:
        ValueError: unknown ``name``.
        PeerUnavailableError: see :func:`check_available`.
    """
    check_available(name)
    from peft import LoraConfig, get_peft_model

    peer = _peer(name)
    if peer.patch_model is not None:
        peer.patch_model(model)
    replace_base = peer.replace_base
    if replace_base is not None:
        replace_base(model, list(targets))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def peer_autocast(name: str) -> contextlib.AbstractContextManager:
    """A fresh context to enter around a training step's forward *and* backward of peer ``name``.

    Only ``te-fp8-lora`` needs one (TE's FP8 autocast); the others get a null context. The backward belongs inside
    because activation checkpointing recomputes the forward during backward: outside the autocast Transformer
    Engine would silently recompute in bf16 what the forward ran in FP8.
    """
    return _peer(name).autocast()
