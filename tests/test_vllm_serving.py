"""benchmarks/serve_check.py: comparisons and process plumbing on CPU; vLLM serving a fine-tuned SmolLM2 on a GPU."""

from __future__ import annotations

import gc
import itertools
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fp8_devices import requires_cuda_fp8

from benchmarks import serve_check
from benchmarks.serving import compare, procs, smollm2
from falqon_lit.config import FalqonConfig
from falqon_lit.export import export_model
from falqon_lit.layer import FalqonLinear

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- comparisons
def test_greedy_agreement_counts_identical_leading_tokens() -> None:
    want = [[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]]
    got = [[1, 2, 3, 4], [1, 2, 9, 4], [6, 6, 7, 8], [1, 2]]  # the last one stopped early
    summary = compare.greedy_agreement(want, got)
    assert summary["leading_identical"] == [4, 2, 0, 2]  # tokens after the first divergence do not count
    assert summary["prompts_identical"] == 1
    assert summary["first_token_identical"] == 3
    assert summary["prefix_agreement"] == 8 / 16


def test_greedy_agreement_rejects_unpaired_prompts() -> None:
    with pytest.raises(ValueError, match="zip"):
        compare.greedy_agreement([[1], [2]], [[1]])


@pytest.mark.parametrize("leading_none", [True, False], ids=["with-leading-none", "without"])
def test_token_logprobs_takes_each_prompt_token_not_the_top_one(leading_none: bool) -> None:
    lp = SimpleNamespace
    entries = [{7: lp(logprob=-0.5), 3: lp(logprob=-0.1)}, {9: lp(logprob=-2.0), 1: lp(logprob=-0.3)}]
    prompt_logprobs = [None, *entries] if leading_none else entries
    assert compare.token_logprobs(prompt_logprobs, [5, 7, 9]) == [-0.5, -2.0]


def test_token_logprobs_rejects_a_length_mismatch() -> None:
    with pytest.raises(ValueError, match="1 entries for a 3-token prompt"):
        compare.token_logprobs([None], [5, 7, 9])


def test_logprob_diff_max_and_mean_over_all_tokens() -> None:
    diff = compare.logprob_diff([[-1.0, -2.0], [-3.0]], [[-1.5, -2.0], [-2.0]])
    assert diff == {"max_abs": 1.0, "mean_abs": 0.5, "tokens": 3}


def test_bound_check_limits_and_unmeasured_value() -> None:
    assert compare.bound_check("a", 0.75, low=0.75).passed
    assert not compare.bound_check("a", 0.74, low=0.75).passed
    assert not compare.bound_check("b", 0.2, high=0.1).passed
    assert compare.bound_check("c", 0.5, low=0.0, high=1.0).limit == ">= 0 and <= 1"
    assert not compare.bound_check("d", None, low=0.0).passed


def test_chat_requests_cut_before_the_first_assistant_turn() -> None:
    conversations = [
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "x"},
        ],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
    ]
    assert smollm2.chat_requests(conversations, 5) == [conversations[0][:1], conversations[1]]
    assert len(smollm2.chat_requests(conversations, 1)) == 1


def test_judge_vllm_passes_runtime_noise_and_fails_a_broken_model() -> None:
    trainer_fp32 = ([[1, 2, 3], [4, 5, 6]], [[-1.0, -2.0], [-3.0, -4.0]])
    trainer = ([[1, 2, 9], [4, 5, 6]], [[-1.2, -2.0], [-3.0, -4.2]])  # bf16 noise: mean |diff| 0.1
    close = ([[1, 7, 7], [4, 5, 6]], [[-1.1, -2.1], [-3.1, -4.3]])  # mean |diff| 0.1 <= 1.5 x 0.1
    broken = ([[8, 8, 8], [9, 9, 9]], [[-9.0, -9.0], [-9.0, -9.0]])
    checks, facts = compare.judge_vllm(trainer_fp32, trainer, close)
    assert [c.passed for c in checks] == [True, True, None]  # full greedy identity is reported, not judged
    assert checks[2].value == "1/2 prompts (67% tok)"
    assert facts["trainer_bf16_vs_fp32"]["greedy"]["prompts_identical"] == 1
    checks, _ = compare.judge_vllm(trainer_fp32, trainer, broken)
    assert [c.passed for c in checks] == [False, False, None]
    assert compare.passed([{"passed": True}, {"passed": None}]) and not compare.passed([{"passed": None}])


# ------------------------------------------------------------------------------------------ trainer reference
@pytest.mark.parametrize("act_scaling", ["tensor", "row"])  # one prompt at a time / all prompts in one batch
def test_trainer_reference_matches_hf_greedy_and_loss(tiny_trainer_parts, act_scaling: str) -> None:
    torch.manual_seed(0)
    module, _ = tiny_trainer_parts({"falqon": FalqonConfig(act_scaling=act_scaling)})
    module.configure_model()
    model = module.model
    prompts = [[1, 17, 42, 99, 5], [3, 200, 7], [9, 8]]
    greedy, logprobs = smollm2.trainer_reference(model, prompts, 6)
    model.eval()
    for ids, tokens, lps in zip(prompts, greedy, logprobs, strict=True):
        x = torch.tensor([ids])
        hf = model.generate(input_ids=x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
        hf = hf[0, len(ids) :].tolist()
        assert hf and tokens[: len(hf)] == hf  # HF stops at EOS; the reference loop does not
        assert len(tokens) == 6 and len(lps) == len(ids) - 1
        with torch.no_grad():
            loss = model(input_ids=x, labels=x, use_cache=False).loss  # mean NLL of tokens 1..T-1
        assert -sum(lps) / len(lps) == pytest.approx(float(loss), rel=1e-5)


def test_cast_parameters_keeps_fp8_bytes_scales_and_float32_rope(tiny_trainer_parts) -> None:
    module, _ = tiny_trainer_parts()
    module.configure_model()
    model = module.model
    layers = [m for m in model.modules() if isinstance(m, FalqonLinear)]
    before = [(m.weight_fp8.view(torch.uint8).clone(), m.weight_scale.clone()) for m in layers]
    smollm2.cast_parameters(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for layer, (data, scale) in zip(layers, before, strict=True):
        assert torch.equal(layer.weight_fp8.view(torch.uint8), data) and torch.equal(layer.weight_scale, scale)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- process plumbing
def test_vllm_env_keeps_values_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.2.3")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    procs.set_vllm_env()
    env = procs.serve_env()
    assert env["VLLM_HOST_IP"] == "10.1.2.3"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


def test_serve_command_binds_localhost_on_its_port(tmp_path: Path) -> None:
    cmd = procs.serve_command(tmp_path, 8123, 0.3)
    assert cmd[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    options = dict(itertools.pairwise(cmd))  # each flag -> the word after it
    assert options["--host"] == "127.0.0.1" and options["--port"] == "8123"
    assert options["--gpu-memory-utilization"] == "0.3" and options["--generation-config"] == "vllm"
    assert "--enforce-eager" in cmd


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_wait_healthy_until_health_answers_then_stop(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("ok")  # http.server answers GET /health with this file: status 200
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert procs.wait_healthy(proc, port, timeout=30) is None
    finally:
        procs.stop(proc)
    assert proc.returncode is not None


def test_wait_healthy_reports_a_server_that_exited() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert procs.wait_healthy(proc, _free_port(), timeout=30) == "server exited with status 3 before becoming healthy"


def test_run_logged_echoes_progress_keeps_results_and_kills_on_timeout(tmp_path: Path, capsys) -> None:
    script = textwrap.dedent(
        """
        import time
        print("[serve_check 00:00:00 +0s] working", flush=True)
        print("noise from a library", flush=True)
        print('RESULT {"a": 1}', flush=True)
        time.sleep(60)
        """
    )
    log = tmp_path / "child.log"
    code, results = procs.run_logged([sys.executable, "-c", script], log, timeout=5, group=True)
    assert code is None
    assert results == ['{"a": 1}']
    assert "noise from a library" in log.read_text()
    out = capsys.readouterr().out
    assert "working" in out and "noise" not in out


def test_run_logged_returns_the_exit_status(tmp_path: Path) -> None:
    code, results = procs.run_logged([sys.executable, "-c", "raise SystemExit(4)"], tmp_path / "x.log", timeout=30)
    assert (code, results) == (4, [])


def test_main_records_a_failed_part_and_exits_1(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.serve_check", "--part", "smollm2", "--out", str(out)]
    cmd += ["--ckpt", str(tmp_path / "missing.ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)  # run from the repo root, as documented
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "serve_smollm2.json").read_text())
    (check,) = summary["parts"]["smollm2"]["checks"]
    assert not check["passed"] and "does not exist" in check["value"]
    assert not summary["passed"]
    assert proc.stdout.rstrip().endswith("overall: FAIL")
    assert {p.name for p in out.iterdir()} == {"serve_smollm2.json", "smollm2.json", "smollm2.log"}


def test_format_table_lists_every_check_and_failed_loads() -> None:
    summary = {
        "device": "NVIDIA H100",
        "versions": {"vllm": "0.26.0"},
        "passed": False,
        "parts": {
            "smollm2": {"checks": [{"name": "greedy", "value": 0.9, "limit": ">= 0.75", "passed": True}]},
            "7b": {
                "checks": [{"name": "loads", "value": "timed out", "limit": "loads", "passed": False}],
                "export_bf16": {"gib": 12.6},
                "loads": {"bf16": {"error": "timed out after 170 s"}},
            },
        },
    }
    lines = serve_check.format_table(summary).splitlines()
    assert any(line.startswith("smollm2") and line.endswith("PASS") for line in lines)
    assert any(line.startswith("7b") and line.endswith("FAIL") for line in lines)
    assert any("bf16" in line and "timed out after 170 s" in line for line in lines)
    assert lines[-1] == "overall: FAIL"


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda_fp8
def test_vllm_serves_finetuned_smollm2_within_fp8_noise_of_trainer(tmp_path: Path) -> None:
    procs.set_vllm_env()  # before vllm is imported
    pytest.importorskip("vllm", reason="vLLM is not installed (staged wheels: vllm-0.26.0.txt)")
    module, data, facts = smollm2.train_smollm2(steps=8, max_seconds=120, recipe="fp8-row", limit=200, root=tmp_path)
    assert facts["steps"] == 8
    model, tokenizer = module.model, module.tokenizer
    prompts = smollm2.prompt_ids(tokenizer, data.sample_prompts(4))
    folder = tmp_path / "fp8"
    export_model(model, tokenizer, "vllm", folder, verify=False)
    trainer_fp32 = smollm2.trainer_reference(model, prompts, 16)
    smollm2.cast_parameters(model, smollm2.export_dtype(folder))
    trainer = smollm2.trainer_reference(model, prompts, 16)
    del module, model
    gc.collect()
    torch.cuda.empty_cache()

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = smollm2.load_llm(folder, 0.3, enforce_eager=True)
    try:
        vllm = smollm2.vllm_reference(llm, prompts, 16)
    finally:
        del llm
        cleanup_dist_env_and_memory()
    checks, facts = compare.judge_vllm(trainer_fp32, trainer, vllm)
    assert all(c.passed is not False for c in checks), (checks, facts)
