"""The export targets, registered in one place, and ``export_model``: flush → write (atomically) → verify → manifest.

Each target has a writer (into a fresh temporary folder) and a read-back verifier. An artefact is renamed into place
only when it was written completely and, unless verification is turned off, passed verification; otherwise nothing
appears at the target path.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from falqon_lit.backbone import DTYPES
from falqon_lit.config import FalqonConfig, plain_dict
from falqon_lit.layer import falqon_layers, flush_all

from .destination import atomic_directory, check_destination
from .errors import ExportError
from .hf import write_hf
from .loading import require_falqon
from .manifest import write_manifest
from .onnx_graph import ONNX_OPSET, require_dense, write_onnx
from .readback import verify_hf_folder, verify_onnx_folder, verify_vllm_folder
from .standin import ActivationMode, Precision
from .verify import DEFAULT_PROMPTS, Sample, VerifyResult, encode_prompts, reference_samples
from .vllm import WeightStrategy, write_vllm


@dataclass(frozen=True)
class ExportOptions:
    """Target options; each target reads the ones it uses."""

    dtype: str = "bfloat16"
    """High-precision dtype of embeddings, norms, lm_head (and dense weights for ``hf``): bfloat16, float16, float32."""
    weight_strategy: str = WeightStrategy.AUTO.value
    """vllm: compressed-tensors weight scale strategy, ``auto``, ``tensor`` or ``channel``."""
    onnx_activations: str = ActivationMode.FP8.value
    """onnx: ``fp8`` rounds FALQON inputs to FP8 as in training; ``float`` writes a weight-only graph."""
    onnx_precision: str = Precision.FLOAT32.value
    """onnx: arithmetic of the graph around the FP8 weights, ``float32`` or ``float64`` (identical greedy tokens)."""
    opset: int = ONNX_OPSET
    """onnx: opset version (≥ 19)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.weight_strategy not in {s.value for s in WeightStrategy}:
            problems.append(
                f"--weight-strategy must be one of {[s.value for s in WeightStrategy]}, got {self.weight_strategy!r}"
            )
        if self.onnx_activations not in {a.value for a in ActivationMode}:
            problems.append(
                f"--onnx-activations must be one of {[a.value for a in ActivationMode]}, got {self.onnx_activations!r}"
            )
        if self.onnx_precision not in {p.value for p in Precision}:
            problems.append(
                f"--onnx-precision must be one of {[p.value for p in Precision]}, got {self.onnx_precision!r}"
            )
        if not isinstance(self.opset, int) or self.opset < ONNX_OPSET:
            problems.append(f"--opset must be an integer >= {ONNX_OPSET} (FP8 DequantizeLinear), got {self.opset!r}")
        if problems:
            raise ExportError("invalid export options: " + "; ".join(problems))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


Writer = Callable[[nn.Module, Any, Path, ExportOptions], dict[str, Any]]
Verifier = Callable[[Path, nn.Module, Sequence[Sample], ExportOptions], list[VerifyResult]]


@dataclass(frozen=True)
class ExportTarget:
    """One export format: how to write it and how to read it back."""

    name: str
    description: str
    write: Writer
    verify: Verifier
    reference: Callable[[ExportOptions], Precision] = lambda options: Precision.FLOAT32
    """Arithmetic of the reference the artefact is verified against (float64 for a float64 ONNX graph)."""
    check: Callable[[nn.Module], None] = lambda model: None
    """Raises ``ExportError`` for a model the target cannot express, before any work."""
    reference_tables: Callable[[ExportOptions], torch.dtype | None] = lambda options: None
    """dtype the artefact stores the input embedding and output head in, when the reference must round them too."""


TARGETS: dict[str, ExportTarget] = {
    t.name: t
    for t in (
        ExportTarget(
            "vllm",
            "compressed-tensors float-quantized FP8 folder (vLLM, transformers + compressed-tensors)",
            lambda m, tok, d, o: write_vllm(m, tok, d, dtype=o.torch_dtype, weight_strategy=o.weight_strategy),
            lambda d, m, s, o: verify_vllm_folder(d, m, s, o.torch_dtype),
        ),
        ExportTarget(
            "onnx",
            "ONNX graph with FLOAT8E4M3FN weights -> DequantizeLinear -> MatMul (onnxruntime CPU)",
            lambda m, tok, d, o: write_onnx(
                m,
                tok,
                d,
                activations=o.onnx_activations,
                precision=o.onnx_precision,
                opset=o.opset,
                table_dtype=o.torch_dtype,
            ),
            lambda d, m, s, o: verify_onnx_folder(d, m, s, o.onnx_activations, o.onnx_precision),
            lambda o: Precision(o.onnx_precision),
            require_dense,
            lambda o: o.torch_dtype,
        ),
        ExportTarget(
            "hf",
            "plain Hugging Face folder, FP8 weights dequantized to --dtype",
            lambda m, tok, d, o: write_hf(m, tok, d, dtype=o.torch_dtype),
            lambda d, m, s, o: verify_hf_folder(d, m, s, o.torch_dtype),
        ),
    )
}
"""Every export target by name: the one registry the CLI and ``export_model`` read."""


def get_target(name: str) -> ExportTarget:
    """The registered target called ``name``."""
    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


@dataclass
class ExportReport:
    """What ``export_model`` did."""

    target: str
    out: Path | None
    """The written folder; ``None`` when verification failed and nothing was published."""
    rows_flushed: int
    results: list[VerifyResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No gating check failed (skipped and informational checks do not fail an export)."""
        return not any(r.failed for r in self.results)


def _version() -> str:
    try:
        return version("falqon-lit")
    except PackageNotFoundError:
        return "unknown"


def export_model(
    model: nn.Module,
    tokenizer: Any,
    target: str,
    out: str | os.PathLike[str],
    *,
    options: ExportOptions | None = None,
    force: bool = False,
    verify: bool = True,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    new_tokens: int = 8,
    falqon_config: FalqonConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Flush the model's pending ``B`` rows and export it to ``out`` in the ``target`` format.

    Args:
        model: a converted (and trained) causal LM; flushed in place.
        tokenizer: its Hugging Face tokenizer (copied into the folder).
        target: a name in :data:`TARGETS` (``vllm``, ``onnx``, ``hf``).
        out: folder to create.
        options: dtype, weight strategy, ONNX activation mode, precision and opset.
        force: replace an existing ``out``.
        verify: read the artefact back and compare with the trainer's FP8 forward; a failure publishes nothing.
        prompts: verification prompts.
        new_tokens: greedy tokens generated per prompt for the comparison.
        falqon_config: recorded in the manifest (defaults to the layers' config).
        progress: called with one line per step.

    Raises:
        ExportError: unknown target, bad options, existing ``out`` without ``force``, a model that is not FALQON,
            a missing tokenizer, or a layer the target cannot express.
    """
    say = progress or (lambda _: None)
    spec = get_target(target)
    options = options or ExportOptions()
    out = check_destination(out, force, say)
    require_falqon(model, type(model).__name__)
    spec.check(model)
    if tokenizer is None:
        raise ExportError("no tokenizer given; the export copies the tokenizer next to the weights, so pass one")
    if verify and (not prompts or new_tokens < 1):
        raise ExportError(f"verification needs prompts and new_tokens >= 1, got {len(prompts)} and {new_tokens}")
    layers = falqon_layers(model)
    falqon_config = falqon_config or next(iter(layers.values())).config

    rows = flush_all(model)
    say(f"flushed {rows} pending B rows into the FP8 weights of {len(layers)} FALQON layers")
    samples = []
    if verify:
        precision = spec.reference(options)
        say(f"reference: trainer FP8 forward ({precision.value}), {len(prompts)} prompts x {new_tokens} greedy tokens")
        ids = encode_prompts(tokenizer, prompts)
        samples = reference_samples(model, ids, new_tokens, precision, spec.reference_tables(options))

    report = ExportReport(target, None, rows)
    try:
        with atomic_directory(out, force=force, say=say) as tmp:
            say(f"writing {spec.name}: {spec.description}")
            facts = spec.write(model, tokenizer, tmp, options)
            if verify:
                say("verifying the written artefact")
                report.results = spec.verify(tmp, model, samples, options)
            extra = {
                "falqon_lit_version": _version(),
                "falqon_config": plain_dict(falqon_config) if falqon_config is not None else None,
                "export_options": dataclasses.asdict(options),
                "rows_flushed": rows,
                "verification": [r.as_dict() for r in report.results] if verify else None,
                **{k: v for k, v in facts.items() if k != "tensors"},
            }
            write_manifest(tmp, spec.name, facts.get("tensors", {}), extra)
            if not report.passed:
                failed = ", ".join(r.backend for r in report.results if r.failed)
                say(f"verification failed ({failed}); nothing written to '{out}' (use --no-verify to write anyway)")
                raise _VerificationFailed
    except _VerificationFailed:
        return report
    report.out = out
    say(f"wrote {out}")
    return report


class _VerificationFailed(Exception):
    """Internal: aborts the atomic folder so a failed artefact is not published."""
