"""Run plans of the quality study (``benchmarks/quality.py``): which variants train, at which seeds, in which order.

Three studies (``--study``):

- ``main`` (issue 8): bf16 LoRA, every FALQON scaling × B policy × merge rounding, the FP8-base peer; ablations of
  the default on the first seed; the export check;
- ``controls`` (issue 18): where FALQON's gap to bf16 LoRA comes from, then remedies. Controls: ``bf16-lora``,
  the FALQON defaults, ``bf16-lora-fa-{svd,random}`` (PEFT bf16 LoRA with ``A`` frozen at FALQON's own initial
  ``A``: FALQON's optimisation problem without FP8) and ``falqon-nomerge`` (the defaults with no proxy update and
  no flush: FP8 base plus an exact bf16 residual ``B·A``). Remedies: ``falqon+...`` rows changing one option of
  the defaults (init, A refresh, merge threshold) and ``bf16-lora-fa-gradient`` (gradient init without FP8).
  All control runs of every seed come first, so a time-limited call finishes whole control rows;
- ``long`` (issue 18): the paper's horizon and hyper-parameters (the settings, see ``quality.py``) for bf16 LoRA,
  QLoRA-style NF4 LoRA, the FALQON defaults and the chosen remedies.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, replace
from typing import Any

from benchmarks.quality_records import BF16_LORA
from falqon_lit.config import BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Adapted layers of every variant: all linears of the Llama decoder blocks (FALQON's default set)."""
PEER = "fp8base-lora"
QLORA = "qlora-nf4"
STUDIES = ("main", "controls", "long")


# ------------------------------------------------------------------------------------------------------ run plan
@dataclass(frozen=True)
class Run:
    """One training run of the study, or one ``before`` evaluation (``train=False``)."""

    name: str
    group: str
    """``before``, ``main``, ``ablation``, ``export``, ``control`` or ``remedy``."""
    kind: str
    """``base`` (the backbone as is), ``peft``, ``peft-fa`` (PEFT with ``A`` frozen at ``falqon``'s initial ``A``),
    ``falqon``, ``peer`` (the FP8-base LoRA peer) or ``qlora`` (NF4 base + LoRA)."""
    seed: int | None = None
    falqon: FalqonConfig | None = None
    """FALQON's configuration (``falqon``), or the one whose initial ``A`` a ``peft-fa`` run freezes."""
    k: str = "r"
    """Rows merged per layer per proxy update: ``r`` (rank; the callback's default), ``all`` or a number."""
    every_n_steps: int = 1
    merge: bool = True
    """Proxy updates and the final flush; ``False``: ``B`` is never merged (an exact bf16 residual to the end)."""
    refresh_every: int | None = None
    """A refresh after every n-th step (``RowwiseProxyUpdate.refresh_every_n_steps``, gradient directions)."""
    train: bool = True
    bench: bool = True
    export: bool = False
    """Also export to the vLLM folder and evaluate what transformers reads back from it."""

    @property
    def key(self) -> str:
        return f"{self.name}@{'-' if self.seed is None else self.seed}"

    def describe(self) -> dict[str, Any]:
        """Plain values for the JSON record."""
        falqon = None if self.falqon is None else {k: getattr(v, "value", v) for k, v in asdict(self.falqon).items()}
        return {
            "kind": self.kind,
            "falqon": falqon,
            "k": self.k,
            "every_n_steps": self.every_n_steps,
            "merge": self.merge,
            "refresh_every": self.refresh_every,
            "train": self.train,
            "bench": self.bench,
            "export": self.export,
        }


def falqon_name(config: FalqonConfig) -> str:
    """``falqon-<weight scaling>-<b policy>``, plus ``-sr`` for stochastic merge rounding."""
    suffix = "-sr" if config.merge_rounding == Rounding.STOCHASTIC else ""
    return f"falqon-{config.weight_scaling.value}-{config.b_policy.value}{suffix}"


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan_runs(
    seeds: list[int],
    rank: int,
    variants: list[str] | None,
    ablations: bool,
    ablation_base: str | None,
    export_check: bool = False,
) -> list[Run]:
    """Every run in execution order: befores, the main comparison seed by seed, the ablations (first seed), then
    (``export_check``) the ablation base trained once more and evaluated through its vLLM export.

    Raises:
        ValueError: an ablation base that is not a FALQON variant name.
    """
    falqon = {
        falqon_name(c): c
        for c in (
            FalqonConfig(
                rank=rank, target_modules=list(TARGETS), weight_scaling=s, act_scaling=s, b_policy=p, merge_rounding=m
            )
            for m in Rounding
            for s in ScaleGranularity
            for p in BPolicy  # new members join the study automatically
        )
    }
    main = [Run(BF16_LORA, "main", "peft"), *(Run(n, "main", "falqon", falqon=c) for n, c in falqon.items())]
    main = [r for r in [*main, Run(PEER, "main", "peer")] if _selected(r.name, variants)]
    base_name = ablation_base or falqon_name(FalqonConfig())
    if (ablations or export_check) and base_name not in falqon:
        raise ValueError(f"--ablation-base must be one of {sorted(falqon)}, got {base_name!r}")
    base = Run(base_name, "ablation", "falqon", seeds[0], falqon.get(base_name), bench=False)
    extra = (
        [
            *(replace(base, name=f"{base_name}:k={k}", k=k) for k in ("1", "10", "all")),
            *(replace(base, name=f"{base_name}:every={n}", every_n_steps=n) for n in (4, 16)),
            replace(base, name=f"{base_name}:init=random", falqon=replace(base.falqon, init=InitMethod.RANDOM)),
        ]
        if ablations
        else []
    )
    if export_check:
        extra.append(replace(base, name=f"{base_name}:export", group="export", bench=True, export=True))

    scalings = {r.falqon.weight_scaling for r in [*main, *extra] if r.falqon is not None}
    befores = [Run("before:base", "before", "base", train=False)]
    befores += [
        Run(
            f"before:fp8-{s.value}",
            "before",
            "falqon",
            falqon=falqon[falqon_name(FalqonConfig(weight_scaling=s))],
            train=False,
        )
        for s in ScaleGranularity
        if s in scalings
    ]
    return [*befores, *(replace(r, seed=s) for s in seeds for r in main), *extra]


def plan_controls(seeds: list[int], rank: int, variants: list[str] | None, steps: int) -> list[Run]:
    """Issue 18's controls (every seed), then its remedies (every seed); see the module docstring."""
    # The controls decompose the gap of the defaults they were designed around (SVD init, RESULTS.md): pinned, so
    # that they keep measuring it now that the library default is init GRADIENT (the remedy below).
    default = FalqonConfig(rank=rank, target_modules=list(TARGETS), init=InitMethod.SVD)
    gradient = replace(default, init=InitMethod.GRADIENT)
    base = Run(falqon_name(default), "control", "falqon", falqon=default)
    controls = [
        Run(BF16_LORA, "control", "peft"),
        base,
        replace(base, name="falqon-nomerge", merge=False),
        Run("bf16-lora-fa-svd", "control", "peft-fa", falqon=replace(default, init=InitMethod.SVD)),
        Run("bf16-lora-fa-random", "control", "peft-fa", falqon=replace(default, init=InitMethod.RANDOM)),
    ]
    refresh = max(1, steps // 3)
    remedy = replace(base, group="remedy")
    remedies = [
        replace(remedy, name="falqon+init=gradient", falqon=gradient),
        replace(remedy, name=f"falqon+init=gradient+refresh={refresh}", falqon=gradient, refresh_every=refresh),
        replace(remedy, name="falqon+merge>=1step", falqon=replace(default, merge_threshold=1.0)),
        replace(remedy, name="falqon+init=random", falqon=replace(default, init=InitMethod.RANDOM)),
        Run("bf16-lora-fa-gradient", "remedy", "peft-fa", falqon=gradient),
    ]
    return [
        replace(r, seed=s)
        for group in (controls, remedies)
        for s in seeds
        for r in group
        if _selected(r.name, variants)
    ]


def plan_long(seeds: list[int], rank: int, alpha: float, k: str, variants: list[str] | None, steps: int) -> list[Run]:
    """The long horizon at the paper's hyper-parameters: bf16 LoRA, NF4 QLoRA, the FALQON defaults and the A remedy
    (gradient init + a refresh every quarter of the run), with ``lora_alpha`` folded into FALQON's ``A``."""
    default = FalqonConfig(rank=rank, target_modules=list(TARGETS), lora_alpha=None if alpha == rank else alpha)
    refresh = max(1, steps // 4)
    falqon = Run(falqon_name(default), "main", "falqon", falqon=default, k=k)
    runs = [
        Run(BF16_LORA, "main", "peft"),
        Run(QLORA, "main", "qlora"),
        falqon,
        replace(
            falqon,
            name=f"falqon+init=gradient+refresh={refresh}",
            falqon=replace(default, init=InitMethod.GRADIENT),
            refresh_every=refresh,
        ),
    ]
    return [replace(r, seed=s) for s in seeds for r in runs if _selected(r.name, variants)]
