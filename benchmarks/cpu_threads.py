"""Quickstart-shaped FALQON train step on the CPU with 1 vs 2 torch threads, alternating (README, "Set up and run").

SmolLM2-135M-Instruct (embedded), random ``A`` init, batch 4 x 96 tokens, AdamW on ``B``; prints seconds per step and
the load average before each measurement. Run on the machine in question: ``python -m benchmarks.cpu_threads``.
"""

from __future__ import annotations

import os
import time

import torch

from falqon_lit.backbone import load_model, resolve_backbone
from falqon_lit.config import FalqonConfig
from falqon_lit.convert import convert_model


def main(rounds: int = 2, steps: int = 3) -> None:
    """Time ``steps`` train steps per thread count, ``rounds`` times."""
    model = load_model(resolve_backbone(None), torch.float32)
    model.config.use_cache = False
    model.train()
    convert_model(model, FalqonConfig(init="random"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, model.config.vocab_size, (4, 96), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    for round_ in range(rounds):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds = (time.perf_counter() - start) / steps
            print(f"round {round_} threads {threads}: {seconds:.2f} s/step (load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
