"""Module swap: replace the target ``nn.Linear`` layers of a causal LM with ``FalqonLinear`` (torchao-style)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from falqon_lit.config import FP8_GEMM_ALIGNMENT, Backend, FalqonConfig
from falqon_lit.experts import experts_note
from falqon_lit.fp8 import te_backend
from falqon_lit.fp8_checkpoint import Fp8SourceLinear
from falqon_lit.grouped import GroupedFalqonLinear, ProjectionGroup, grouping_problem, plan_groups
from falqon_lit.layer import FalqonLinear, falqon_layers

log = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]


@dataclass
class ConversionReport:
    """What ``convert_model`` did."""

    converted: list[str] = field(default_factory=list)
    """Fully qualified names of the layers now ``FalqonLinear``."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Layers left in high precision, with the reason."""
    grouped: list[list[str]] = field(default_factory=list)
    """Projections that run as one melded GEMM (q/k/v, gate/up), by name."""
    ungrouped: dict[str, str] = field(default_factory=dict)
    """Projections that could share an input but run alone, with the reason (``"*"``: the whole model)."""
    fp8_bytes: int = 0
    """Bytes of FP8 weight storage ``[W; A]`` (one layout)."""
    trainable_params: int = 0
    """Number of trainable parameters (the ``lora_B`` matrices)."""
    total_params: int = 0
    """Parameters plus FP8 weight elements of the converted model."""

    def summary(self) -> str:
        """One line for logs and progress output."""
        return (
            f"FALQON: converted {len(self.converted)} linear layers ({len(self.grouped)} groups sharing a GEMM), "
            f"skipped {len(self.skipped)}; "
            f"FP8 weights {self.fp8_bytes / 2**20:.1f} MiB; trainable {self.trainable_params:,} "
            f"of {self.total_params:,} ({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"
        )


def _in_decoder_blocks(name: str, model: nn.Module) -> bool:
    # Decoder blocks of every HF causal LM live in an nn.ModuleList (model.layers, transformer.h, gpt_neox.layers).
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, nn.ModuleList):
            return True
    return False


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def convert_model(
    model: nn.Module,
    config: FalqonConfig,
    *,
    module_filter_fn: ModuleFilter | None = None,
    group_projections: bool = True,
) -> ConversionReport:
    """Swap target ``nn.Linear`` layers of ``model`` for ``FalqonLinear`` in place.

    Targets are ``config.target_modules`` (name suffixes) or, by default, every linear inside the decoder blocks;
    ``config.ignore`` (default ``lm_head``) and the output embedding always stay high precision.

    Args:
        model: a Hugging Face causal LM (or any module).
        config: rank, targets, scaling, init and backend.
        module_filter_fn: optional extra ``(module, fqn) -> bool`` filter.
        group_projections: run projections that share an input (q/k/v, gate/up of the families in
            ``grouped.PROJECTION_GROUPS``) as one melded GEMM; ``False`` converts every layer alone.

    Returns:
        A report of converted and skipped layers, FP8 bytes and trainable parameters.

    Raises:
        ValueError: a target name that matches no linear, misaligned layers with ``skip_unaligned=False``, or no
            convertible layer at all.
        ImportError: backend ``te`` without Transformer Engine installed.
    """
    if config.backend == Backend.TE:
        te_backend.require()  # fail before converting anything, not at the first forward
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Fp8SourceLinear))]
    if config.target_modules is not None:
        unknown = [t for t in config.target_modules if not any(_matches(n, [t]) for n, _ in linears)]
        if unknown:
            names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
            raise ValueError(f"target_modules {unknown} match no nn.Linear in the model; linear names are {names}")

    report = ConversionReport()
    for name, linear in linears:
        if config.target_modules is not None:
            wanted = _matches(name, config.target_modules)
        else:
            wanted = _in_decoder_blocks(name, model)
        if not wanted or linear is output_embeddings or _matches(name, config.ignore):
            if wanted:
                report.skipped[name] = "ignored (output embedding or 'ignore' list)"
            continue
        if module_filter_fn is not None and not module_filter_fn(linear, name):
            report.skipped[name] = "excluded by module_filter_fn"
            continue
        if linear.in_features % FP8_GEMM_ALIGNMENT or linear.out_features % FP8_GEMM_ALIGNMENT:
            reason = f"dims ({linear.in_features}, {linear.out_features}) not multiples of {FP8_GEMM_ALIGNMENT}"
            if not config.skip_unaligned:
                raise ValueError(f"layer {name!r}: {reason}; add it to 'ignore' or set skip_unaligned=True")
            log.info("FALQON skips %s: %s", name, reason)
            report.skipped[name] = reason
            continue
        report.converted.append(name)
    linear_by_name = dict(linears)
    # An FP8 checkpoint's layers keep their own bytes and scales, one layer each (grouping would restack them).
    groupable = [n for n in report.converted if not isinstance(linear_by_name[n], Fp8SourceLinear)]
    groups, report.ungrouped = plan_groups(model, groupable) if group_projections else ([], {})
    in_group = {name for group in groups for name in group}
    for name in report.converted:
        linear = linear_by_name[name]
        if isinstance(linear, Fp8SourceLinear):
            layer = linear.to_falqon(config, name=name)
        else:
            cls = GroupedFalqonLinear if name in in_group else FalqonLinear
            layer = cls.from_linear(linear, config, name=name)
        model.set_submodule(name, layer)
    for names in groups:
        _group(model, names, report)
    for label, reason in report.ungrouped.items():
        log.info("FALQON runs %s without grouping: %s", label, reason)

    if not report.converted:
        raise ValueError(
            "convert_model found no convertible nn.Linear (targets: "
            f"{config.target_modules or 'all linears in decoder blocks'}; skipped: {report.skipped or 'none'})"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, FalqonLinear):
            module.lora_B.requires_grad_(True)
            report.fp8_bytes += module.weight_fp8.numel()
            report.total_params += module.weight_fp8.numel() - module.rank * module.in_features
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params += sum(p.numel() for p in model.parameters())
    log.info(report.summary())
    if note := experts_note(model):
        warnings.warn(note, stacklevel=2)  # visible, unlike the info log: an MoE model is only partly FP8-trained
    return report


def _group(model: nn.Module, names: list[str], report: ConversionReport) -> None:
    members = [model.get_submodule(n) for n in names]
    problem = grouping_problem(members)
    if problem:
        report.ungrouped[",".join(names)] = problem
        for member in members:
            member.__dict__.pop("_melded_hp", None)
        return
    ProjectionGroup(members)
    report.grouped.append(names)


@torch.no_grad()
def dense_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``{fqn.weight: deq(W) + B A}`` for every FALQON layer: the effective dense weights, for comparison/export."""
    return {f"{n}.weight": m.to_dense(dtype) for n, m in falqon_layers(model).items()}
