"""Configuration of FALQON layers: frozen dataclasses and string enums only.

Every field has an attribute docstring on the line after it: LightningCLI/jsonargparse show those in ``--help``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field, replace
from typing import Any


def plain_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-safe plain values (enums as their string values, tuples as lists), for saved
    hyperparameters and manifests."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


class ScaleGranularity(str, enum.Enum):
    """How many FP8 scales a tensor gets."""

    TENSOR = "tensor"
    """One scale for the whole tensor (the paper's choice for ``[W; A]``)."""
    ROW = "row"
    """One scale per row: per output channel for weights, per token for activations."""
    BLOCK = "block"
    """One scale per 128 × 128 block of a weight and per 1 × 128 group of a token (the DeepSeek-V3 recipe of
    compressed-tensors ``FP8_BLOCK`` and native ``fp8`` checkpoints with ``weight_block_size: [128, 128]``)."""


class InitMethod(str, enum.Enum):
    """How the melded ``A`` rows are initialised."""

    SVD = "svd"
    """Top-r right singular factor of the FP8 quantization error of ``W`` (the reference implementation)."""
    RANDOM = "random"
    """Kaiming-uniform, as PEFT initialises LoRA ``A``, drawn from a generator seeded by the layer's name (the same
    bytes on every conversion and every data-parallel rank)."""
    GRADIENT = "gradient"
    """Top-r right singular directions of the dense weight gradient of the first training batches (LoRA-GA /
    LoRA-One for frozen-``A`` training), rows scaled to the kaiming-uniform row norm; ``random``'s (name-seeded)
    rows until the calibration pass (``RowwiseProxyUpdate`` runs it when fit starts) replaces them."""


class BPolicy(str, enum.Enum):
    """What happens to ``B`` after a row-wise proxy update."""

    ZERO = "zero"
    """Zero all of ``B`` after every merge (paper/reference; Adam moments carry the signal)."""
    KEEP = "keep"
    """Zero only the merged rows; the rest stays as a residual that forward/backward include exactly."""


class Rounding(str, enum.Enum):
    """How a proxy update rounds ``W[i] + B[i]·A`` back to FP8."""

    NEAREST = "nearest"
    """Round to nearest even (paper): an update below half an FP8 step of its weight is lost."""
    STOCHASTIC = "stochastic"
    """Round up or down with probability proportional to the distance: unbiased, so small updates arrive on
    average instead of being lost. The random bits are a hash of (layer, row, column, merge count), identical on
    every data-parallel rank."""


class Backend(str, enum.Enum):
    """Which kernels run the FP8 GEMMs."""

    AUTO = "auto"
    """``torch`` on CPU and CUDA."""
    TORCH = "torch"
    """``torch._scaled_mm`` on CUDA with FP8 tensor cores; on CPU a float32 GEMM of the dequantized operands (the
    arithmetic compressed-tensors runs there, so exported and trained models agree bit for bit)."""
    TE = "te"
    """Transformer Engine's fused quantizers and cuBLASLt GEMM (CUDA, tensor scales; ``pip install
    'falqon-lit[te]'``)."""
    EMULATE = "emulate"
    """Float64 dequantize-and-matmul on the same FP8 bytes: slow, exact, the test oracle."""


class GemmRole(str, enum.Enum):
    """Which operand of a GEMM a quantizer feeds; decides the FP8 format."""

    INPUT = "input"
    WEIGHT = "weight"
    GRAD_OUTPUT = "grad_output"


FP8_GEMM_ALIGNMENT = 16
"""FP8 tensor-core GEMMs need every dimension divisible by this."""

SCALE_BLOCK = 128
"""Edge of a ``block`` scale: weights get one scale per 128 × 128 block, activations one per 1 × 128 group."""


@dataclass(frozen=True)
class FalqonConfig:
    """What to convert and how: rank, targets, FP8 scaling, initialisation, backend.

    Raises:
        ValueError: listing every invalid field at once.
    """

    rank: int = 16
    """LoRA rank r; a positive multiple of 16 so that ``out_features + r`` stays FP8-GEMM aligned."""
    target_modules: list[str] | None = None
    """Name suffixes of the ``nn.Linear`` layers to convert (e.g. ``q_proj``); ``None``: every linear inside the
    decoder blocks."""
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    """Name suffixes never converted (kept in high precision)."""
    weight_scaling: ScaleGranularity = ScaleGranularity.ROW
    """Scale granularity of the FP8 weight ``[W; A]``: ``row`` (per output channel; default), ``tensor`` (paper) or
    ``block`` (128 × 128 blocks; ``A`` gets blocks of its own). Row and tensor: equal quality in the study
    (benchmarks/RESULTS.md); row is what vLLM serves with per-token inputs; block is what published FP8_BLOCK
    checkpoints hold."""
    act_scaling: ScaleGranularity = ScaleGranularity.ROW
    """Dynamic scale granularity of activations and gradients: ``row`` (per token; default, as vLLM serves FP8
    inputs), ``tensor`` (paper) or ``block`` (per 1 × 128 group of a token, as FP8_BLOCK checkpoints serve)."""
    init: InitMethod = InitMethod.GRADIENT
    """Initialisation of ``A``: ``gradient`` (default): the top-r directions of the first batches' weight gradient,
    computed by ``RowwiseProxyUpdate`` when training starts; in the quality study it closes FALQON's gap to bf16
    LoRA (+5.9% → −0.2% held-out loss, 3 seeds), because ``A`` is frozen. ``svd`` of the quantization error (the
    paper's; the ``paper`` recipe) or ``random``."""
    b_policy: BPolicy = BPolicy.KEEP
    """After a proxy update: ``keep`` the unmerged rows as an exact residual (default), or ``zero`` all of ``B``
    (paper; in the study it learns almost nothing: +30% held-out loss against bf16 LoRA, vs +6% for keep)."""
    merge_rounding: Rounding = Rounding.STOCHASTIC
    """Rounding of merged rows: ``stochastic`` (unbiased; default) or ``nearest`` (paper, which loses updates below
    half an FP8 step); the final flush always rounds to nearest."""
    backend: Backend = Backend.AUTO
    """GEMM backend: ``auto`` (``torch``, the faster on the H100), ``torch``, ``te`` (Transformer Engine; needs
    ``tensor`` weight and activation scaling) or ``emulate`` (float64 oracle)."""
    transpose_cache: bool = False
    """Keep a transposed FP8 copy of ``[W; A]`` for the backward GEMM (FP8 tensor cores want both operands
    K-major) instead of transposing it in every backward: one more byte per weight (6.1 GiB on a 7B model) for a
    0.3–0.7% faster step on the H100."""
    skip_unaligned: bool = True
    """Skip (and report) layers whose dimensions are not multiples of 16; ``False`` raises instead."""
    lora_alpha: float | None = None
    """LoRA alpha: the frozen ``A`` is multiplied by ``lora_alpha / rank`` (PEFT's output scale folded into ``A``,
    so Adam's steps on ``B`` move ``W`` as PEFT's do at that alpha); ``None`` keeps scale 1 (alpha = rank)."""
    merge_threshold: float = 0.0
    """Merge policy: a row chosen by the proxy update is merged only when its update ``B[i]·A`` averages at least
    this many FP8 steps (the E4M3 spacing at each of the row's weights); smaller rows stay in ``B`` (needs
    ``b_policy: keep``). ``0`` merges every chosen row (default)."""

    def __post_init__(self) -> None:
        # Coerce strings (YAML, CLI) to enums once, here.
        for name, enum_type in (
            ("weight_scaling", ScaleGranularity),
            ("act_scaling", ScaleGranularity),
            ("init", InitMethod),
            ("b_policy", BPolicy),
            ("merge_rounding", Rounding),
            ("backend", Backend),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(value))
                except ValueError:
                    choices = ", ".join(repr(m.value) for m in enum_type)
                    raise ValueError(f"FalqonConfig.{name} must be one of {choices}, got {value!r}") from None
        problems = []
        if not isinstance(self.rank, int) or self.rank <= 0 or self.rank % FP8_GEMM_ALIGNMENT:
            problems.append(
                f"rank must be a positive multiple of {FP8_GEMM_ALIGNMENT} (FP8 GEMMs need out_features + rank "
                f"divisible by {FP8_GEMM_ALIGNMENT}), got {self.rank!r}"
            )
        finer = [n for n in ("weight_scaling", "act_scaling") if getattr(self, n) != ScaleGranularity.TENSOR]
        if self.backend == Backend.TE and finer:
            problems.append(
                f"backend 'te' needs tensor scaling (Transformer Engine's FP8 tensors carry one scale), but "
                f"{' and '.join(finer)} {'is' if len(finer) == 1 else 'are'} "
                f"{' and '.join(repr(getattr(self, n).value) for n in finer)}; set them to 'tensor' or use backend "
                f"'torch'"
            )
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"lora_alpha must be > 0 or null, got {self.lora_alpha!r}")
        if not self.merge_threshold >= 0:
            problems.append(f"merge_threshold must be >= 0, got {self.merge_threshold!r}")
        if self.merge_threshold > 0 and self.b_policy != BPolicy.KEEP:
            problems.append(
                f"merge_threshold > 0 keeps small rows in B, which needs b_policy 'keep', got {self.b_policy.value!r}"
            )
        if self.target_modules is not None and (
            not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            problems.append(f"target_modules must be None or a non-empty list of names, got {self.target_modules!r}")
        if problems:
            raise ValueError("invalid FalqonConfig: " + "; ".join(problems))

    @classmethod
    def from_recipe(cls, name: str, **overrides: object) -> FalqonConfig:
        """Build a named preset: ``paper`` (FALQON as published: tensor scales, zero B, nearest merges, SVD init) or
        ``fp8-row`` (the paper's proxy update and init with row scales and per-token inputs); the defaults are the
        study's choice (row scales, keep B, stochastic merges, gradient init)."""
        paper = {"b_policy": BPolicy.ZERO, "merge_rounding": Rounding.NEAREST, "init": InitMethod.SVD}
        recipes = {
            "paper": cls(weight_scaling=ScaleGranularity.TENSOR, act_scaling=ScaleGranularity.TENSOR, **paper),
            "fp8-row": cls(weight_scaling=ScaleGranularity.ROW, act_scaling=ScaleGranularity.ROW, **paper),
        }
        if name not in recipes:
            raise ValueError(f"unknown FALQON recipe {name!r}; choose one of {sorted(recipes)}")
        return replace(recipes[name], **overrides)

    def short_repr(self) -> str:
        """A one-line summary for ``extra_repr``."""
        return (
            f"r={self.rank}, w={self.weight_scaling.value}, act={self.act_scaling.value}, "
            f"init={self.init.value}, B={self.b_policy.value}, merge={self.merge_rounding.value}, "
            f"backend={self.backend.value}{', transpose cache' if self.transpose_cache else ''}"
            f"{'' if self.lora_alpha is None else f', alpha={self.lora_alpha:g}'}"
            f"{f', merge >= {self.merge_threshold:g} steps' if self.merge_threshold else ''}"
        )
