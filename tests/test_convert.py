"""convert_model on tiny random Hugging Face causal LMs of several families, and on the real SmolLM2-135M."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from falqon_lit.config import FalqonConfig, ScaleGranularity
from falqon_lit.convert import convert_model, dense_state_dict
from falqon_lit.layer import FalqonLinear, falqon_layers

_COMMON = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_attention_heads": 4}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_attention_heads": 4, "pad_token_id": 0}),
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**_COMMON, **extra)
    return getattr(transformers, model_name)(config).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _train_steps(model: nn.Module, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("weight_scaling", list(ScaleGranularity))
def test_convert_model_tiny_families(family, weight_scaling):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference_logits = model(ids).logits
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    report = convert_model(model, FalqonConfig(rank=16, weight_scaling=weight_scaling))
    assert len(report.converted) == n_linears - 1  # every decoder-block linear; lm_head stays high precision
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert all(isinstance(m, FalqonLinear) for m in falqon_layers(model).values())
    assert report.trainable_params == sum(m.lora_B.numel() for m in falqon_layers(model).values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.lora_B" for n in report.converted}
    assert report.fp8_bytes == sum(m.weight_fp8.numel() for m in falqon_layers(model).values())
    with torch.no_grad():
        logits = model(ids).logits
    err = _rel(logits, reference_logits)
    print(f"{family}/{weight_scaling.value}: converted {len(report.converted)}, logits rel. error {err:.4f}")
    assert err < 0.1  # FP8 weights and activations in every block layer of a random model: a few percent
    losses = _train_steps(model, ids, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]


def test_convert_model_default_config_is_reproducible_and_leaves_the_rng_alone():
    # init: gradient (the default) draws its provisional A from a generator seeded by each layer's name
    first, again, alone = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    report = convert_model(first, FalqonConfig())
    convert_model(again, FalqonConfig())
    convert_model(alone, FalqonConfig(), group_projections=False)
    assert torch.equal(torch.get_rng_state(), rng)  # data order etc. seeded before a conversion stay as they were
    assert report.grouped  # grouped projections get the A a layer converted alone gets
    layers = [falqon_layers(m) for m in (first, again, alone)]
    for name, layer in layers[0].items():
        for other in layers[1:]:
            assert torch.equal(layer.weight_fp8.view(torch.uint8), other[name].weight_fp8.view(torch.uint8)), name
            assert torch.equal(layer.weight_scale, other[name].weight_scale), name
    a_0, a_1 = (layers[0][f"model.layers.{i}.self_attn.q_proj"].lora_A() for i in (0, 1))
    assert not torch.equal(a_0, a_1)  # each layer its own draw


def test_convert_model_target_modules_and_ignore():
    model = tiny_model("llama")
    report = convert_model(
        model, FalqonConfig(target_modules=["q_proj", "v_proj"], ignore=["layers.1.self_attn.v_proj"])
    )
    assert report.converted == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert "model.layers.1.self_attn.v_proj" in report.skipped
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_convert_model_skips_and_reports_unaligned_layers():
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 40)]))
    report = convert_model(model, FalqonConfig())
    assert report.converted == ["0.0"]
    assert "not multiples of 16" in report.skipped["0.1"]


def test_convert_model_unaligned_layers_fail_when_not_skipping():
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 40)]))
    with pytest.raises(ValueError, match=r"layer '0.1': dims \(64, 40\) not multiples of 16"):
        convert_model(model, FalqonConfig(skip_unaligned=False))


def test_convert_model_rejects_unknown_target_names():
    with pytest.raises(ValueError, match=r"target_modules \['qkv'\] match no nn.Linear.*q_proj"):
        convert_model(tiny_model("llama"), FalqonConfig(target_modules=["q_proj", "qkv"]))


def test_convert_model_rejects_model_without_convertible_layers():
    with pytest.raises(ValueError, match=r"no convertible nn\.Linear"):
        convert_model(nn.Sequential(nn.Linear(64, 64)), FalqonConfig())  # no decoder blocks


def test_convert_model_rank_too_large_names_the_layer():
    with pytest.raises(ValueError, match=r"rank must be < .*'model.layers.0.self_attn.q_proj'"):
        convert_model(tiny_model("llama"), FalqonConfig(rank=64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_scaling": "channelwise"}, "weight_scaling must be one of 'tensor', 'row'"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"target_modules": []}, "target_modules must be None or a non-empty list"),
    ],
)
def test_falqon_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FalqonConfig(**kwargs)


def test_falqon_config_recipes():
    assert FalqonConfig.from_recipe("fp8-row").weight_scaling == ScaleGranularity.ROW
    assert FalqonConfig.from_recipe("paper", rank=32).rank == 32
    with pytest.raises(ValueError, match="unknown FALQON recipe 'int4'"):
        FalqonConfig.from_recipe("int4")


def test_dense_state_dict_equals_deq_w_plus_ba():
    model = tiny_model("llama")
    convert_model(model, FalqonConfig())
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    dense = dense_state_dict(model, torch.float64)["model.layers.0.mlp.down_proj.weight"]
    expected = layer.dequantized_weight(torch.float64) + layer.lora_B.double() @ layer.lora_A(torch.float64)
    assert torch.equal(dense, expected)


@pytest.mark.slow
@pytest.mark.parametrize("scaling", list(ScaleGranularity))
def test_convert_model_real_smollm2_stays_close_and_trains(scaling: ScaleGranularity):
    from falqon_lit.assets import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2(torch.float32)
    model.eval()
    chat = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And which river flows through it?"},
        {"role": "assistant", "content": "The Seine flows through Paris, from east to west, before it reaches the "
         "English Channel at Le Havre."},
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(chat, tokenize=False)  # 82 tokens: agreement is not one token's luck
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        reference_logits = model(ids).logits
    # Random A: the SVD of 210 error matrices costs minutes on 2 CPU cores and does not change the logits (B = 0).
    report = convert_model(model, FalqonConfig(rank=16, init="random", weight_scaling=scaling, act_scaling=scaling))
    assert len(report.converted) == 30 * 7 and not report.skipped
    with torch.no_grad():
        logits = model(ids).logits
    err = _rel(logits, reference_logits)
    agree = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    print(f"SmolLM2-135M: FP8 logits relative error {err:.4f}, next-token agreement {agree:.2%}")
    # Measured on these 82 tokens: tensor scales 0.149 relative error, 90.2% argmax agreement; row weight scales
    # with per-token activations 0.188 and 86.6% (SmolLM2 has outlier activations). A wrong scale or layout gives
    # O(1) error and chance-level agreement.
    assert err < 0.3 and agree > 0.8
    model.train()
    losses = _train_steps(model, ids, steps=3, lr=1e-2)
    assert losses[-1] < losses[0]
