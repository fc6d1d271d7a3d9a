"""Read-back verification: exported artefact vs the trainer's own FP8 forward, on fixed prompts.

Reference: the in-memory model (already flushed, so ``W`` alone is the trained model) run through its
``FalqonLinear`` forward (``torch._scaled_mm``, dynamic FP8 activations) with the high-precision rest upcast to
float32, so that bf16 arithmetic noise is not mistaken for an export error. The float64 ONNX graph has a float64
reference instead: the same FP8 bytes and activation rounding with float64 sums (``standin.dequantized_view``).
For each prompt the reference greedily generates ``new_tokens`` tokens; the candidate then scores the same sequence
in one forward (teacher forcing). Token agreement is the fraction of those positions where the candidate's argmax
equals the reference's (by induction, 100 % means the candidate's own greedy decoding produces the same tokens).

Metrics per prompt: ``max|c − r| / max|r|`` and ``mean|c − r| / mean|r|`` over all positions and the vocabulary; the
report takes the worst (max) and the average (mean) over prompts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from falqon_lit.layer import falqon_layers

from .embedding_standin import stored_embeddings
from .standin import ActivationMode, Precision, dequantized_view

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "In 1969, the first person to walk on the Moon was",
    "The quick brown fox jumps over",
    "A healthy breakfast usually includes",
    "Machine learning is a field of study that",
)
"""Fixed verification prompts (10; the tests ask for at least 8 with identical greedy tokens)."""

Candidate = Callable[[torch.Tensor], torch.Tensor]
"""``input_ids (1, T) int64 -> logits (1, T, V)``."""


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria of one verification, with the reason for the numbers."""

    max_rel_err: float
    """Largest allowed ``max|c − r| / max|r|`` over prompts."""
    min_token_agreement: float
    """Smallest allowed fraction of greedy positions where the argmax agrees."""
    reason: str
    """Why these numbers (what differs numerically between artefact and reference)."""


@dataclass
class Sample:
    """One prompt's reference: the greedy sequence and the reference logits over it."""

    input_ids: torch.Tensor
    """``(1, T)``: prompt then the reference's greedy tokens."""
    prompt_len: int
    logits: torch.Tensor
    """``(T, V)`` float32."""
    logits_float_act: torch.Tensor | None = None
    """``(T, V)``: the same FP8 weights with float32 activations (no FP8 rounding): the noise-floor probe."""


@dataclass
class VerifyResult:
    """Outcome of comparing one runtime's output with the reference."""

    backend: str
    """What ran the artefact (``transformers + compressed-tensors (CPU)``, ``onnxruntime (CPU)``, ``vLLM``)."""
    tolerance: Tolerance
    max_rel_err: float = float("nan")
    mean_rel_err: float = float("nan")
    token_agreement: float = float("nan")
    prompts_identical: int = 0
    prompts: int = 0
    bytes_identical: tuple[int, int] | None = None
    """``(layers whose stored weight is bitwise what it must be, layers)``: the trained FP8 bytes (vllm, onnx) or
    ``deq(W)`` in the export dtype (hf)."""
    skipped: str | None = None
    """Why this check did not run (e.g. vLLM not installed); a skipped check neither passes nor fails the export."""
    unmeasured: str | None = None
    """Why a metric left NaN was not measured (e.g. vLLM returns tokens, not logits); NaN is not judged."""
    informational: bool = False
    """Reported, never gating: a noise-bound comparison where another check already verified the export exactly."""
    notes: list[str] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        """Every measured metric within the tolerance (NaN, a metric the runtime cannot give, is not judged)."""
        ok = not self.max_rel_err > self.tolerance.max_rel_err
        ok = ok and not self.token_agreement < self.tolerance.min_token_agreement
        if self.bytes_identical is not None:
            ok = ok and self.bytes_identical[0] == self.bytes_identical[1]
        return ok

    @property
    def status(self) -> str:
        """``pass``, ``FAIL``, ``skipped`` or ``info`` (outside the noise bound, but not gating)."""
        if self.skipped:
            return "skipped"
        if self.within_tolerance:
            return "pass"
        return "info" if self.informational else "FAIL"

    @property
    def passed(self) -> bool:
        """Ran and met its bar (a skipped check did not pass; see :attr:`failed`)."""
        return self.status in ("pass", "info")

    @property
    def failed(self) -> bool:
        """Ran, gates the export, and missed its bar."""
        return self.status == "FAIL"

    def as_dict(self) -> dict[str, object]:
        """Strict-JSON summary (manifest and ``--json``): NaN/inf become null and ``why_null`` says why."""
        why_null = f"skipped: {self.skipped}" if self.skipped else self.unmeasured
        return {
            "backend": self.backend,
            "status": self.status.lower(),
            "passed": None if self.skipped else self.passed,
            "gating": not self.informational,
            "skipped": self.skipped,
            "max_rel_err": _finite(self.max_rel_err),
            "mean_rel_err": _finite(self.mean_rel_err),
            "token_agreement": _finite(self.token_agreement),
            "why_null": why_null,
            "prompts_identical": self.prompts_identical,
            "prompts": self.prompts,
            "bytes_identical": list(self.bytes_identical) if self.bytes_identical else None,
            "tolerance": {
                "max_rel_err": _finite(self.tolerance.max_rel_err),
                "min_token_agreement": _finite(self.tolerance.min_token_agreement),
                "reason": self.tolerance.reason,
            },
            "notes": self.notes,
        }


def _finite(value: float) -> float | None:
    """``value``, or ``None`` for NaN (not measured) and inf (no bound): strict JSON has neither."""
    return value if math.isfinite(value) else None


class _Float32View:
    """Run the model with its non-FP8 floating tensors in float32, optionally first rounded to ``round_to`` (the
    export dtype, so the model computes what its export holds); the original tensors are put back on exit."""

    def __init__(self, model: nn.Module, round_to: torch.dtype | None = None) -> None:
        self.model = model
        self.round_to = round_to
        self.originals: dict[int, torch.Tensor] = {}

    def __enter__(self) -> nn.Module:
        fp8_owned = {id(t) for layer in falqon_layers(self.model).values() for t in layer.buffers()}
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        self.tensors = [t for _, t in named if id(t) not in fp8_owned]
        # Only what is written is rounded: non-persistent buffers (rotary inv_freq) are recomputed by the loader.
        persistent = self.model.state_dict().keys()
        written = {id(t) for n, t in named if n in persistent}
        for tensor in self.tensors:
            if tensor.is_floating_point():
                exported = self.round_to is not None and id(tensor) in written
                rounded = tensor.data.to(self.round_to) if exported else tensor.data
                if rounded.dtype != torch.float32 or tensor.dtype != torch.float32:
                    self.originals[id(tensor)] = tensor.data
                    tensor.data = rounded.float()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for tensor in self.tensors:
            if id(tensor) in self.originals:
                tensor.data = self.originals[id(tensor)]


@torch.no_grad()
def as_exported(model: nn.Module, samples: Sequence[Sample], dtype: torch.dtype) -> list[Sample]:
    """The reference sequences scored by the model as exported: high-precision tensors rounded to ``dtype``, then
    the trainer's FP8 forward in float32 (one teacher-forced forward per prompt)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with _Float32View(model, round_to=dtype):
        logits = [model(input_ids=s.input_ids.to(device), use_cache=False).logits[0].float().cpu() for s in samples]
    model.train(was_training)
    return [Sample(s.input_ids, s.prompt_len, got) for s, got in zip(samples, logits, strict=True)]


def encode_prompts(tokenizer: object, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids ``(1, T)`` of each prompt (no padding: each prompt runs alone)."""
    return [torch.tensor([tokenizer(p)["input_ids"]], dtype=torch.long) for p in prompts]


def _greedy(model: nn.Module, prompt_ids: Sequence[torch.Tensor], new_tokens: int) -> list[Sample]:
    device = next(model.parameters()).device
    samples = []
    for ids in prompt_ids:
        ids = ids.to(device)
        for _ in range(new_tokens):
            next_id = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        logits = model(input_ids=ids, use_cache=False).logits[0].float().cpu()
        samples.append(Sample(ids.cpu(), ids.shape[1] - new_tokens, logits))
    return samples


@torch.no_grad()
def reference_samples(
    model: nn.Module,
    prompt_ids: Sequence[torch.Tensor],
    new_tokens: int = 8,
    precision: Precision | str = Precision.FLOAT32,
    table_dtype: torch.dtype | None = None,
) -> list[Sample]:
    """Greedy-decode each prompt with the trainer's FP8 forward and keep the logits.

    ``float32``: the ``FalqonLinear`` forward with the rest upcast to float32; each sequence is also scored with
    float32 activations on the same FP8 weights, to measure the activation-rounding noise (:func:`activation_noise`).
    ``table_dtype``: the input embedding and output head rounded to it, as an ONNX graph stores them.
    ``float64``: the same FP8 weights and activation rounding with float64 arithmetic everywhere else.
    """
    was_training = model.training
    model.eval()
    if Precision(precision) == Precision.FLOAT64:
        with dequantized_view(model, ActivationMode.FP8, Precision.FLOAT64, table_dtype):
            samples = _greedy(model, prompt_ids, new_tokens)
    else:
        with _Float32View(model), contextlib.ExitStack() as tables:
            if table_dtype is not None:
                tables.enter_context(stored_embeddings(model, table_dtype, torch.float32))
            samples = _greedy(model, prompt_ids, new_tokens)
        device = next(model.parameters()).device
        with dequantized_view(model, ActivationMode.FLOAT, table_dtype=table_dtype):
            for sample in samples:
                float_act = model(input_ids=sample.input_ids.to(device), use_cache=False).logits[0]
                sample.logits_float_act = float_act.cpu()
    model.train(was_training)
    return samples


def activation_noise(samples: Sequence[Sample]) -> float:
    """``max|float-activation logits − FP8 logits| / max|FP8 logits|`` over prompts: what FP8 activation rounding
    alone does to this model's logits."""
    return max(
        float((s.logits_float_act - s.logits).abs().max() / s.logits.abs().max().clamp(min=1e-30))
        for s in samples
        if s.logits_float_act is not None
    )


@torch.no_grad()
def compare(samples: Sequence[Sample], candidate: Candidate, backend: str, tolerance: Tolerance) -> VerifyResult:
    """Score every reference sequence with ``candidate`` and fill in the error and agreement metrics."""
    max_errs, mean_errs, agree, total, identical = [], [], 0, 0, 0
    for sample in samples:
        got = candidate(sample.input_ids)[0].float().cpu()  # (T, V)
        ref = sample.logits
        diff = (got - ref).abs()
        max_errs.append(float(diff.max() / ref.abs().max().clamp(min=1e-30)))
        mean_errs.append(float(diff.mean() / ref.abs().mean().clamp(min=1e-30)))
        positions = slice(sample.prompt_len - 1, None)  # every position that predicts a generated token (+ the next)
        same = got[positions].argmax(-1) == ref[positions].argmax(-1)
        agree += int(same.sum())
        total += same.numel()
        identical += bool(same.all())
    return VerifyResult(
        backend=backend,
        tolerance=tolerance,
        max_rel_err=max(max_errs),
        mean_rel_err=sum(mean_errs) / len(mean_errs),
        token_agreement=agree / max(total, 1),
        prompts_identical=identical,
        prompts=len(samples),
    )


def _cells(r: VerifyResult) -> dict[str, str]:
    """One runtime's column of the report; ``-`` for what it did not measure."""
    if r.skipped:
        return {"result": "[yellow]skipped[/]"}

    def number(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.2e}"

    weights = "-" if r.bytes_identical is None else f"{r.bytes_identical[0]}/{r.bytes_identical[1]} layers"
    agreement = "-" if math.isnan(r.token_agreement) else f"{r.token_agreement:.1%}"
    bound = {0.0: "bit for bit, ", math.inf: ""}.get(r.tolerance.max_rel_err, f"≤ {r.tolerance.max_rel_err:.3g}, ")
    style = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "info": "[yellow]outside[/]"}
    return {
        "max rel err": number(r.max_rel_err),
        "mean rel err": number(r.mean_rel_err),
        "greedy agreement": f"{agreement} ({r.prompts_identical}/{r.prompts} prompts identical)",
        "weights bitwise": weights,
        "tolerance": f"{bound}≥ {r.tolerance.min_token_agreement:.1%} agreement",
        "result": style[r.status] + (" (info only)" if r.informational else ""),
    }


def print_report(results: Sequence[VerifyResult], console: object | None = None) -> None:
    """Rich table of the verification results: one column per runtime, so it fits 80 columns untruncated."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)
    table = Table(title="falqon-export verification (vs the trainer's FP8 forward)")
    table.add_column("check", no_wrap=True)
    columns = [_cells(r) for r in results]
    for r in results:
        table.add_column(escape(r.backend), overflow="fold")
    for row in ("max rel err", "mean rel err", "greedy agreement", "weights bitwise", "tolerance", "result"):
        table.add_row(row, *(cells.get(row, "-") for cells in columns))
    console.print(table)
    for r in results:
        name = escape(r.backend)
        if r.skipped:
            console.print(f"[yellow]{name} skipped[/]: {escape(r.skipped)}")
        else:
            console.print(f"[dim]{name}: tolerance because {escape(r.tolerance.reason)}[/]")
        for note in r.notes:
            console.print(f"[dim]{name}: {escape(note)}[/]")
