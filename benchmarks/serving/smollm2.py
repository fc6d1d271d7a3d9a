"""The smollm2 part of the serving check: fine-tune (or load) SmolLM2, export it for vLLM, and compare ``vllm.LLM``
with the trainer's FP8 model and ``vllm serve`` with offline ``LLM.generate``/``LLM.chat``."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from falqon_lit.config import ScaleGranularity
from falqon_lit.layer import falqon_layers

from .compare import Check, Reference, judge_vllm, token_logprobs
from .procs import (
    SERVED_NAME,
    Recorder,
    free_port,
    log_tail,
    say,
    serve_command,
    serve_env,
    set_vllm_env,
    stop,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_CONFIG = REPO / "configs" / "smollm2-chat.yaml"
NEW_TOKENS = 32
NUM_PROMPTS = 32
SMOLLM2_RESERVE_S = 130.0
"""Seconds the smollm2 part keeps for after training: model set-up, export, references, two vLLM starts, requests."""


# ------------------------------------------------------------------------------------------------ smollm2: model
def falqon_config(recipe: str, yaml_config: Mapping[str, Any]):
    """``yaml``: the FALQON config of ``configs/smollm2-chat.yaml``; otherwise a named recipe (``fp8-row``)."""
    from falqon_lit.config import FalqonConfig

    if recipe == "yaml":
        return FalqonConfig(**yaml_config.get("model", {}).get("falqon", {}))
    return FalqonConfig.from_recipe(recipe)


def train_smollm2(
    steps: int, max_seconds: float, recipe: str, limit: int | None, root: Path
) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune SmolLM2 with the library's module, data module and proxy-update callback on one GPU.

    Optimizer, data and precision settings come from ``configs/smollm2-chat.yaml``; validation, logging and
    checkpoints are off (the check needs a trained model, not its curves). Training stops at ``steps`` optimizer
    steps or after ``max_seconds`` of training, whichever comes first; the callback flushes ``B`` at the end.

    Returns:
        ``(module, data module, facts)``; ``module.model`` is the flushed FALQON model on the GPU.
    """
    import yaml
    from lightning.pytorch import Trainer, seed_everything

    from falqon_lit.callbacks import RowwiseProxyUpdate
    from falqon_lit.data import InstructionDataModule
    from falqon_lit.module import FalqonLitModule
    from falqon_lit.optim import OptimConfig

    config = yaml.safe_load(SMOLLM2_CONFIG.read_text())
    seed_everything(config.get("seed_everything", 42))
    module = FalqonLitModule(falqon=falqon_config(recipe, config), optim=OptimConfig(**config["model"]["optim"]))
    data = InstructionDataModule(**{**config["data"], "num_workers": 0, "limit": limit})
    data.prepare(module.tokenizer, module.context_length)  # tokenizing is CPU time; keep it out of max_time
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision=config["trainer"]["precision"],
        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
        max_steps=steps,
        max_time={"seconds": max(1, int(max_seconds))},
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RowwiseProxyUpdate()],
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    module.cuda()  # Lightning's teardown leaves the model on the CPU; the references must run where it trained
    loss = trainer.callback_metrics.get("train/loss")
    facts = {
        "steps": trainer.global_step,
        "fit_seconds": round(time.perf_counter() - start, 1),
        "last_train_loss": None if loss is None else float(loss),
        "falqon": module.falqon_config.short_repr(),
        "train_examples": len(data.train_data),
    }
    return module, data, facts


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts, special tokens parsed and none added (as ``generate_text`` encodes them)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def chat_requests(conversations: Sequence[list[dict[str, str]]], n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` conversations cut before their first assistant turn (what ``sample_prompts`` renders)."""
    requests = []
    for messages in conversations[:n]:
        first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        requests.append(messages[:first_reply])
    return requests


def export_dtype(folder: Path) -> torch.dtype:
    """The dtype vLLM runs an exported folder in (``dtype`` of its ``config.json``)."""
    config = json.loads((folder / "config.json").read_text())
    return getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters (embeddings, norms, the zero ``B``) to ``dtype``, as a model loaded in that dtype has them.

    Buffers keep theirs: the FP8 bytes and scales, and RoPE's float32 ``inv_freq`` (transformers builds it in
    float32 whatever the load dtype, and vLLM computes its rotary table in float32 too).
    """
    from falqon_lit.layer import flush_all

    for param in model.parameters():
        param.data = param.data.to(dtype)
    flush_all(model)  # B is zero: merges nothing, but re-marks each new B tensor as zero (the forward skips it)


@torch.no_grad()
@torch.no_grad()
def trainer_reference(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int) -> Reference:
    """Greedy tokens and prompt-token log-probs of the model, prompts in left-padded batches (no KV cache).

    One forward per generated token and batch: the cost is the model's per-forward host time (210 FALQON layers), not
    FLOPs, so 32 prompts one by one took minutes on the H100. Padding stays out of every real token's numbers when
    activations have per-token scales (masked in attention, positions count real tokens); with tensor activation
    scales the padding would enter the amax, so each prompt then runs alone.

    Returns:
        ``(greedy tokens per prompt, log p(token_i | tokens_<i) for i >= 1 per prompt)``.
    """
    per_token = all(m.config.act_scaling == ScaleGranularity.ROW for m in falqon_layers(model).values())
    size = len(prompts) if per_token else 1
    greedy: list[list[int]] = []
    logprobs: list[list[float]] = []
    for start in range(0, len(prompts), size):
        tokens, lps = _reference_batch(model, prompts[start : start + size], new_tokens)
        greedy += tokens
        logprobs += lps
    return greedy, logprobs


def _reference_batch(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int) -> Reference:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sequences = [list(ids) for ids in prompts]
    greedy: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = []
    for step in range(new_tokens):
        width = max(map(len, sequences))
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        if step == 0:
            for row, seq in enumerate(sequences):
                prompt = logits[row, width - len(seq) : -1].float().log_softmax(-1)
                logprobs.append(prompt.gather(1, ids[row, width - len(seq) + 1 :, None])[:, 0].tolist())
        for row, token in enumerate(logits[:, -1].argmax(-1).tolist()):
            greedy[row].append(token)
            sequences[row].append(token)
    model.train(was_training)
    return greedy, logprobs


# ------------------------------------------------------------------------------------------------- smollm2: vLLM
def load_llm(folder: Path, gpu_memory_utilization: float, **kwargs: Any) -> Any:
    """``vllm.LLM`` on an exported folder with vLLM's neutral sampling defaults (no generation-config defaults)."""
    from vllm import LLM

    return LLM(
        model=str(folder),
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=1024,
        generation_config="vllm",
        seed=0,
        **kwargs,
    )


def vllm_reference(llm: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> Reference:
    """vLLM's greedy tokens (EOS ignored, like the trainer's loop) and prompt-token log-probs on the same ids."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts], params, use_tqdm=False)
    greedy = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [token_logprobs(o.prompt_logprobs, ids) for o, ids in zip(outputs, prompts, strict=True)]
    return greedy, logprobs


def serve_comparison(llm: Any, port: int, chats: list[list[dict[str, str]]], completions: list[str]) -> dict:
    """Greedy answers of the OpenAI server vs offline ``LLM.chat``/``LLM.generate``, one request at a time each."""
    from openai import OpenAI
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=60.0, max_retries=0)
    pairs: dict[str, list[dict[str, str]]] = {"chat": [], "completion": []}
    for messages in chats:
        offline = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=messages, max_tokens=NEW_TOKENS, temperature=0.0
        )
        pairs["chat"].append({"offline": offline, "server": reply.choices[0].message.content or ""})
    for prompt in completions:
        offline = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
        reply = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0)
        pairs["completion"].append({"offline": offline, "server": reply.choices[0].text})
    return pairs


def run_smollm2(args: argparse.Namespace, rec: Recorder) -> None:
    """The smollm2 part (see the module docstring); results go to ``rec``."""
    from falqon_lit.data import InstructionDataModule
    from falqon_lit.export import export_model, load_for_export
    from falqon_lit.export.verify import DEFAULT_PROMPTS

    set_vllm_env()
    work = Path(tempfile.mkdtemp(prefix="serve_check_smollm2_"))
    serve_log = args.out / "smollm2_serve.log"
    server = None
    try:
        if args.ckpt:
            rec.stage(f"loading {args.ckpt}")
            owner = load_for_export(args.ckpt)
            model, tokenizer = owner.model.cuda(), owner.tokenizer
            data = InstructionDataModule(source="chitchat", limit=args.limit)
            data.prepare(tokenizer)
            rec.update(training={"ckpt": str(args.ckpt)})
        else:
            budget = args.deadline - time.time() - SMOLLM2_RESERVE_S
            rec.stage(f"training SmolLM2 ({args.recipe}): up to {args.steps} steps or {budget:.0f} s")
            owner, data, facts = train_smollm2(args.steps, budget, args.recipe, args.limit, work)
            model, tokenizer = owner.model, owner.tokenizer
            rec.update(training=facts)
        prompts = prompt_ids(tokenizer, data.sample_prompts(NUM_PROMPTS))
        rec.update(prompts={"count": len(prompts), "tokens": [len(p) for p in prompts], "new_tokens": NEW_TOKENS})

        rec.stage("exporting --target vllm")
        folder = work / "smollm2-fp8"
        report = export_model(model, tokenizer, "vllm", folder, verify=False, progress=say)
        plan = json.loads((folder / "falqon_manifest.json").read_text()).get("vllm")
        quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
        rec.update(export={"rows_flushed": report.rows_flushed, "plan": plan, "quantization": quantization})
        dtype = export_dtype(folder)

        # Start the server now so that its start-up overlaps the trainer's reference runs. Until it is healthy this
        # process only allocates GPU memory: vLLM's memory profiler fails if free memory grows while it measures.
        torch.cuda.empty_cache()
        port = free_port()
        with open(serve_log, "w") as log:
            server = subprocess.Popen(
                serve_command(folder, port, 0.3), stdout=log, stderr=subprocess.STDOUT, env=serve_env()
            )
        rec.stage(f"vllm serve starting on 127.0.0.1:{port} (log {serve_log.name}); trainer references")
        ref32 = trainer_reference(model, prompts, NEW_TOKENS)
        cast_parameters(model, dtype)
        ref = trainer_reference(model, prompts, NEW_TOKENS)
        rec.update(
            trainer_dtype=f"{str(dtype).removeprefix('torch.')} parameters (vLLM's, from config.json), FP8 linears"
        )
        health_timeout = min(180.0, args.deadline - time.time() - 75)
        rec.stage(f"waiting up to {health_timeout:.0f} s for /health")
        serve_error = wait_healthy(server, port, health_timeout)
        if serve_error:
            stop(server)  # free its GPU memory before the offline engine starts
        del model, owner
        gc.collect()
        torch.cuda.empty_cache()

        rec.stage("vllm.LLM (in-process, eager) on the export")
        start = time.perf_counter()
        llm = load_llm(folder, 0.4, enforce_eager=True, enable_prefix_caching=False)  # as the server below
        rec.update(vllm_load_seconds=round(time.perf_counter() - start, 1))
        checks, facts = judge_vllm(ref32, ref, vllm_reference(llm, prompts, NEW_TOKENS))
        rec.update(vllm_vs_trainer=facts)
        for check in checks:
            rec.check(check)

        if serve_error:
            rec.check(Check("vllm serve healthy", serve_error, "healthy", False, log_tail(serve_log, 5)))
            return
        rec.check(Check("vllm serve healthy", "yes", "healthy", True))
        rec.stage("OpenAI requests vs offline LLM.chat / LLM.generate")
        try:
            pairs = serve_comparison(llm, port, chat_requests(data.val_conversations, 4), list(DEFAULT_PROMPTS[:4]))
        except Exception as err:  # a client or server error is a failed check, not a crash of the part
            rec.check(Check("OpenAI requests answered", f"{type(err).__name__}: {err}", "answered", False))
            return
        rec.update(serve=pairs)
        for kind, items in pairs.items():
            equal = sum(p["offline"] == p["server"] for p in items)
            rec.check(Check(f"serve {kind} == offline", f"{equal}/{len(items)}", "all equal", equal == len(items)))
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
