"""benchmarks/peers.py: the LoRA peers wrap a tiny Llama correctly, and missing packages become skip messages."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_VOCAB, tiny_llama
from transformers import LlamaForCausalLM

from benchmarks import peers

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKAGES = {"torchao-fp8-lora": "torchao", "te-fp8-lora": "transformer_engine", "qlora-nf4": "bitsandbytes"}


def _tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return tiny_llama().to(dtype).eval()


def _adapted_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rpartition(".lora_A")[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}


def test_build_peer_peft_bf16_trains_only_lora_and_keeps_output() -> None:
    base = _tiny_llama()
    reference = copy.deepcopy(base)
    model = peers.build_peer(base, "peft-bf16", rank=8, alpha=16, targets=TARGETS)

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(_adapted_module_names(model)) == len(TARGETS) * 2  # every target in both layers, lm_head not
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # B = 0 at init


def test_build_peer_adapters_keep_bf16() -> None:
    # PEFT's default would upcast bf16 adapters to fp32; the peers compare bf16 LoRA.
    model = peers.build_peer(_tiny_llama(torch.bfloat16), "peft-bf16", rank=8, alpha=16, targets=TARGETS)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("fn", [peers.check_available, peers.peer_autocast])
def test_peer_functions_unknown_name_raises(fn) -> None:
    with pytest.raises(ValueError, match="unknown peer 'falqon-x'; choose one of peft-bf16, torchao-fp8-lora"):
        fn("falqon-x")


@pytest.mark.parametrize(("name", "package"), PACKAGES.items())
def test_build_peer_missing_package_raises_skip_message(
    name: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # find_spec answers None: not installed
    with pytest.raises(peers.PeerUnavailableError, match=f"^skipped: {package} not installed$"):
        peers.build_peer(_tiny_llama(), name, rank=8, alpha=16, targets=TARGETS)


def test_build_peer_torchao_converts_only_targets() -> None:
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    model = peers.build_peer(_tiny_llama(), "torchao-fp8-lora", rank=8, alpha=16, targets=TARGETS)

    float8 = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 == {f"{name}.base_layer" for name in _adapted_module_names(model)}
    assert len(float8) == len(TARGETS) * 2 and not isinstance(model.get_output_embeddings(), Float8Linear)
    ids = torch.randint(0, TINY_VOCAB, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name in grads)
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if ".lora_B." in name)


def test_train_step_bench_missing_package_is_a_skipped_row(tmp_path: Path) -> None:
    missing = {name: pkg for name, pkg in PACKAGES.items() if importlib.util.find_spec(pkg) is None}
    if not missing:
        pytest.skip("every peer package is installed here")
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "benchmarks.train_step_bench", "--variants", ",".join(missing)]
    cmd += ["--ckpt", "on", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)  # run from the repo root

    assert proc.returncode == 0, proc.stderr
    expected = [{"variant": n, "grad_ckpt": True, "skipped": f"skipped: {p} not installed"} for n, p in missing.items()]
    assert json.loads(out.read_text()) == expected
    table = proc.stdout.split("\nvariant")[1]
    for name, package in missing.items():
        assert f"{name:24s} on   skipped: {package} not installed" in table
