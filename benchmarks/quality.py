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

``--study`` picks the run plan (``benchmarks/quality_runs.py``): ``main`` (above), ``controls`` (issue 18: where
the gap to bf16 LoRA comes from, LoRA-FA and no-merge controls, then remedies: gradient init of ``A``, A refresh,
merge threshold) or ``long`` (issue 18: the paper's horizon and hyper-parameters, see ``LONG``). ``--jobs N`` (or
``$QUALITY_JOBS``) starts N ``--shard`` processes itself, waits and reports; the report ends with a short table of
held-out loss (mean ± sd over seeds) and its gap to bf16 LoRA.

Usage:
    QUALITY_JOBS=10 python -m benchmarks.quality --study controls --out DIR --time-budget 400  # issue 18, one GPU
    python -m benchmarks.quality --study long --lr 2e-4 --seeds 0 --jobs 4 --out DIR
    python -m benchmarks.quality --out DIR --time-budget 480      # again with the same DIR (JSONL) to continue
    python -m benchmarks.quality --out DIR --shard 0/4 & ... --shard 3/4 & wait   # 4 processes, one GPU
    python -m benchmarks.quality --out DIR --report-only          # table, quality.png, quality_summary.json
    python -m benchmarks.quality --smoke --out /tmp/q             # tiny random Llama, 2 steps, CPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from benchmarks import peers
from benchmarks.quality_records import (
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
from benchmarks.quality_runs import QLORA, STUDIES, TARGETS, Run, plan_controls, plan_long, plan_runs
from falqon_lit.adapter_init import calibrate_gradient_init
from falqon_lit.assets import load_smollm2, smollm2_path
from falqon_lit.batching import LengthGroupedBatchSampler, collate
from falqon_lit.callbacks import RowwiseProxyUpdate
from falqon_lit.config import FP8_GEMM_ALIGNMENT, FalqonConfig, InitMethod
from falqon_lit.convert import convert_model
from falqon_lit.data import InstructionDataModule
from falqon_lit.eval.scoring import chat_heldout_texts, heldout_loss, score_choices, task_result
from falqon_lit.eval.tasks import load_task
from falqon_lit.layer import falqon_layers
from falqon_lit.optim import OptimConfig, build_optimizer, build_scheduler

BENCH_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq")
MMLU_SUBJECTS = ("elementary_mathematics", "high_school_biology", "high_school_psychology", "marketing", "nutrition")
"""The MMLU subset: ``ceil(limit / 5)`` items of each, pooled into one ``mmlu_subset`` accuracy."""
DATA_SEED = 1234
"""Seed of the train/held-out splits (fixed: every seed of the study sees the same split)."""
GSM8K_HELDOUT_FRACTION, CHAT_VAL_FRACTION = 0.15, 0.125
PEER_BACKENDS = {"peft": "peft-bf16", "peft-fa": "peft-bf16", "peer": "torchao-fp8-lora", "qlora": QLORA}
"""``benchmarks/peers.py`` name of each LoRA run kind."""
DEFAULTS = {"steps": 150, "batch_size": 16, "max_length": 256, "limit": 100, "chitchat": 1200, "gsm8k": None}
DEFAULTS.update(eval_batch_size=32, eval_max_length=1024)  # held-out loss keeps (batch, T, vocab) fp32 log-probs
SMOKE = {"steps": 2, "batch_size": 4, "max_length": 64, "limit": 2, "chitchat": 40, "gsm8k": 40}
SMOKE.update(eval_batch_size=4, eval_max_length=128)
LONG = {"steps": 1000, "rank": 64, "alpha": 16.0, "k": "10", "scheduler": "constant", "warmup_fraction": 0.03}
LONG.update(grad_clip=3.0, lr=2e-4)
"""``--study long``: the paper's hyper-parameters as far as they are known (rank 64, alpha 16, top-k 10, constant LR
after a 3% warm-up, gradient-norm clip 3.0, AdamW β2 0.999 and no weight decay, as ``OptimConfig``'s defaults);
LR 2e-4 or 2e-5 (``--lr``: the sources disagree)."""
CALIBRATION_BATCHES = 4
"""Training batches whose weight gradient initialises ``A`` (``init: gradient``; the first batches of the run)."""
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


def build_peer(model: nn.Module, name: str, rank: int, alpha: float) -> nn.Module:
    """``peers.build_peer`` with the study's targets (``alpha = rank`` outside ``--study long``: scale
    ``alpha / r = 1``, as FALQON's ``x (W + B A)ᵀ``).

    Raises:
        SkipRun: the peer's package (or device) is missing here.
    """
    try:
        return peers.build_peer(model, name, rank, alpha, list(TARGETS))
    except peers.PeerUnavailableError as err:
        raise SkipRun(str(err).removeprefix("skipped: ")) from None


def step_context(run: Run) -> Callable[[], AbstractContextManager]:
    """Factory of the context a training step's forward and backward run under (a peer's own FP8 autocast)."""
    return functools.partial(peers.peer_autocast, PEER_BACKENDS[run.kind]) if run.kind in PEER_BACKENDS else nullcontext


class ModelFactory:
    """Fresh models per run: a copy of the base (kept on the device), converted or wrapped as the run asks.

    Converted FALQON models with the deterministic SVD init are cached per configuration and copied (the SVDs of
    every layer would otherwise be repeated for each seed).
    """

    def __init__(self, base: nn.Module, device: torch.device) -> None:
        self.base, self.device = base.to(device), device
        self._converted: dict[str, nn.Module] = {}

    def build(self, run: Run, settings: dict[str, Any], batches: list) -> nn.Module:
        """The run's model; ``batches`` (its training batches) calibrate a gradient-initialised ``A`` of LoRA-FA."""
        torch.manual_seed(0 if run.seed is None else run.seed)  # random A (PEFT, init=random)
        if run.kind == "falqon":
            return self._falqon(run.falqon)
        rank, alpha = settings["rank"], settings.get("alpha") or settings["rank"]
        if run.kind == "peft-fa":
            return self._lora_fa(run.falqon, rank, alpha, batches)
        model = copy.deepcopy(self.base)
        return model if run.kind == "base" else build_peer(model, PEER_BACKENDS[run.kind], rank, alpha)

    def _lora_fa(self, config: FalqonConfig, rank: int, alpha: float, batches: list) -> nn.Module:
        """PEFT bf16 LoRA with every ``A`` frozen at FALQON's initial ``A`` under ``config`` (dequantized from its FP8
        bytes: the same values FALQON trains ``B`` against) and only ``B`` trained: LoRA-FA."""
        falqon = self._falqon(replace(config, lora_alpha=None))  # PEFT applies alpha / r itself
        if config.init == InitMethod.GRADIENT:
            calibrate_gradient_init(falqon, calibration_losses(falqon, batches, self.device))
        frozen = {name: layer.lora_A() for name, layer in falqon_layers(falqon).items()}
        del falqon
        model = build_peer(copy.deepcopy(self.base), PEER_BACKENDS["peft-fa"], rank, alpha)
        for name, module in model.named_modules():
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
                weight = module.lora_A["default"].weight
                with torch.no_grad():
                    weight.copy_(frozen.pop(name.removeprefix("base_model.model.")))
                weight.requires_grad_(False)
        assert not frozen, f"LoRA-FA: no PEFT adapter for {sorted(frozen)[:3]}"
        return model

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


def proxy_callback(run: Run, model: nn.Module, steps: int) -> Any:
    """The trainer's ``RowwiseProxyUpdate`` with this run's rows per update, interval and A refresh; for a run
    without merges, one that never merges (an interval beyond the run, no flush) but still calibrates ``A``."""
    if run.k == "all":  # k is per layer; select_rows caps it at each layer's out_features
        k = max(layer.out_features for layer in falqon_layers(model).values())
    else:
        k = None if run.k == "r" else int(run.k)  # None: the callback's default, k = rank
    every = run.every_n_steps if run.merge else steps + 1
    return RowwiseProxyUpdate(
        k=k,
        every_n_steps=every,
        log_rows=False,
        flush_at_end=run.merge,
        refresh_every_n_steps=run.refresh_every,
        calibration_batches=CALIBRATION_BATCHES,
    )


def step_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over assistant tokens (labels -100 elsewhere) of one batch, under the study's autocast."""
    batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
    with _autocast(device):
        return model(**batch).loss


def calibration_losses(model: nn.Module, batches: list, device: torch.device) -> list[Callable[[], torch.Tensor]]:
    """Loss closures of the first ``CALIBRATION_BATCHES`` training batches (gradient init of ``A``)."""
    return [functools.partial(step_loss, model, batch, device) for batch in batches[:CALIBRATION_BATCHES]]


def train(
    model: nn.Module,
    batches: list,
    settings: dict[str, Any],
    device: torch.device,
    proxy: Any | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
    after_step: Callable[[int], None] | None = None,
) -> list:
    """The loop every variant shares; returns the per-step training loss.

    ``proxy`` (a ``RowwiseProxyUpdate``) is driven through the Lightning hooks the Trainer calls, with a stand-in
    holding the public Trainer attributes a callback reads; the hooks run in the Trainer's order: fit start, train
    start (here: the gradient calibration of ``A``, on the first batches), before and after each optimizer step
    (and LR step), fit end (the final flush). ``after_step(step)`` runs after each step's proxy update.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimConfig(
        lr=settings["lr"], warmup_steps=settings["warmup"], scheduler=settings.get("scheduler", "cosine")
    )
    optimizer = build_optimizer(params, optim)
    scheduler = build_scheduler(optimizer, optim, len(batches))
    one_process = SimpleNamespace(reduce=lambda tensor, reduce_op=None: tensor)
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=len(batches),
        optimizers=[optimizer],
        loggers=[],
        lightning_module=model,
        strategy=one_process,
    )
    model.train()
    if proxy is not None:
        proxy.on_fit_start(trainer, model)
        proxy.initialise_A(model, calibration_losses(model, batches, device))
    losses = []
    for step, batch in enumerate(batches, start=1):
        if proxy is not None:
            proxy.on_train_batch_start(trainer, model, batch, step - 1)
        with context():
            loss = step_loss(model, batch, device)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trainer.global_step = step
        if proxy is not None:
            proxy.on_train_batch_end(trainer, model, None, batch, step - 1)
        if after_step is not None:
            after_step(step)
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


def track_heldout(
    model: nn.Module, tokenizer: Any, data: StudyData, settings: dict[str, Any], curve: list, steps: int, step: int
) -> None:
    """Every ``eval_every`` steps before the last: append ``[step, held-out loss, seconds]`` to ``curve`` (the model
    as it trains: FALQON's forward includes any unmerged ``B`` exactly, so nothing is flushed)."""
    every = settings.get("eval_every") or 0
    if not every or step % every or step >= steps:
        return
    start = time.perf_counter()
    with torch.no_grad():
        loss = evaluate_model(model, tokenizer, data, next(model.parameters()).device, False, settings)["heldout_loss"]
    curve.append([step, loss, time.perf_counter() - start])


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
    batches: list = []
    if run.train:
        # torchao's float8 GEMMs need the weight gradient's token count divisible by 16 (an epoch's last, short
        # batch can hold one sequence of odd length)
        multiple = FP8_GEMM_ALIGNMENT if run.kind == "peer" else 1
        batches = fixed_batches(data.train, settings["batch_size"], settings["steps"], run.seed, data.pad_id, multiple)
    model = factory.build(run, settings, batches)
    result: dict[str, Any] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    losses, proxy = [], None
    if run.train:
        proxy = proxy_callback(run, model, len(batches)) if run.kind == "falqon" else None
        curve: list[list[float]] = []
        track = functools.partial(track_heldout, model, tokenizer, data, settings, curve, len(batches))
        train_start = time.perf_counter()
        losses = train(model, batches, settings, device, proxy, step_context(run), track)
        result["train_s"] = time.perf_counter() - train_start - sum(seconds for _, _, seconds in curve)
        result["heldout_curve"] = curve
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
            "refreshes": proxy.refreshes,
            "rows_refreshed": proxy.rows_refreshed,
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
    p.add_argument("--study", choices=STUDIES, default="main", help="which run plan (quality_runs.py)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "quality-out"))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; ablations use the first")
    p.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--max-length", type=int, help=f"training sequence length (default {DEFAULTS['max_length']})")
    p.add_argument("--lr", type=float, help="peak learning rate of every variant (default 1e-3; long: 2e-4)")
    p.add_argument(
        "--warmup", type=int, help="linear warm-up steps (default steps // 10, then cosine to 0.1 lr; long: 3%%)"
    )
    p.add_argument("--grad-clip", type=float, help="gradient-norm clipping (default 1.0 as the configs; long: 3.0)")
    p.add_argument("--rank", type=int, help="LoRA rank r of every variant (default 16; long: 64)")
    p.add_argument(
        "--eval-every", type=int, help="held-out loss every N steps during training (controls/long; long: steps/10)"
    )
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
    p.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("QUALITY_JOBS") or 1),
        help="start this many --shard processes on this machine, wait, then report (default $QUALITY_JOBS or 1)",
    )
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
    long = args.study == "long"
    if long and not args.smoke:
        defaults = {**defaults, "steps": LONG["steps"]}
    settings = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    steps = settings["steps"]

    def pick(value: Any, usual: Any, paper: Any) -> Any:
        return value if value is not None else paper if long else usual

    settings.update(
        smoke=args.smoke,
        lr=pick(args.lr, 1e-3, LONG["lr"]),
        warmup=pick(args.warmup, steps // 10, round(LONG["warmup_fraction"] * steps)),
        grad_clip=pick(args.grad_clip, 1.0, LONG["grad_clip"]),
        rank=pick(args.rank, 16, LONG["rank"]),
        tasks=[*BENCH_TASKS, "mmlu_subset"],
        mmlu_subjects=list(MMLU_SUBJECTS),
    )
    if args.study != "main":  # (the main study keeps its settings, hence its key: earlier records still count)
        settings.update(
            study=args.study,
            alpha=LONG["alpha"] if long else settings["rank"],
            k=LONG["k"] if long else "r",
            scheduler=LONG["scheduler"] if long else "cosine",
            calibration_batches=CALIBRATION_BATCHES,
            eval_every=pick(args.eval_every, 0, steps // 10),
        )
    return settings


def plan_study(args: argparse.Namespace, settings: dict[str, Any]) -> list[Run]:
    """The runs of ``--study`` (``quality_runs.py``)."""
    variants = args.variants.split(",") if args.variants else None
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.study == "controls":
        return plan_controls(seeds, settings["rank"], variants, settings["steps"])
    if args.study == "long":
        return plan_long(seeds, settings["rank"], settings["alpha"], settings["k"], variants, settings["steps"])
    return plan_runs(seeds, settings["rank"], variants, args.ablations, args.ablation_base, args.export_check)


def run_shards(argv: list[str], jobs: int, out: Path) -> None:
    """Run this study as ``jobs`` concurrent ``--shard I/N`` processes (logs: ``<out>/shard_I.log``) and wait; they
    start from this process's working directory, the repository root, as ``python -m benchmarks.quality``."""
    children = []
    # One host thread each (the step is Python dispatch); expandable segments: less fragmentation in a shared GPU.
    env = {"OMP_NUM_THREADS": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **os.environ}
    env["PYTHONUNBUFFERED"] = "1"
    for index in range(jobs):
        command = [sys.executable, "-m", "benchmarks.quality", *argv, "--jobs", "1", "--shard", f"{index}/{jobs}"]
        with (out / f"shard_{index}.log").open("w") as log_file:
            children.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env))
    for index, child in enumerate(children):
        if child.wait():
            log(f"shard {index}/{jobs} exited with {child.returncode}; see {out / f'shard_{index}.log'}")
    log(f"{jobs} shards done")


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
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    settings = study_settings(args)
    study = study_key(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RECORDS
    runs = plan_study(args, settings)
    if args.jobs > 1 and args.shard is None and not args.report_only:
        if not args.smoke:
            smollm2_path()  # convert the packaged model once, before the shards load it
        log(f"study {study}: {len(runs)} runs in {args.jobs} shards; settings {settings}")
        run_shards(argv, args.jobs, args.out)
        report(args.out, study, [r.name for r in runs])
        return 0
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
            records = read_records(path)  # with what concurrent shards finished meanwhile
            estimate = estimate_seconds(run, records, study)
            if not fits(time.monotonic() - _START, estimate, args.time_budget):
                left = len(todo) - index + 1
                log(f"time budget: {left} runs left for the next call (next: {run.key}, ~{estimate:.0f} s)")
                break
            log(f"run {index}/{len(todo)} {run.key} ...")
            record = run_record(run, factory, tokenizer, data, study, settings)
            record["shard"] = args.shard  # runs of concurrent shards share the GPU: their step_ms is not a speed
            append_record(path, record)
            log(_run_line(run, record))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.shard is None:  # concurrent shards leave the report to one --report-only call after them
        report(args.out, study, [r.name for r in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
