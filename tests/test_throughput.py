"""Throughput callback (tokens, FLOPs, MFU peaks), the FP8-engaged report, and the step profiler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fp8_devices import requires_cuda_fp8
from lightning.pytorch import Trainer
from tiny_models import tiny_llama, tiny_llama_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from falqon_lit.callbacks import FitSummary, StepProfiler, Throughput
from falqon_lit.callbacks.throughput import device_peaks, flops_per_token, fp8_engagement
from falqon_lit.config import FalqonConfig
from falqon_lit.convert import convert_model
from falqon_lit.kernel_profile import family


def test_fp8_engagement_names_fallbacks_and_reasons() -> None:
    torch.manual_seed(0)
    model = tiny_llama(intermediate_size=120)  # gate/up/down dims not multiples of 16: they stay high precision
    report = convert_model(model, FalqonConfig(rank=16, init="random"))
    line = fp8_engagement(report, model)
    assert line.startswith("8/14 projections; fell back to high precision: ")
    assert "4 dims (64, 120) not multiples of 16" in line and "2 dims (120, 64) not multiples of 16" in line
    assert "model.layers.1.mlp.down_proj" in line and "model.layers.0.self_attn.q_proj" not in line
    assert line.endswith("; lm_head fp32 by design")
    assert fp8_engagement(report, model, "bf16").endswith("; lm_head bf16 by design")  # under bf16-mixed
    aligned = tiny_llama()
    assert fp8_engagement(convert_model(aligned, FalqonConfig(rank=16, init="random")), aligned) == (
        "14/14 projections; lm_head fp32 by design"
    )


def test_flops_per_token_counts_the_gemms_of_a_training_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 320))  # a FALQON layer, then a frozen "lm_head"
    convert_model(model, FalqonConfig(rank=16, init="random", b_policy="zero", target_modules=["0"]))
    tokens = 32
    x = torch.randn(tokens, 64, requires_grad=True)  # inside a model every layer's input gradient is needed
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert flops_per_token(model) * tokens == counter.get_total_flops()


def test_device_peaks_by_name() -> None:
    assert device_peaks("NVIDIA H200") == (989.0, 1979.0)
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989.0, 1979.0)
    assert device_peaks("NVIDIA H100 PCIe") == (756.0, 1513.0)
    assert device_peaks("NVIDIA GeForce RTX 3090") is None


def test_profile_families_cover_cuda_kernels_and_cpu_operators() -> None:
    assert family("nvjet_sm90_qqtst_128x256") == "FP8 GEMM"
    assert family("aten::_scaled_mm") == "FP8 GEMM"
    assert family("aten::mm") == "GEMM (bf16/fp32)"
    assert family("_row_quant_kernel") == "FALQON quantization"
    assert family("aten::add_") == "other"


def test_fit_reports_tokens_fp8_engagement_and_writes_a_step_profile(tiny_trainer_parts, tmp_path: Path) -> None:
    module, data = tiny_trainer_parts(module_kwargs={"model": tiny_llama_config(intermediate_size=120)})
    throughput, summary, profiler = Throughput(log_every_n_steps=2), FitSummary(1, num_samples=0), StepProfiler(1)
    trainer = Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[throughput, summary, profiler],
    )
    trainer.fit(module, datamodule=data)
    # Tokens: the real tokens of the 4 batches trained, the first 4 of epoch 0.
    sampler = data._train_loader.batch_sampler
    real = sum(sampler.lengths[i] for batch in sampler.batches()[:4] for i in batch)
    assert sum(w[1] for w in throughput.windows) == real and [w[0] for w in throughput.windows] == [2, 2]
    assert throughput.peaks is None  # CPU: MFU omitted, with a note
    rows = dict(summary.summary_rows(trainer, module, 1.0))
    assert rows["FP8 engaged"].startswith("8/14 projections; fell back to high precision")
    assert rows["MFU"].startswith("n/a: no peak known for 'cpu'")
    assert float(rows["tokens/s (non-padding)"].split()[0].replace(",", "")) > 0
    assert "perf/tokens_per_s" in trainer.callback_metrics and "perf/mfu_fp8" not in trainer.callback_metrics
    text = profiler.path.read_text()
    assert profiler.path == tmp_path / "profile_step_1.txt" and text.startswith("step 1: CPU ")
    assert "GEMM (bf16/fp32)" in text and "top operators:" in text


@pytest.mark.gpu
@requires_cuda_fp8
def test_gpu_fit_packs_by_default_and_reports_mfu(tiny_trainer_parts, tmp_path: Path) -> None:
    module, data = tiny_trainer_parts(data_kwargs={"packing": None})  # the default: packed on a GPU
    throughput = Throughput(log_every_n_steps=2)
    trainer = Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[throughput],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert data.packs_training() and "position_ids" in next(iter(data.train_dataloader()))
    assert throughput.fp8_line == "14/14 projections; lm_head bf16 by design"
    assert throughput.peaks == device_peaks(torch.cuda.get_device_name())
    assert ("perf/mfu_fp8" in trainer.callback_metrics) == (throughput.peaks is not None)
