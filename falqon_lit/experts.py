"""Mixture-of-experts parts FALQON leaves alone: routed experts and their routers.

transformers 5 keeps a block's routed experts as 3-D parameters (``experts.gate_up_proj`` ``(E, 2I, H)``,
``experts.down_proj`` ``(E, H, I)``) in one module, not as ``nn.Linear`` layers, so ``convert_model`` does not
convert them: they stay in the model's dtype and frozen (there are no FP8 experts yet). The router (``mlp.gate``, a
``*TopKRouter`` with a 2-D ``weight``) is not an ``nn.Linear`` either. Shared experts are plain linears and convert.
"""

from __future__ import annotations

from torch import nn


def routed_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding routed experts as 3-D parameters, by fully qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if any(p.dim() == 3 for p in module.parameters(recurse=False))
    }


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The router beside each routed-experts module (a sibling whose class is a router or that is named ``gate``)."""
    found = {}
    for name in routed_experts(model):
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        for child_name, child in parent.named_children():
            if "Router" in type(child).__name__ or (child_name == "gate" and not list(child.children())):
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return found


def experts_note(model: nn.Module) -> str | None:
    """One line saying what stays high precision and untrained in an MoE model; ``None`` for a dense model."""
    experts = routed_experts(model)
    if not experts:
        return None
    count = sum(next(p for p in m.parameters(recurse=False) if p.dim() == 3).shape[0] for m in experts.values())
    params = sum(p.numel() for m in experts.values() for p in m.parameters(recurse=False))
    dtype = str(next(next(iter(experts.values())).parameters()).dtype).removeprefix("torch.")
    return (
        f"FALQON: mixture of experts: {count} routed experts in {len(experts)} blocks ({params:,} parameters) and "
        f"their routers stay {dtype} and are not trained (no FP8 experts yet); attention and shared-expert linears "
        "are FALQON layers"
    )
