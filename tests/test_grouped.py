"""Projection groups: one melded FP8 GEMM for q/k/v (gate/up) equals the per-projection layers it stands for."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
from fp8_devices import DEVICES, gemm_rtol
from test_convert import tiny_model
from torch import nn

from falqon_lit.config import BPolicy, FalqonConfig, ScaleGranularity
from falqon_lit.convert import convert_model
from falqon_lit.export.vllm import fp8_tensors, plan_vllm_export
from falqon_lit.grouped import GroupedFalqonLinear, ProjectionGroup, projection_groups
from falqon_lit.layer import FalqonLinear, falqon_layers
from falqon_lit.proxy import select_rows
from falqon_lit.proxy_updater import ProxyUpdater

OUT_FEATURES = (64, 32, 32)  # q, k, v of a GQA block


GROUPABLE = [ScaleGranularity.TENSOR, ScaleGranularity.ROW]
"""Weight scalings a projection group can share (block-scaled layers run one GEMM each)."""

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (FP8 compared as bytes)."""
    fp8 = a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if fp8 else torch.equal(a, b)


def _group(device: str, scaling: ScaleGranularity, seed: int) -> tuple[list[GroupedFalqonLinear], list[FalqonLinear]]:
    """Grouped projections, and plain ``FalqonLinear`` copies holding the same bytes, scales, B and bias."""
    torch.manual_seed(seed)
    config = FalqonConfig(rank=16, weight_scaling=scaling, act_scaling=scaling, b_policy=BPolicy.KEEP)
    linears = [nn.Linear(96, n, bias=True, device=device) for n in OUT_FEATURES]
    members = [GroupedFalqonLinear.from_linear(lin, config, name=f"p{i}") for i, lin in enumerate(linears)]
    ProjectionGroup(members)
    singles = []
    for member in members:
        single = FalqonLinear(96, member.out_features, config, bias=True, device=device)
        single.load_state_dict(member.state_dict())
        single.salt = member.salt  # the stochastic merge rounding's seed
        singles.append(single)
    return members, singles


def _fill_b(layers: list[FalqonLinear], which: list[bool]) -> None:
    torch.manual_seed(1)
    noise = [torch.randn_like(layer.lora_B) * 0.05 for layer in layers]
    with torch.no_grad():
        for layer, b, fill in zip(layers, noise, which, strict=True):
            if fill:
                layer.lora_B.copy_(b)


def _run(layers: list[FalqonLinear], x: torch.Tensor, grad_ys: list[torch.Tensor]) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(True)
    ys = [layer(x) for layer in layers]
    torch.autograd.backward(ys, grad_ys)
    return [*ys, x.grad, *(layer.lora_B.grad for layer in layers)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaling", GROUPABLE)
@pytest.mark.parametrize("residual", [(False, False, False), (True, False, True)])
def test_group_matches_per_projection_layers_and_float64_reference(device, scaling, residual):
    members, singles = _group(device, scaling, seed=torch.seed() % 2**31)  # fresh inputs each run
    _fill_b(members, list(residual))
    _fill_b(singles, list(residual))
    x = torch.randn(3, 7, 96, device=device)
    grad_ys = [torch.randn(3, 7, n, device=device) for n in OUT_FEATURES]
    grouped = _run(members, x, grad_ys)
    single = _run(singles, x, grad_ys)
    assert members[0]._projection_group.calls == 1  # one GEMM for all three
    # Forward and grad_B: the same Q(x), the same bytes, the same dot product per output: bit for bit on CPU; cuBLAS
    # may pick another kernel (split-K) for the wider GEMM, so on CUDA to the GEMM's accumulation tolerance.
    for got, want in zip(grouped[:3] + grouped[4:], single[:3] + single[4:], strict=True):
        assert torch.equal(got, want) if device == "cpu" else _rel(got, want) < gemm_rtol(device)
    # grad_x: one E5M2 quantization of the concatenated gradient, one GEMM: equals its float64 reference ...
    want = reference.group_grad_input(members, grad_ys, list(residual))
    assert _rel(grouped[3], want) < gemm_rtol(device)
    # ... and the per-projection sum to E5M2 rounding (2 mantissa bits: ~2^-3 per element, ~4% in norm here).
    assert _rel(grouped[3], single[3]) < 0.08


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_convert_model_groups_known_families_and_keeps_per_projection_state(family):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    report = convert_model(model, FalqonConfig(rank=16))
    convert_model(plain, FalqonConfig(rank=16), group_projections=False)
    blocks = len(model.model.layers)
    assert len(report.grouped) == 2 * blocks and not report.ungrouped
    assert sorted(len(g) for g in report.grouped) == [2] * blocks + [3] * blocks
    grouped_state, plain_state = model.state_dict(), plain.state_dict()
    assert list(grouped_state) == list(plain_state)  # the same names in the same order: no group keys
    for name, tensor in plain_state.items():  # row scales: the same bytes and scales, projection by projection
        assert _same(grouped_state[name], tensor), name
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert all((g.calls, g.alone) == (1, 0) for g in projection_groups(model))  # each block: one GEMM per group
    assert set(falqon_layers(model)) == set(falqon_layers(plain))


def test_convert_model_block_scales_run_ungrouped_with_reason():
    config = FalqonConfig(rank=16, weight_scaling=ScaleGranularity.BLOCK, act_scaling=ScaleGranularity.BLOCK)
    report = convert_model(tiny_model("llama"), config)
    assert not report.grouped and report.ungrouped
    assert all("is not row or tensor" in reason for reason in report.ungrouped.values())


@pytest.mark.parametrize("family", ["gpt_neox", "phi3"])
def test_convert_model_unknown_families_run_ungrouped_with_reason(family):
    report = convert_model(tiny_model(family), FalqonConfig(rank=16))
    assert not report.grouped and "no known projection groups" in report.ungrouped["*"]


@pytest.mark.parametrize("scaling", GROUPABLE)
def test_grouped_vllm_export_tensors_equal_ungrouped_layout(scaling):
    config = FalqonConfig(rank=16, weight_scaling=scaling, act_scaling=ScaleGranularity.ROW)
    grouped, plain = tiny_model("llama"), tiny_model("llama")
    convert_model(grouped, config)
    convert_model(plain, config, group_projections=False)
    # The same strategy for both (the ungrouped tensor-scaled shards differ in scale, so 'auto' picks channel there).
    got = fp8_tensors(grouped, plan_vllm_export(grouped, "channel"), torch.bfloat16)
    want = fp8_tensors(plain, plan_vllm_export(plain, "channel"), torch.bfloat16)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert (got[name].shape, got[name].dtype) == (tensor.shape, tensor.dtype), name
        if scaling == ScaleGranularity.ROW:  # row scales: the very same bytes
            assert _same(got[name], tensor), name
    if scaling == ScaleGranularity.TENSOR:
        # One scale per group, written identically for each shard: vLLM's fused QKV loads it without re-rounding.
        assert plan_vllm_export(grouped).weight_strategy == "tensor"
        tensors = fp8_tensors(grouped, plan_vllm_export(grouped), torch.bfloat16)
        for group in projection_groups(grouped):
            names = [n for n, m in falqon_layers(grouped).items() if getattr(m, "_projection_group", None) is group]
            scales = [tensors[f"{n}.weight_scale"] for n in names]
            assert all(s.shape == (1,) and torch.equal(s, scales[0]) for s in scales)


def test_group_proxy_update_writes_the_shared_storage_and_matches_single_layers():
    members, singles = _group("cpu", ScaleGranularity.ROW, seed=3)
    _fill_b(members, [True] * 3)
    _fill_b(singles, [True] * 3)
    for member, single in zip(members, singles, strict=True):
        rows = member.proxy_update(4)
        single.proxy_update(4, rows)
        assert _same(member.weight_fp8, single.weight_fp8)
    group = members[0]._projection_group
    assert _same(group.weight_fp8[: members[0].weight_fp8.shape[0]], singles[0].weight_fp8)
    x = torch.randn(5, 96)
    for member, single in zip(members, singles, strict=True):
        assert torch.equal(members[0](x) if member is members[0] else member(x), single(x))


def test_group_relinks_after_buffers_are_replaced_and_survives_deepcopy():
    members, singles = _group("cpu", ScaleGranularity.ROW, seed=4)
    group = members[0]._projection_group
    members[1]._buffers["weight_fp8"] = members[1].weight_fp8.clone()  # what a device move does
    x = torch.randn(4, 96)
    ys = [m(x) for m in members]
    assert group.weight_fp8.data_ptr() == members[0].weight_fp8.data_ptr()  # re-stacked and re-linked
    assert all(torch.equal(y, s(x)) for y, s in zip(ys, singles, strict=True))
    twins = copy.deepcopy(nn.ModuleList(members))
    twin_group = twins[0]._projection_group
    assert twin_group is not group and twin_group.weight_fp8.data_ptr() == twins[0].weight_fp8.data_ptr()


def test_group_cache_miss_runs_the_projection_alone_with_the_same_bits():
    members, singles = _group("cpu", ScaleGranularity.ROW, seed=5)
    x, other = torch.randn(4, 96), torch.randn(4, 96)
    members[0](x)
    assert torch.equal(members[1](other), singles[1](other))  # another input: alone, same result
    assert torch.equal(members[2](x), singles[2](x))  # still served from the pending group output
    assert (members[0]._projection_group.calls, members[0]._projection_group.alone) == (1, 1)


def test_grouped_blocks_under_torch_compile_still_share_one_gemm():
    model = tiny_model("llama")
    convert_model(model, FalqonConfig(rank=16))
    plain = copy.deepcopy(model)
    for block in model.model.layers:
        block.compile(backend="aot_eager")  # dynamo's graph breaks around the opaque FALQON layers, no codegen
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    # The projections receive the same input tensor object across graph breaks: no projection runs alone.
    assert all((g.calls, g.alone) == (2, 0) for g in projection_groups(model))
    assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_grouped_tensor_scale_set_weight_requantizes_at_one_shared_scale():
    members, _ = _group("cpu", ScaleGranularity.TENSOR, seed=6)
    new_w = torch.randn(32, 96) * 10  # larger amax: the shared scale must grow
    members[1].set_weight(new_w, members[1].lora_A())
    scales = [m.weight_scale for m in members]
    assert all(torch.equal(s, scales[0]) for s in scales)
    assert torch.equal(scales[0], new_w.abs().amax().reshape(1) / torch.finfo(torch.float8_e4m3fn).max)
    assert _rel(members[1].dequantized_weight(), new_w) < 0.05  # E4M3 rounding


def test_grouped_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        convert_model(model, FalqonConfig(rank=16))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        # Forward, then the recomputation in backward: two group GEMMs per group with checkpointing.
        assert all(group.calls == 1 + checkpointing for group in projection_groups(model))
    assert list(grads[0]) == list(grads[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaling", GROUPABLE)
def test_grouped_proxy_updater_matches_the_same_projections_alone(device, scaling):
    members, singles = _group(device, scaling, seed=torch.seed() % 2**31)
    updater = ProxyUpdater(members)  # on CUDA: eager, then capture and replay on the group's views
    x = torch.randn(8, 96, device=device)
    for _ in range(4):
        with torch.no_grad():
            for a, b in zip(members, singles, strict=True):
                delta = torch.randn_like(a.lora_B) * 0.05
                a.lora_B.add_(delta)
                b.lora_B.add_(delta)
        updater(4)
        for member, single in zip(members, singles, strict=True):
            single.proxy_update(4, select_rows(single.lora_B, 4))
            assert _same(member.weight_fp8, single.weight_fp8) and _same(member.weight_scale, single.weight_scale)
        ys = [m(x) for m in members]
        assert members[0]._projection_group.alone == 0
        for y, single in zip(ys, singles, strict=True):
            assert torch.equal(y, single(x)) if device == "cpu" else _rel(y, single(x)) < gemm_rtol(device)


def test_grouped_state_dict_holds_separate_tensors_and_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_model, save_model

    model, twin = tiny_model("llama"), tiny_model("llama", seed=1)
    convert_model(model, FalqonConfig(rank=16))
    convert_model(twin, FalqonConfig(rank=16))
    state = model.state_dict()
    storages = [t.untyped_storage().data_ptr() for n, t in state.items() if n.endswith(("weight_fp8", "weight_scale"))]
    assert len(set(storages)) == len(storages)  # no two tensors share a storage (safetensors refuses that)
    save_model(model, str(tmp_path / "m.safetensors"))
    load_model(twin, str(tmp_path / "m.safetensors"))  # copied into the twin's group views
    ids = torch.randint(0, 256, (2, 8))
    assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all((g.calls, g.alone) == (1, 0) for g in projection_groups(twin))
