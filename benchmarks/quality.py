"""Quality study: SmolLM2-135M-Instruct fine-tuned on real data with FALQON variants and LoRA peers (issue 8).

Every run trains with one plain PyTorch loop on the same batches in the same order per seed (GSM8K train problems
and chit-chat conversations; bf16 autocast on CUDA; AdamW, linear warm-up then cosine from ``falqon_lit.optim``;
gradient-norm clipping at 1.0, as the repo's configs):

- ``bf16-lora``: PEFT LoRA on the high-precision backbone (``benchmarks/peers.py``'s ``peft-bf16``) with FALQON's
  rank and target layers and ``lora_alpha = rank``: PEFT's scale ``alpha / r = 1`` equals FALQON's, whose forward is
  ``x (W + B A)ᵀ`` with no factor (with ``init=random`` both start from the same kaiming-uniform ``A`` and a zero
  ``B``). PEFT trains ``A`` and ``B``, FALQON only ``B``. Every variant keeps float32 trainable tensors and computes
  in bf16 under autocast (Lightning's ``bf16-mixed``), so ``bf16`` names the compute, as for the FP8 variants;
- ``falqon-<weight scaling>-<b policy>[-sr]`` for every ``ScaleGranularity``, ``BPolicy`` and ``Rounding`` member
  (``-sr``: stochastic merge rounding); the proxy update is the trainer's own ``RowwiseProxyUpdate`` callback, driven
  through its Lightning hooks;
- ``fp8base-lora``: ``peers.py``'s ``torchao-fp8-lora`` (PEFT LoRA over torchao float8 linears), reported as
  skipped where torchao is missing;
- ablations of the default FALQON variant on the first seed (held-out loss only): top-k rows, merge interval, init;
- ``<base>:export`` (first seed): the ablation base trained again, exported with ``falqon_lit.export`` to the vLLM
  folder (compressed-tensors FP8), read back with transformers and evaluated next to the trainer's own model.

Before (once per study configuration: the base model and the FP8 conversion FALQON starts from) and after each run:
held-out loss (``falqon_lit.eval.scoring.heldout_loss`` on GSM8K held-out problems and chit-chat validation
conversations) and 0-shot accuracy (ARC-Easy, ARC-Challenge, HellaSwag, BoolQ, an MMLU subset). One JSON line per
finished run is appended to ``<out>/quality.jsonl``; a rerun skips runs already there, so the study can span
several time-limited calls. ``--shard I/N`` runs every N-th pending run, so N processes can share one GPU (the
SmolLM2 step is bound by host-side dispatch, not by the GPU); appends are serialized with a file lock.
Bookkeeping, summary, table and plot live in ``benchmarks/quality_records.py``.

Usage:
    python benchmarks/quality.py --out DIR --time-budget 480      # again with the same DIR (JSONL) to continue
    python benchmarks/quality.py --out DIR --shard 0/4 & ... --shard 3/4 & wait   # 4 processes, one GPU
    python benchmarks/quality.py --out DIR --report-only          # table, quality.png, quality_summary.json
    python benchmarks/quality.py --smoke --out /tmp/q             # tiny random Llama, 2 steps, CPU
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import functools
import gc
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from quality_records import (
    BF16_LORA,
    RECORDS,
    append_record,
    estimate_seconds,
    fits,
    pending_runs,
    read_records,
    report,
    shard_of,
    study_key,
)
from torch import nn

from falqon_lit.assets import load_smollm2, smollm2_path
from falqon_lit.batching import LengthGroupedBatchSampler, collate
from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.config import FP8_GEMM_ALIGNMENT, BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.data import InstructionDataModule
from falqon_lit.eval.scoring import chat_heldout_texts, heldout_loss, score_choices, task_result
from falqon_lit.eval.tasks import load_task
from falqon_lit.layer import falqon_layers
from falqon_lit.optim import OptimConfig, build_optimizer, build_scheduler

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Adapted layers of every variant: all linears of the Llama decoder blocks (FALQON's default set)."""
BENCH_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq")
MMLU_SUBJECTS = ("elementary_mathematics", "high_school_biology", "high_school_psychology", "marketing", "nutrition")
"""The MMLU subset: ``ceil(limit / 5)`` items of each, pooled into one ``mmlu_subset`` accuracy."""
DATA_SEED = 1234
"""Seed of the train/held-out splits (fixed: every seed of the study sees the same split)."""
GSM8K_HELDOUT_FRACTION, CHAT_VAL_FRACTION = 0.15, 0.125
PEER = "fp8base-lora"
PEER_BACKENDS = {"peft": "peft-bf16", "peer": "torchao-fp8-lora"}
"""``benchmarks/peers.py`` name of each LoRA run kind."""
DEFAULTS = {"steps": 150, "batch_size": 16, "max_length": 256, "limit": 100, "chitchat": 1200, "gsm8k": None}
DEFAULTS.update(eval_batch_size=32, eval_max_length=1024)  # held-out loss keeps (batch, T, vocab) fp32 log-probs
SMOKE = {"steps": 2, "batch_size": 4, "max_length": 64, "limit": 2, "chitchat": 40, "gsm8k": 40}
SMOKE.update(eval_batch_size=4, eval_max_length=128)
SMOKE_LLAMA = {  # tests/tiny_models.py's shape, with SmolLM2's vocabulary so its tokenizer fits
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}
_START = time.monotonic()


def log(message: str) -> None:
    """A timestamped progress line."""
    print(f"[{datetime.now():%H:%M:%S} +{time.monotonic() - _START:5.0f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------------------------ run plan
@dataclass(frozen=True)
class Run:
    """One training run of the study, or one ``before`` evaluation (``train=False``)."""

    name: str
    group: str
    """``before``, ``main`` or ``ablation``."""
    kind: str
    """``base`` (the backbone as is), ``peft``, ``falqon`` or ``peer``."""
    seed: int | None = None
    falqon: FalqonConfig | None = None
    k: str = "r"
    """Rows merged per layer per proxy update: ``r`` (rank; the callback's default), ``all`` or a number."""
    every_n_steps: int = 1
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


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class StudyData:
    """Tokenized training examples, held-out sets and benchmark items, shared by every run."""

    train: list[dict[str, list[int]]]
    heldout: dict[str, tuple[list[str], list[str]]]
    """``gsm8k``/``chat`` -> ``(texts, prompts)`` for ``heldout_loss`` (the last assistant turn is scored)."""
    bench: dict[str, list[Any]]
    """Task -> multiple-choice items."""
    pad_id: int


def load_study_data(tokenizer: Any, settings: dict[str, Any]) -> StudyData:
    """GSM8K and chit-chat, each split by ``DATA_SEED`` (the repo's data module does split, chat template, masking)."""
    train, heldout = [], {}
    for name, source, limit, fraction in (
        ("gsm8k", "gsm8k", settings["gsm8k"], GSM8K_HELDOUT_FRACTION),
        ("chat", "chitchat", settings["chitchat"], CHAT_VAL_FRACTION),
    ):
        module = InstructionDataModule(
            source, max_length=settings["max_length"], val_fraction=fraction, limit=limit, seed=DATA_SEED
        )
        module.prepare(tokenizer)
        train += module.train_data.examples
        # Score the reply of (at most) the second exchange: conversations are long, training sees their start.
        heldout[name] = chat_heldout_texts(tokenizer, [c[:4] for c in module.val_conversations])
    limit = settings["limit"]
    bench = {task: load_task(task, limit) for task in BENCH_TASKS}
    per_subject = math.ceil(limit / len(MMLU_SUBJECTS))
    bench["mmlu_subset"] = [item for s in MMLU_SUBJECTS for item in load_task(f"mmlu_{s}", per_subject)]
    return StudyData(train, heldout, bench, tokenizer.pad_token_id)


def fixed_batches(
    examples: list[dict[str, list[int]]], batch_size: int, steps: int, seed: int, pad_id: int, multiple: int = 1
) -> list:
    """The first ``steps`` batches of the repo's seeded length-grouped sampler (epochs continue as in training),
    each padded to a length divisible by ``multiple``."""
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size, seed=seed)
    batches: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        for indices in sampler.batches()[: steps - len(batches)]:
            batches.append(collate([examples[i] for i in indices], pad_id, multiple))
        epoch += 1
    return batches


# -------------------------------------------------------------------------------------------------------- models
class SkipRun(Exception):
    """A variant that cannot be built here (a missing optional package): recorded as skipped."""


def _peers() -> ModuleType:
    """``benchmarks/peers.py``, the LoRA peers (``benchmarks/`` is not a package; tests import this file by path)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import peers

    return peers


def build_peer(model: nn.Module, name: str, rank: int) -> nn.Module:
    """``peers.build_peer`` with the study's targets and ``alpha = rank`` (scale ``alpha / r = 1``, as FALQON).

    Raises:
        SkipRun: the peer's package (or device) is missing here.
    """
    peers = _peers()
    try:
        return peers.build_peer(model, name, rank, rank, list(TARGETS))
    except peers.PeerUnavailableError as err:
        raise SkipRun(str(err).removeprefix("skipped: ")) from None


def step_context(run: Run) -> Callable[[], AbstractContextManager]:
    """Factory of the context a training step's forward and backward run under (a peer's own FP8 autocast)."""
    return (
        functools.partial(_peers().peer_autocast, PEER_BACKENDS[run.kind]) if run.kind in PEER_BACKENDS else nullcontext
    )


class ModelFactory:
    """Fresh models per run: a copy of the base (kept on the device), converted or wrapped as the run asks.

    Converted FALQON models with the deterministic SVD init are cached per configuration and copied (the SVDs of
    every layer would otherwise be repeated for each seed).
    """

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base, self.device = base.to(device), device
        self._converted: dict[str, nn.Module] = {}

    def build(self, run: Run, rank: int) -> nn.Module:
        torch.manual_seed(0 if run.seed is None else run.seed)  # random A (PEFT, init=random)
        if run.kind == "falqon":
            return self._falqon(run.falqon)
        model = copy.deepcopy(self.base)
        return model if run.kind == "base" else build_peer(model, PEER_BACKENDS[run.kind], rank)

    def _falqon(self, config: FalqonConfig) -> nn.Module:
        key = repr(config)
        if key in self._converted:
            # .to() re-checks each layer's "B is zero" token, which the copy made stale.
            return copy.deepcopy(self._converted[key]).to(self.device)
        model = copy.deepcopy(self.base)
        convert_model(model, config)
        if config.init == InitMethod.SVD:
            self._converted[key] = copy.deepcopy(model)
        return model


def load_base(smoke: bool) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32, or (``smoke``) a tiny random Llama with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if smoke:
        torch.manual_seed(0)
        model, tokenizer = LlamaForCausalLM(LlamaConfig(**SMOKE_LLAMA)), AutoTokenizer.from_pretrained(smollm2_path())
        with torch.no_grad():  # bf16-exact weights, as a released checkpoint (buffers such as RoPE's stay float32)
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16))
    else:
        model, tokenizer = load_smollm2(torch.float32)
    model.config.use_cache = False
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- train and eval
def _autocast(device: torch.device) -> AbstractContextManager:
    # As Lightning's bf16-mixed: high-precision ops around the FP8 GEMMs in bf16, float32 master weights.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def proxy_callback(run: Run, model: nn.Module) -> Any:
    """The trainer's ``RowwiseProxyUpdate`` with this run's rows per update and interval."""
    if run.k == "all":  # k is per layer; select_rows caps it at each layer's out_features
        k = max(layer.out_features for layer in falqon_layers(model).values())
    else:
        k = None if run.k == "r" else int(run.k)  # None: the callback's default, k = rank
    return RowwiseProxyUpdate(k=k, every_n_steps=run.every_n_steps, log_rows=False)


def train(
    model: nn.Module,
    batches: list,
    settings: dict[str, Any],
    device: torch.device,
    proxy: Any | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> list:
    """The loop every variant shares; returns the per-step training loss.

    ``proxy`` (a ``RowwiseProxyUpdate``) is driven through the Lightning hooks the Trainer calls, with a stand-in
    holding the public Trainer attributes a callback reads; the hooks run in the Trainer's order: fit start, after
    each optimizer step (and LR step), fit end (the final flush).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimConfig(lr=settings["lr"], warmup_steps=settings["warmup"])
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, len(batches))
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], loggers=[], lightning_module=model)
    model.train()
    if proxy is not None:
        proxy.on_fit_start(trainer, model)
    losses = []
    for step, batch in enumerate(batches, start=1):
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        with context():
            with _autocast(device):
                loss = model(**batch).loss  # mean cross-entropy over assistant tokens (labels -100 elsewhere)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.global_step = step
        if proxy is not None:
            proxy.on_train_batch_end(trainer, model, None, batch, step - 1)
        losses.append(loss.detach())
    if proxy is not None:
        proxy.on_train_end(trainer, model)
    return [round(v, 5) for v in torch.stack(losses).float().tolist()]


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    data: StudyData,
    device: torch.device,
    bench: bool,
    settings: dict[str, Any],
    autocast: bool = True,
) -> dict:
    """Held-out losses and (``bench``) 0-shot accuracy per task, with the repo's evaluation API (under bf16 autocast
    on CUDA unless ``autocast`` is off)."""
    batch_size, max_length = settings["eval_batch_size"], settings["eval_max_length"]
    metrics: dict[str, Any] = {}
    with _autocast(device) if autocast else nullcontext():
        for name, (texts, prompts) in data.heldout.items():
            metrics[f"{name}_loss"] = heldout_loss(model, tokenizer, texts, prompts, batch_size, max_length)[0]
        metrics["heldout_loss"] = statistics.fmean(metrics[f"{name}_loss"] for name in data.heldout)
        if bench:
            results = {
                task: task_result(items, score_choices(model, tokenizer, items, batch_size, max_length))
                for task, items in data.bench.items()
            }
            metrics["bench"] = {t: {"n": r.n, "acc": r.acc, "acc_norm": r.acc_norm} for t, r in results.items()}
            metrics["bench_acc"] = statistics.fmean(r.acc for r in results.values())
            metrics["bench_acc_norm"] = statistics.fmean(r.acc_norm for r in results.values())
    return metrics


def require_export_reader() -> None:
    """Raises ``SkipRun`` (before training) where transformers cannot read a compressed-tensors folder."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise SkipRun("compressed-tensors is not installed (transformers needs it to read the vLLM folder)")


def compute_name(device: torch.device) -> str:
    """How the study's evaluation computes on ``device``: bf16 autocast (CUDA, as in training) or float32."""
    return "bf16-autocast" if device.type == "cuda" else "float32"


def export_and_evaluate(
    model: nn.Module, tokenizer: Any, data: StudyData, device: torch.device, settings: dict[str, Any], metrics: dict
) -> dict[str, Any]:
    """Export ``model`` (flushed; ``metrics`` are its scores) to the vLLM folder, read it back with transformers +
    compressed-tensors and evaluate it as the trainer's model was: the scores a user of the exported checkpoint gets.

    On CUDA both are scored twice: under bf16 autocast (the study's evaluation; compressed-tensors then rounds its
    dequantized operands and activation scales to bf16, the trainer's FP8 GEMM does not) and in float32, where both
    compute the same products (the trainer's FP8 GEMM accumulates in float32) and the export itself is what is judged.
    """
    from transformers import AutoModelForCausalLM

    from falqon_lit.export import export_model

    start = time.perf_counter()
    compute = {compute_name(device): {"trainer": metrics}}
    with tempfile.TemporaryDirectory() as tmp:
        written = export_model(model, tokenizer, "vllm", Path(tmp) / "vllm", verify=False).out
        # float32 reads the bf16 high-precision tensors exactly; autocast then computes as for the trainer
        exported = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).to(device)
        exported.config.use_cache = False
        compute[compute_name(device)]["export"] = evaluate_model(exported, tokenizer, data, device, True, settings)
        if device.type == "cuda":
            compute["float32"] = {
                name: evaluate_model(m, tokenizer, data, device, True, settings, autocast=False)
                for name, m in (("trainer", model), ("export", exported))
            }
    del exported
    return {"compute": compute, "seconds": time.perf_counter() - start}


def merge_totals(model: nn.Module) -> dict[str, Any] | None:
    """Merge counters summed over every ``FalqonLinear`` (``None`` for other models)."""
    layers = list(falqon_layers(model).values())
    if not layers:
        return None
    totals: dict[str, Any] = {
        name: sum(int(getattr(layer, name)) for layer in layers)
        for name in ("merge_rows", "merge_lost", "merge_saturated", "merge_calls")
    }
    totals["merge_magnitude"] = sum(float(layer.merge_magnitude) for layer in layers)
    totals["merge_elements"] = sum(int(layer.merge_rows) * layer.in_features for layer in layers)
    totals["lost_fraction"] = totals["merge_lost"] / max(1, totals["merge_elements"])
    return totals


def execute(run: Run, factory: ModelFactory, tokenizer: Any, data: StudyData, settings: dict[str, Any]) -> dict:
    """Build, train and evaluate one run; returns its record's measurements."""
    device = factory.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if run.export:
        require_export_reader()
    model = factory.build(run, settings["rank"])
    result: dict[str, Any] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    losses, proxy = [], None
    if run.train:
        # torchao's float8 GEMMs need the weight gradient's token count divisible by 16 (an epoch's last, short
        # batch can hold one sequence of odd length)
        multiple = FP8_GEMM_ALIGNMENT if run.kind == "peer" else 1
        batches = fixed_batches(data.train, settings["batch_size"], settings["steps"], run.seed, data.pad_id, multiple)
        proxy = proxy_callback(run, model) if run.kind == "falqon" else None
        train_start = time.perf_counter()
        losses = train(model, batches, settings, device, proxy, step_context(run))
        result["train_s"] = time.perf_counter() - train_start
        result["step_ms"] = 1e3 * result["train_s"] / len(batches)
    eval_start = time.perf_counter()
    result["metrics"] = evaluate_model(model, tokenizer, data, device, run.bench, settings)
    result["eval_s"] = time.perf_counter() - eval_start
    if run.export:
        result["export"] = export_and_evaluate(model, tokenizer, data, device, settings, result["metrics"])
    result["loss_curve"] = losses
    result["merge"] = merge_totals(model) if run.train else None
    if proxy is not None:
        result["proxy"] = {
            "updates": proxy.updates,
            "rows_merged": proxy.rows_merged,
            "rows_flushed": proxy.rows_flushed,
        }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["wall_s"] = time.perf_counter() - start
    return result


def _run_line(run: Run, record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"{run.key}: {record['status']}: {record['reason']}"
    m = record["metrics"]
    curve = record["loss_curve"]
    trained = f"train loss {curve[0]:.3f} -> {curve[-1]:.3f}, " if curve else ""
    bench = f", bench acc {100 * m['bench_acc']:.1f}%" if "bench_acc" in m else ""
    lost = f", merge lost {100 * record['merge']['lost_fraction']:.1f}%" if record["merge"] else ""
    return (
        f"{run.key}: {trained}held-out gsm8k {m['gsm8k_loss']:.4f} chat {m['chat_loss']:.4f}{bench}{lost} "
        f"({record['wall_s']:.1f} s)"
    )


# ---------------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "quality-out"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; ablations use the first")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--max-length", type=int, help=f"training sequence length (default {DEFAULTS['max_length']})")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every variant (OptimConfig default)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default steps // 10), then cosine to 0.1 lr")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (the repo's configs)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r of every variant")
    p.add_argument("--limit", type=int, help=f"benchmark items per task (default {DEFAULTS['limit']})")
    p.add_argument("--chitchat-conversations", type=int, help=f"default {DEFAULTS['chitchat']}")
    p.add_argument("--gsm8k-problems", type=int, help="default all 1319")
    p.add_argument("--variants", help="comma-separated names or globs of main variants (e.g. 'bf16-lora,falqon-row-*')")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ablation-base", help="FALQON variant the ablations change (default: FalqonConfig() defaults)")
    p.add_argument(
        "--export-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the ablation base once more, export it to the vLLM folder and evaluate that too",
    )
    p.add_argument("--shard", help="I/N: run every N-th pending run from the I-th (N processes share the GPU)")
    p.add_argument("--time-budget", type=float, help="seconds: start no run that would not finish within it")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed or skipped")
    p.add_argument("--report-only", action="store_true", help="only print the table and write the summary files")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama and tiny data (CPU test of the loop)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    return p


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define a study (its records share ``study_key`` of these)."""
    defaults = SMOKE if args.smoke else DEFAULTS
    given = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "limit": args.limit,
        "chitchat": args.chitchat_conversations,
        "gsm8k": args.gsm8k_problems,
    }
    settings = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    settings.update(
        smoke=args.smoke,
        lr=args.lr,
        warmup=settings["steps"] // 10 if args.warmup is None else args.warmup,
        grad_clip=args.grad_clip,
        rank=args.rank,
        tasks=[*BENCH_TASKS, "mmlu_subset"],
        mmlu_subjects=list(MMLU_SUBJECTS),
    )
    return settings


def run_record(run: Run, factory: ModelFactory, tokenizer: Any, data: StudyData, study: str, settings: dict) -> dict:
    """The JSON record of one run: ``ok`` with its measurements, or ``skipped``/``failed`` with the reason."""
    record: dict[str, Any] = {
        "study": study,
        "key": run.key,
        "name": run.name,
        "group": run.group,
        "kind": run.kind,
        "seed": run.seed,
        "config": run.describe(),
        "settings": settings,
    }
    try:
        record.update(status="ok", **execute(run, factory, tokenizer, data, settings))
    except SkipRun as err:
        record.update(status="skipped", reason=str(err), wall_s=0.0)
    except Exception as err:  # one broken variant must not stop the study: record it and go on
        traceback.print_exc()
        record.update(status="failed", reason=f"{type(err).__name__}: {err}"[:500], wall_s=0.0)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record["device"] = torch.cuda.get_device_name() if factory.device.type == "cuda" else "cpu"
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the pending runs of the study (within ``--time-budget``), then report."""
    args = _parser().parse_args(argv)
    settings = study_settings(args)
    study = study_key(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS
    variants = args.variants.split(",") if args.variants else None
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = plan_runs(seeds, args.rank, variants, args.ablations, args.ablation_base, args.export_check)
    records = read_records(path)
    pending = pending_runs(runs, records, study, args.retry_failed)
    todo = shard_of(pending, args.shard)
    shard = f"; shard {args.shard}: {len(todo)} of the {len(pending)} pending" if args.shard else ""
    log(f"study {study}: {len(runs) - len(pending)} of {len(runs)} runs recorded in {path}{shard}; settings {settings}")
    if todo and not args.report_only:
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        )
        base, tokenizer = load_base(args.smoke)
        data = load_study_data(tokenizer, settings)
        factory = ModelFactory(base, device)
        sizes = ", ".join(f"{name} {len(texts)}" for name, (texts, _) in data.heldout.items())
        log(f"device {device}; {len(data.train)} training examples; held-out {sizes}")
        for index, run in enumerate(todo, start=1):
            estimate = estimate_seconds(run, records, study)
            if not fits(time.monotonic() - _START, estimate, args.time_budget):
                left = len(todo) - index + 1
                log(f"time budget: {left} runs left for the next call (next: {run.key}, ~{estimate:.0f} s)")
                break
            log(f"run {index}/{len(todo)} {run.key} ...")
            record = run_record(run, factory, tokenizer, data, study, settings)
            record["shard"] = args.shard  # runs of concurrent shards share the GPU: their step_ms is not a speed
            append_record(path, record)
            records.append(record)
            log(_run_line(run, record))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.shard is None:  # concurrent shards leave the report to one --report-only call after them
        report(args.out, study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
