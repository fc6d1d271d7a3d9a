"""Recompiles of ``--model.compile`` decoder blocks over real chit-chat batches, per batching mode (CPU or GPU).

Usage: python -m benchmarks.recompiles [--steps 40] [--max-length 1024] [--batch 8] [--backend eager] [--json out.json]
A small random Llama (FP8-aligned, SmolLM2 vocabulary) has its blocks compiled as ``FalqonLitModule`` does
(``compile_blocks``) and runs forward and backward over the first ``--steps`` training batches of each mode.
Compilations are the graphs ``torch._dynamo`` compiled (its ``unique_graphs`` counter); dynamo decides recompiles
from its guards before any backend runs, so the cheap ``eager`` backend counts the same graphs as inductor. Each
mode runs twice: with dynamo's automatic dynamic shapes (the default: after a second length it compiles one
dynamic-length graph) and without (one graph per shape, which is what CUDA graphs need).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from benchmarks.harness import write_json
from falqon_lit.backbone import load_tokenizer, resolve_backbone
from falqon_lit.data import InstructionDataModule

MODES = {  # name: (packing, pad_to_multiple_of)
    "grouped": (False, 1),
    "grouped+bucket64": (False, 64),
    "packed": (True, 1),
}


def _model(vocab: int, max_length: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_length,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def count(data: InstructionDataModule, steps: int, backend: str, dynamic: bool) -> dict:
    """Compile a fresh model's blocks, run ``steps`` training batches; the distinct shapes and graphs compiled."""
    torch._dynamo.reset()
    counters.clear()
    model = _model(len(data.tokenizer), data.max_length)
    for block in model.model.layers:
        block.compile(backend=backend, dynamic=None if dynamic else False)
    shapes = set()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=dynamic, cache_size_limit=1024):
        for i, batch in enumerate(data.train_dataloader()):
            if i == steps:
                break
            shapes.add(tuple(batch["input_ids"].shape))
            kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
            mask = None if kwargs else batch["attention_mask"]
            # The decoder stack only: the lm_head's (B, T, 49152) logits would cost GBs and compile nothing.
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=mask, **kwargs).last_hidden_state
            hidden.float().square().mean().backward()
    return {"shapes": len(shapes), "graphs_compiled": counters["stats"]["unique_graphs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="eager", help="torch.compile backend (eager counts the same recompiles)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = InstructionDataModule("chitchat", max_length=args.max_length, batch_size=args.batch)
    data.prepare(load_tokenizer(resolve_backbone(None)))
    results = []
    for mode, (packing, multiple) in MODES.items():
        data.packing, data.pad_to_multiple_of = packing, multiple
        for dynamic in (True, False):
            row = {"mode": mode, "automatic_dynamic": dynamic, "steps": args.steps}
            results.append({**row, **count(data, args.steps, args.backend, dynamic)})
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'mode':18s} {'dynamic':>8s} {'shapes':>7s} {'graphs compiled':>16s}  ({args.steps} steps)")
    for r in results:
        print(f"{r['mode']:18s} {r['automatic_dynamic']!s:>8s} {r['shapes']:7d} {r['graphs_compiled']:16d}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
