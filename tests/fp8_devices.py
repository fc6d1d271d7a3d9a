"""The one place that decides where FP8 tests run: CPU always, CUDA when it has FP8 tensor cores."""

from __future__ import annotations

import pytest
import torch


def cuda_fp8_missing() -> str | None:
    """Why CUDA FP8 tests cannot run here, or ``None`` when they can."""
    if not torch.cuda.is_available():
        return "needs CUDA (no GPU visible to torch)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"needs FP8 tensor cores (compute capability >= 8.9), found {major}.{minor}"
    return None


requires_cuda_fp8 = pytest.mark.skipif(cuda_fp8_missing() is not None, reason=str(cuda_fp8_missing()))

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda_fp8]),
]


def gemm_rtol(device: str) -> float:
    """Relative tolerance of an FP8 GEMM against float64 on the same bytes.

    CPU ``_scaled_mm`` accumulates in fp32 (~K·2⁻²⁴). Hopper FP8 tensor cores keep fewer accumulator bits than
    fp32 (about 14, measured in DeepSeek-V3 §3.3.2), and cuBLAS promotes partial sums to fp32 only every few
    hundred products: we see ~7e-5 at K=64; 5e-4 leaves margin without hiding a wrong scale (which is O(1)).
    """
    return 1e-5 if device == "cpu" else 5e-4
