"""The 7b part of the serving check: a LLaMA-7B-shaped random model converted to FALQON, trained a few steps,
exported FP8 and bf16; vLLM load time, weights memory and decode throughput of each, each load in its own process."""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.train_step_bench import LLAMA_7B

from .compare import Check, bound_check
from .procs import ENTRY, Recorder, log_tail, run_logged, say, set_vllm_env
from .smollm2 import load_llm

MIN_FP8_WEIGHT_SAVING = 0.4
"""The FP8 folder's weights must take at most ``1 − this`` of the bf16 folder's GPU memory (ideal: ~0.48 saved)."""
LOAD_TIMEOUT_S = 170.0
"""Longest a 7b load-and-measure process may run (import, load, compile, CUDA graphs, decode)."""


def build_llama_7b(layers: int = 32) -> nn.Module:
    """A random LLaMA-7B-shaped model (``LLAMA_7B`` of ``train_step_bench.py``) built in bf16 on the GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def train_7b(model: nn.Module, steps: int = 5, batch: tuple[int, int] = (2, 256)) -> dict[str, Any]:
    """Convert to FALQON (``fp8-row``, random ``A``: 224 SVDs would cost minutes) and run a few optimizer steps,
    each followed by the row-wise proxy update, on random tokens."""
    from falqon_lit import FalqonConfig, convert_model, falqon_layers
    from falqon_lit.proxy_updater import ProxyUpdater

    report = convert_model(model, FalqonConfig.from_recipe("fp8-row", init="random"))
    say(report.summary())
    layers = list(falqon_layers(model).values())
    optimizer = torch.optim.AdamW([layer.lora_B for layer in layers], lr=1e-3)
    updater = ProxyUpdater(layers)
    generator = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, batch, device="cuda", generator=generator)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updater(layers[0].rank)
        losses.append(round(float(loss), 4))
    model.eval()
    return {"falqon_layers": len(layers), "steps": steps, "batch": list(batch), "losses": losses}


def folder_gib(folder: Path) -> float:
    """Size of the files in a folder, GiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def _model_memory(worker: Any) -> int:
    # Runs inside vLLM's worker (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0).
    return int(worker.model_runner.model_memory_usage)


def measure_load(folder: Path, eager: bool) -> dict[str, Any]:
    """Load a folder in ``vllm.LLM`` and time greedy decoding of 64 random prompts x 128 tokens (EOS ignored)."""
    set_vllm_env()
    start = time.perf_counter()
    from vllm import SamplingParams

    imported = time.perf_counter()
    llm = load_llm(folder, 0.5, skip_tokenizer_init=True, max_num_seqs=64, enforce_eager=eager)
    loaded = time.perf_counter()
    try:
        weights: float | str = llm.collective_rpc(_model_memory)[0] / 2**30
    except Exception as err:  # the worker API is internal; report instead of failing the measurement
        weights = f"unavailable ({type(err).__name__}: {err})"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(32)]} for _ in range(64)]
    warmup = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], warmup, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "mode": "eager" if eager else "vLLM default (torch.compile + CUDA graphs)",
        "import_s": round(imported - start, 1),
        "load_s": round(loaded - imported, 1),
        "weights_gib": weights,
        "torch_allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "output_tokens": tokens,
        "decode_s": round(seconds, 2),
        "output_tok_per_s": tokens / seconds,
        "device": torch.cuda.get_device_name(),
    }


def run_7b(args: argparse.Namespace, rec: Recorder) -> None:
    """The 7b part (see the module docstring); each load runs in its own process, folders are deleted at the end."""
    from transformers import AutoTokenizer

    from falqon_lit.assets import smollm2_path
    from falqon_lit.export import export_model

    root = Path(tempfile.mkdtemp(prefix="serve_check_7b_", dir="/tmp"))
    try:
        rec.stage("building a LLaMA-7B-shaped random model (bf16, GPU)")
        model = build_llama_7b()
        rec.stage("FALQON conversion (fp8-row, random A) and 5 training steps with proxy updates")
        rec.update(training=train_7b(model))
        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())  # copied into the folders; vLLM runs on token ids
        folders = {}
        for label, target in (("fp8", "vllm"), ("bf16", "hf")):
            rec.stage(f"exporting --target {target} to {root}")
            start = time.perf_counter()
            folders[label] = root / f"llama7b-{label}"
            export_model(model, tokenizer, target, folders[label], verify=False, progress=say)
            seconds = round(time.perf_counter() - start, 1)
            rec.update(**{f"export_{label}": {"target": target, "seconds": seconds, "gib": folder_gib(folders[label])}})
        del model
        gc.collect()
        torch.cuda.empty_cache()

        loads: dict[str, dict[str, Any]] = {}
        for i, (label, folder) in enumerate(folders.items()):
            # The FP8 load goes first and leaves a minute for the bf16 one.
            timeout = min(LOAD_TIMEOUT_S, args.deadline - time.time() - (60 if i == 0 else 5))
            if timeout < 45:
                loads[label] = {"error": f"skipped: {timeout:.0f} s left in the part's budget"}
            else:
                rec.stage(f"vLLM load + decode of the {label} folder (up to {timeout:.0f} s, own process)")
                cmd = [sys.executable, "-m", ENTRY, "--child", "7b-load", "--folder", str(folder)]
                cmd += ["--out", str(args.out)]
                log = args.out / f"7b_load_{label}.log"
                code, results = run_logged([*cmd, *(["--7b-eager"] if args.eager_7b else [])], log, timeout)
                if results:
                    loads[label] = json.loads(results[-1])
                else:
                    why = f"timed out after {timeout:.0f} s" if code is None else f"exit status {code}"
                    loads[label] = {"error": f"{why}; {log.name}: {log_tail(log, 3)}"}
            shutil.rmtree(folder, ignore_errors=True)
            rec.update(loads=loads)
            error = loads[label].get("error")
            rec.check(Check(f"vLLM loads and decodes the {label} folder", error or "yes", "loads", error is None))
        weights = [loads[k].get("weights_gib") for k in ("fp8", "bf16")]
        if all(isinstance(w, float) for w in weights):
            saving = 1 - weights[0] / weights[1]
            rec.check(
                bound_check("GPU weights memory saved by FP8 vs bf16", round(saving, 3), low=MIN_FP8_WEIGHT_SAVING)
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
