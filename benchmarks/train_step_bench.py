"""End-to-end training-step benchmark on a LLaMA-7B-shaped model with random weights (CUDA).

Each variant runs in its own process (clean peak-memory numbers): build the model in bf16 on the GPU, wrap it
(FALQON conversion, or PEFT LoRA for the bf16 peer), then time full optimizer steps (forward, backward, AdamW on
the adapter, and for FALQON the row-wise proxy update) on a fixed random batch.

Usage:
    python benchmarks/train_step_bench.py --variants falqon-tensor,falqon-row,peft-bf16 --ckpt off,on --json out.json
    python benchmarks/train_step_bench.py --layers 4   # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def run_variant(args: argparse.Namespace) -> dict:
    """Time one variant in this process; returns the measurements."""
    import torch

    torch.manual_seed(0)
    model = _build(args)
    proxy_ms: list[float] = []
    if args.variant.startswith("falqon"):
        from falqon_lit import FalqonConfig, convert_model, falqon_layers
        from falqon_lit.proxy_graph import ProxyUpdater

        scaling = args.variant.split("-")[1]
        # Random A init: the speed does not depend on it, and 224 SVDs of 4096x11008 would dominate setup.
        cfg = FalqonConfig(rank=args.rank, weight_scaling=scaling, act_scaling="tensor", init="random")
        convert_model(model, cfg)
        updater = ProxyUpdater(list(falqon_layers(model).values()), use_cuda_graph=not args.no_graph)

        def after_step() -> None:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            updater(args.rank)  # k = r rows per layer per step, as the reference implementation
            torch.cuda.synchronize()
            proxy_ms.append((time.perf_counter() - t0) * 1e3)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS))

        def after_step() -> None:
            pass

    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (args.batch, args.seq), device="cuda")
    step_ms = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(step_ms)
    return {
        "variant": args.variant,
        "grad_ckpt": bool(args.ckpt),
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "step_ms": median,
        "tokens_per_s": args.batch * args.seq / median * 1e3,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "proxy_update_ms": statistics.median(proxy_ms[args.warmup :]) if proxy_ms else None,
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="falqon-tensor,falqon-row,peft-bf16")
    parser.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings to run")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-graph", action="store_true", help="update layers one by one (no CUDA graph)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--child-ckpt", type=int, dest="child_ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        args.ckpt = args.child_ckpt
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return

    results = []
    for ckpt in args.ckpt.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant, "--child-ckpt", str(int(ckpt == "on"))]
            cmd += ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
            cmd += ["--rank", str(args.rank), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            cmd += ["--no-graph"] if args.no_graph else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"{variant} ckpt={ckpt}: FAILED: {' | '.join(tail)}", flush=True)
                results.append({"variant": variant, "grad_ckpt": ckpt == "on", "error": " | ".join(tail)})
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)

    print(f"\n{'variant':16s} {'ckpt':5s} {'step ms':>9s} {'tok/s':>9s} {'peak GiB':>9s} {'proxy ms':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:16s} {r['grad_ckpt']!s:5s} failed")
            continue
        proxy = f"{r['proxy_update_ms']:9.1f}" if r["proxy_update_ms"] is not None else f"{'-':>9s}"
        print(
            f"{r['variant']:16s} {r['grad_ckpt']!s:5s} {r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} "
            f"{r['peak_mem_gib']:9.1f} {proxy}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
