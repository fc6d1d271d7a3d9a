"""FP8 checkpoint import: compressed-tensors (tensor, channel, block) and native fp8 (block) folders become FALQON
backbones whose W rows are the source's bytes and scales, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fp8_checkpoints import SCHEMES, write_fp8_checkpoint
from safetensors.torch import load_file
from tiny_models import tiny_llama

from falqon_lit.backbone import load_model, resolve_backbone
from falqon_lit.config import FalqonConfig, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.fp8.numerics import compact_block_scale, dequantize, expand_block_scale
from falqon_lit.fp8_checkpoint import UnsupportedCheckpointError, detect_fp8_checkpoint
from falqon_lit.layer import falqon_layers

EXPECTED = {  # scheme → (weight scaling, activation scaling)
    "ct-tensor": (ScaleGranularity.TENSOR, ScaleGranularity.TENSOR),
    "ct-channel": (ScaleGranularity.ROW, ScaleGranularity.ROW),
    "ct-block": (ScaleGranularity.BLOCK, ScaleGranularity.BLOCK),
    "fp8-block": (ScaleGranularity.BLOCK, ScaleGranularity.BLOCK),
}
TINY_FP8 = {"hidden_size": 192, "intermediate_size": 320}  # 192 and 320: partial 128-wide edge blocks


@pytest.fixture(params=SCHEMES)
def fp8_folder(request, tmp_path: Path) -> Path:
    """A tiny random Llama quantized into one FP8 format (fresh weights each run)."""
    torch.manual_seed(torch.seed() % 2**31)
    return write_fp8_checkpoint(tiny_llama(**TINY_FP8), tmp_path / request.param, request.param)


def _source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def _imported(folder: Path, **config) -> torch.nn.Module:
    model = load_model(resolve_backbone(str(folder), tokenizer=str(folder)), torch.float32)
    convert_model(model, FalqonConfig(rank=16, **config))
    return model


def test_detect_fp8_checkpoint_reads_each_scheme(fp8_folder):
    source = detect_fp8_checkpoint(fp8_folder)
    assert (source.weight_scaling, source.act_scaling) == EXPECTED[fp8_folder.name]


def test_detect_fp8_checkpoint_ignores_plain_folders(tmp_path):
    tiny_llama(**TINY_FP8).save_pretrained(tmp_path)
    assert detect_fp8_checkpoint(tmp_path) is None


def test_import_keeps_source_bytes_and_scales_exactly(fp8_folder):
    source = _source_tensors(fp8_folder)
    scale_key = "weight_scale_inv" if fp8_folder.name.startswith("fp8") else "weight_scale"
    # The user's config asks for another scheme than any source has: the checkpoint's scheme wins, with a warning.
    with pytest.warns(UserWarning, match="they replace weight_scaling='tensor', act_scaling='row'"):
        model = _imported(fp8_folder, weight_scaling="tensor", act_scaling="row")
    layers = falqon_layers(model)
    assert len(layers) == 14  # 7 projections × 2 blocks
    weight_scaling, act_scaling = EXPECTED[fp8_folder.name]
    for name, layer in layers.items():
        assert (layer.config.weight_scaling, layer.config.act_scaling) == (weight_scaling, act_scaling)
        src_fp8, src_scale = source[f"{name}.weight"], source[f"{name}.{scale_key}"]
        assert torch.equal(layer.weight_fp8[: layer.out_features].view(torch.uint8), src_fp8.view(torch.uint8))
        rows = layer.weight_scale_rows
        if weight_scaling == ScaleGranularity.BLOCK:
            assert torch.equal(compact_block_scale(rows), src_scale)
            src_scale = expand_block_scale(src_scale, layer.out_features)
        else:
            assert torch.equal(rows.flatten(), src_scale.flatten())
        # deq(W) is the source's dequantized weight, element for element (float64).
        want = dequantize(src_fp8, src_scale, torch.float64)
        assert torch.equal(layer.dequantized_weight(torch.float64), want)
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A().abs().sum() > 0


def test_import_gives_a_blocks_of_their_own(tmp_path):
    torch.manual_seed(torch.seed() % 2**31)
    folder = write_fp8_checkpoint(tiny_llama(**TINY_FP8), tmp_path / "ct-block", "ct-block")
    for layer in falqon_layers(_imported(folder)).values():
        a_scale = layer.weight_scale[layer.out_features :]
        # A's 16 rows form a block row of their own: one scale per 128 columns, set by A alone, so every group
        # of A reaches 448 (were it W's block, A's small values would sit far below).
        a_fp8 = layer.weight_fp8[layer.out_features :].float()
        groups = -(-layer.in_features // 128)
        assert a_scale.shape == (16, groups) and torch.equal(a_scale, a_scale[:1].expand(16, groups))
        group_amax = torch.nn.functional.pad(a_fp8.abs(), (0, groups * 128 - layer.in_features)).reshape(
            16, groups, 128
        )
        assert torch.all(group_amax.amax(dim=(0, 2)) == 448.0)


@pytest.mark.parametrize(
    ("quantization_config", "match"),
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\]"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}},
            },
            "format 'pack-quantized'",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}}},
            },
            "4-bit float weights",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "g": {
                        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False},
                    }
                },
            },
            "static input activation scales",
        ),
    ],
)
def test_detect_fp8_checkpoint_rejects_unsupported_schemes(tmp_path, quantization_config, match):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": quantization_config})
    )
    with pytest.raises(UnsupportedCheckpointError, match=match):
        detect_fp8_checkpoint(tmp_path)


@pytest.mark.slow
def test_import_smollm2_in_each_format_keeps_bytes_and_tracks_the_model(tmp_path):
    """The packaged SmolLM2-135M in every format (576/192/1536 wide: partial edge blocks), imported as FALQON."""
    from falqon_lit.assets import load_smollm2

    base, tokenizer = load_smollm2(torch.float32)
    ids = tokenizer("The capital of France is Paris, a city on the Seine.", return_tensors="pt").input_ids
    with torch.no_grad():
        want = float(base(input_ids=ids, labels=ids).loss)
    for scheme in SCHEMES:
        model, _ = load_smollm2(torch.float32)  # fresh: compressed-tensors quantizes in place
        folder = write_fp8_checkpoint(model, tmp_path / scheme, scheme)
        source = _source_tensors(folder)
        imported = _imported(folder).eval()
        layers = falqon_layers(imported)
        assert len(layers) == 30 * 7
        for name, layer in layers.items():
            src = source[f"{name}.weight"].view(torch.uint8)
            assert torch.equal(layer.weight_fp8[: layer.out_features].view(torch.uint8), src)
        with torch.no_grad():
            got = float(imported(input_ids=ids, labels=ids).loss)
        # FP8 weights and activations move SmolLM2's loss by a few percent; a wrong scale or layout moves it by
        # far more (a block scale applied to the wrong rows turns the model into noise: loss ~10).
        assert abs(got - want) / want < 0.05, (scheme, got, want)
