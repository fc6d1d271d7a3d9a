"""Write the packaged SmolLM2-135M-Instruct as offline stand-ins for published FP8 releases (with its tokenizer), to
fine-tune with ``falqon fit --model.model FOLDER`` and serve back (the GPU session's import → fit → export check).

Usage: python -m benchmarks.make_fp8_checkpoints --out gpu-out/fp8-sources [--schemes ct-channel,ct-block,...]
Schemes: ``ct-tensor``, ``ct-channel``, ``ct-block`` (compressed-tensors' own compressors) and ``fp8-block`` (native
``fp8`` with ``weight_block_size: [128, 128]``); the folders are ``OUT/smollm2-<scheme>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from falqon_lit.assets import load_smollm2
from tests.fp8_checkpoints import SCHEMES, write_fp8_checkpoint  # the tests' asset writer: one definition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    args = parser.parse_args()
    for scheme in args.schemes.split(","):
        if scheme not in SCHEMES:
            raise SystemExit(f"--schemes: unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
        model, tokenizer = load_smollm2(torch.float32)
        folder = write_fp8_checkpoint(model, args.out / f"smollm2-{scheme}", scheme)
        tokenizer.save_pretrained(folder)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
