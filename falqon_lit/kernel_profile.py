"""Where a profiled step's time goes: kernel (CUDA) or operator (CPU) time by family, then the top entries.

Shared by ``falqon fit --profile N`` (``callbacks.StepProfiler``) and ``benchmarks/profile_step.py``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

FAMILIES = (  # (label, lower-case substrings of kernel or operator names); the first match wins
    ("FALQON quantization", ("_amax_kernel", "_cast_kernel", "_row_quant_kernel")),
    ("proxy update", ("_row_stats_kernel", "_requantize_kernel", "topk", "radixsort")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    # cuBLAS names its Hopper FP8 kernels nvjet_sm90_qq* (E4M3 x E4M3) and qr*/rq* (with E5M2); CPU: aten::_scaled_mm.
    ("FP8 GEMM", ("e4m3", "e5m2", "f8f8", "fp8", "_qqtst", "_qrtst", "_rqtst", "_scaled_mm")),
    ("GEMM (bf16/fp32)", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("adam",)),
)


def family(name: str) -> str:
    """The family of a kernel or operator name, or ``other`` (elementwise, norms, copies, reductions)."""
    lower = name.lower()
    return next((label for label, keys in FAMILIES if any(k in lower for k in keys)), "other")


def kernel_table(prof: torch.profiler.profile, title: str, top: int = 15) -> str:
    """A short report of a finished profile: self time by family, then the ``top`` kernels or operators.

    CUDA kernels are read when the profile holds any (their device time); otherwise CPU operators (self CPU time).
    """
    averages = prof.key_averages()
    on_device = any(e.self_device_time_total for e in averages)
    where = "GPU" if on_device else "CPU"
    entries = [
        (e.key, (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3, e.count) for e in averages
    ]
    entries = [e for e in entries if e[1] > 0]
    totals: dict[str, float] = defaultdict(float)
    for name, ms, _ in entries:
        totals[family(name)] += ms
    total_ms = sum(totals.values())
    lines = [f"{title}: {where} {total_ms:.1f} ms by family"]
    for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:22s} {ms:8.1f} ms  {100 * ms / max(total_ms, 1e-9):5.1f}%")
    lines.append(f"top {'kernels' if on_device else 'operators'}:")
    for name, ms, count in sorted(entries, key=lambda k: -k[1])[:top]:
        lines.append(f"  {ms:8.1f} ms  {count:5d}x  {family(name):20s} {name[:90]}")
    return "\n".join(lines)
