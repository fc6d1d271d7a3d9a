"""End-to-end training-step benchmark on a LLaMA-7B-shaped model with random weights (CUDA).

Each variant runs in its own process (clean peak-memory numbers): build the model in bf16 on the GPU, wrap it
(FALQON conversion, or one of the LoRA peers of ``peers.py``), then time full optimizer steps (forward, backward,
AdamW on the adapter, and for FALQON the row-wise proxy update) on a fixed random batch. A peer whose package is not
installed gets a ``skipped`` row; the last table gives FALQON's speedup over each peer at the same checkpointing.

FALQON variants ending in ``-fused`` run the fused block (``--model.fused_block``, the trainer's default): grouped
q/k/v and gate/up GEMMs, RMSNorms and SwiGLUs that write the next GEMM's FP8 input (Triton, per-token scales), and
with Liger Kernel installed its rotary, final RMSNorm and fused linear cross-entropy; the other FALQON variants are
the per-layer path with the eager block (the earlier sessions' runs).

Usage:
    python -m benchmarks.train_step_bench --variants falqon-tensor,peft-bf16,qlora-nf4 --ckpt on,off --json out.json
    python -m benchmarks.train_step_bench --layers 4   # a quick, smaller run of every variant
    python -m benchmarks.train_step_bench --variants falqon-default,peft-bf16 --compile off,on  # torch.compile
    python -m benchmarks.train_step_bench --rows falqon-fused@off,peft-bf16-liger+compile@off,qlora-nf4@on
        # explicit rows: variant[+compile]@ckpt, instead of the variants x ckpt x compile grid
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.harness import write_json
from benchmarks.peers import PEERS, PeerUnavailableError, build_peer, check_available, peer_autocast

LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FALQON_VARIANTS = {
    # name: (FalqonConfig.from_recipe name or None for the defaults, overrides); "-fused": the fused block
    "falqon-tensor": ("paper", {}),  # tensor scales, B zeroed after each merge, nearest merges: sessions 1-3's runs
    "falqon-te": ("paper", {"backend": "te"}),  # the same on Transformer Engine's quantizers and GEMM
    "falqon-default": (None, {}),  # what a user gets: row/per-token scales, B keep, stochastic merges
    "falqon-default-cached": (None, {"transpose_cache": True}),  # a second, transposed FP8 copy of each weight
    "falqon-default-tensor": (None, {"weight_scaling": "tensor", "act_scaling": "tensor"}),
    "falqon-default-tensor-te": (None, {"weight_scaling": "tensor", "act_scaling": "tensor", "backend": "te"}),
    "falqon-fused": (None, {}),  # what `falqon fit` runs now: the defaults with the fused block
    "falqon-tensor-fused": ("paper", {}),
}
VARIANTS = (*FALQON_VARIANTS, *PEERS)


def _build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=args.layers)
    config._attn_implementation = "sdpa"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16: no 27 GB fp32 copy on the way
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model


@dataclass
class TrainStep:
    """One variant built and ready: ``step()`` runs forward, backward, AdamW and, for FALQON, the proxy update."""

    step: Callable[[], None]
    params: list
    """The trainable parameters."""
    config_repr: str | None
    """``FalqonConfig.short_repr()`` of a FALQON variant."""
    proxy_ms: list[float]
    """Wall time of each proxy update so far (FALQON only)."""
    fused: Callable[[], dict] | None = None
    """What the fused block ran (grouped GEMMs, projections that ran alone, Liger), FALQON ``-fused`` only."""


def build_step(args: argparse.Namespace) -> TrainStep:
    """Build ``args.variant`` on the LLaMA-7B shape: model, wrapping, checkpointing, optimizer and a fixed batch."""
    import torch

    is_falqon = args.variant.startswith("falqon")
    if not is_falqon:
        check_available(args.variant)  # before building the 7B-shaped model
    torch.manual_seed(0)
    model = _build(args)
    proxy_ms: list[float] = []
    step_context = contextlib.nullcontext
    config_repr = None
    fused = args.variant.endswith("-fused")
    fused_info: Callable[[], dict] | None = None

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    if is_falqon:
        from falqon_lit import FalqonConfig, convert_model, falqon_layers
        from falqon_lit.fused_block import apply_fused_block, fused_linear_cross_entropy
        from falqon_lit.grouped import projection_groups
        from falqon_lit.proxy_updater import ProxyUpdater

        recipe, overrides = FALQON_VARIANTS[args.variant]
        # Random A init: the speed does not depend on it, and 224 SVDs of 4096x11008 would dominate setup.
        settings = {"rank": args.rank, "init": "random", **overrides}
        cfg = FalqonConfig.from_recipe(recipe, **settings) if recipe else FalqonConfig(**settings)
        config_repr = cfg.short_repr()
        convert_model(model, cfg, group_projections=fused)
        if fused:
            fused_loss, description = apply_fused_block(model, torch.device("cuda"))
            if fused_loss:

                def loss_fn():
                    return fused_linear_cross_entropy(model, ids, None, None, ids, -100)[0]

            groups = projection_groups(model)

            def fused_info() -> dict:  # every projection should take its slice of the group GEMM: alone == 0
                return {"description": description, "alone": sum(g.alone for g in groups)}

        updater = ProxyUpdater(list(falqon_layers(model).values()), use_cuda_graph=not args.no_graph)

        def after_step() -> None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            updater(args.rank)  # k = r rows per layer per step, as the reference implementation
            torch.cuda.synchronize()
            proxy_ms.append((time.perf_counter() - t0) * 1e3)
    else:
        model = build_peer(model, args.variant, rank=args.rank, alpha=args.rank, targets=TARGETS)
        step_context = functools.partial(peer_autocast, args.variant)

        def after_step() -> None:
            pass

    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if args.compile:
        from falqon_lit.backbone import compile_blocks

        compile_blocks(model)  # peers too: the same regional compilation of every decoder block
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (args.batch, args.seq), device="cuda")

    def step() -> None:
        with step_context():  # forward and backward: checkpointing recomputes the forward in backward
            loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()

    return TrainStep(step, params, config_repr, proxy_ms, fused_info)


def run_variant(args: argparse.Namespace) -> dict:
    """Time one variant in this process; returns the measurements."""
    import torch

    run = build_step(args)
    step_ms = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run.step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(step_ms)
    return {
        "variant": args.variant,
        "grad_ckpt": bool(args.ckpt),
        "compile": bool(args.compile),
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "config": run.config_repr,
        "step_ms": median,
        "tokens_per_s": args.batch * args.seq / median * 1e3,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "proxy_update_ms": statistics.median(run.proxy_ms[args.warmup :]) if run.proxy_ms else None,
        "trainable_params": sum(p.numel() for p in run.params),
        "fused": None if run.fused is None else run.fused(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def _run_child(args: argparse.Namespace, variant: str, ckpt: bool, compiled: bool) -> dict:
    """Run one variant in a fresh process; a failure, a timeout or a skip becomes a row, never an exception."""
    cmd = [sys.executable, "-m", "benchmarks.train_step_bench", "--variant", variant, "--child-ckpt", str(int(ckpt))]
    cmd += ["--child-compile", str(int(compiled))]
    cmd += ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--rank", str(args.rank), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--no-graph"] if args.no_graph else []
    variant += "+compile" if compiled else ""  # the label of every row, error rows included
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "grad_ckpt": ckpt, "error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        if "out of memory" in proc.stderr.lower():  # torch, Transformer Engine and bitsandbytes all say so
            return {"variant": variant, "grad_ckpt": ckpt, "error": "out of memory"}
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "grad_ckpt": ckpt, "error": " | ".join(tail)}
    return {**json.loads(lines[-1][len("RESULT ") :]), "variant": variant}  # skipped rows get the label too


def _print_table(results: list[dict]) -> None:
    """Step time, tokens/s and peak memory per run, plus each FALQON variant's speedup over each peer."""
    falqon = [v for v in dict.fromkeys(r["variant"] for r in results) if v.startswith("falqon")]
    step_ms = {(r["variant"], r["grad_ckpt"]): r["step_ms"] for r in results if "step_ms" in r}
    heads = f"{'variant':24s} {'ckpt':4s} {'step ms':>9s} {'tok/s':>9s} {'peak GiB':>9s} {'proxy ms':>9s}"
    print("\n" + heads + "".join(f" {v + ' speedup':>22s}" for v in falqon))
    for r in results:
        head = f"{r['variant']:24s} {'on' if r['grad_ckpt'] else 'off':4s}"
        if "step_ms" not in r:
            print(f"{head} {r.get('skipped') or 'failed: ' + r['error']}")
            continue
        proxy = f"{r['proxy_update_ms']:9.1f}" if r["proxy_update_ms"] is not None else f"{'-':>9s}"
        speedups = ""
        for v in falqon:
            falqon_ms = step_ms.get((v, r["grad_ckpt"]))
            is_peer = not r["variant"].startswith("falqon")
            speedups += f" {r['step_ms'] / falqon_ms:21.2f}x" if is_peer and falqon_ms else f" {'-':>22s}"
        print(f"{head} {r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} {r['peak_mem_gib']:9.1f} {proxy}{speedups}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings to run")
    parser.add_argument("--compile", default="off", help="torch.compile of each decoder block: off, on or off,on")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", default=None, help="explicit rows variant[+compile]@on|off, comma-separated")
    parser.add_argument("--json", "--out", default=None, help="write the results here (rewritten after every run)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one variant may take")
    parser.add_argument("--no-graph", action="store_true", help="update layers one by one (no CUDA graph)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--child-ckpt", type=int, dest="child_ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", type=int, dest="child_compile", default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        args.ckpt, args.compile = args.child_ckpt, args.child_compile
        try:
            result = run_variant(args)
        except PeerUnavailableError as e:
            result = {"variant": args.variant, "grad_ckpt": bool(args.ckpt), "skipped": str(e)}
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.rows:
        rows = [_parse_row(parser, token) for token in args.rows.split(",")]
    else:
        variants = args.variants.split(",")
        if unknown := [v for v in variants if v not in VARIANTS]:
            parser.error(f"--variants has unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        rows = [
            (variant, ckpt == "on", compiled == "on")
            for ckpt in args.ckpt.split(",")
            for variant in variants
            for compiled in args.compile.split(",")
        ]
    results = []
    for variant, ckpt, compiled in rows:
        results.append(_run_child(args, variant, ckpt, compiled))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            write_json(args.json, results)
    _print_table(results)


def _parse_row(parser: argparse.ArgumentParser, token: str) -> tuple[str, bool, bool]:
    """``variant[+compile]@on|off`` -> ``(variant, checkpointing, compiled)``."""
    name, _, ckpt = token.partition("@")
    variant, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    if variant not in VARIANTS or ckpt not in ("on", "off"):
        parser.error(f"--rows entry {token!r} must be variant[+compile]@on|off, variant one of {', '.join(VARIANTS)}")
    return variant, ckpt == "on", compiled


if __name__ == "__main__":
    main()
