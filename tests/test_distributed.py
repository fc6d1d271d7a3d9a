"""Data-parallel and row-sharded FALQON on 2 CPU processes (gloo): DDP = one process, replicas stay identical, a
corrupted replica is caught, the sharded run equals DDP, resumes bit-exactly from its sharded checkpoint, and gathers
into one export folder.

Each run is ``tests/distributed_run.py`` in a subprocess (Lightning launches rank 1 itself): ~15-30 s each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from falqon_lit.callbacks.replica_check import ReplicaConsistencyCheck, fingerprint
from falqon_lit.config import BPolicy, FalqonConfig, Rounding, ScaleGranularity
from falqon_lit.fp8.numerics import dequantize
from falqon_lit.layer import FalqonLinear, falqon_layers
from falqon_lit.layer_base import FalqonLayer
from falqon_lit.sharded import ShardedFalqonLinear, gather_falqon_model

RUN = Path(__file__).with_name("distributed_run.py")
CORRUPTED = "model.model.layers.1.mlp.down_proj"
STATS = ("merge_magnitude",)
"""float32 sums over rows; the sharded run adds per-rank partial sums, so only the order of additions differs."""


def _launch(mode: str, tokenizer: Path, out: Path, *extra: str, fabric: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONWARNINGS"] = "ignore"
    script = [str(RUN), "--mode", mode, "--tokenizer", str(tokenizer), "--out", str(out), *extra]
    launcher = []
    if fabric:  # Lightning's launcher (`fabric run`): torchrun starts both processes, the Trainer joins them
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = ["-m", "lightning.fabric.cli", "--accelerator", "cpu", "--devices", "2", "--main-port", str(port)]
    command = [sys.executable, *launcher, *script]
    return subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=out.parent)


def _result(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_chat_tokenizer_dir: Path) -> dict[str, Path]:
    """The single-process, DDP, sharded, resumed-sharded and `fabric run`-launched DDP runs (6 optimizer steps each,
    global batch 8; the default init, but SVD for the single-process run and a DDP run to compare it with)."""
    root = tmp_path_factory.mktemp("dist")
    outs = {}
    for name, mode, extra in (
        ("single", "single", ("--init", "svd")),
        ("ddp-svd", "ddp", ("--init", "svd")),
        ("ddp", "ddp", ()),
        ("sharded", "sharded", ()),
        ("resumed", "sharded", ("--resume", str(root / "sharded" / "ckpt" / "epoch=0-step=3.ckpt"))),
        ("fabric-run", "ddp", ()),
    ):
        outs[name] = root / name
        done = _launch(mode, tiny_chat_tokenizer_dir, outs[name], *extra, fabric=name == "fabric-run")
        assert done.returncode == 0, f"{name} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return outs


def _fp8_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(".weight_fp8")]


def test_ddp_replicas_identical_after_every_merge(runs: dict[str, Path]) -> None:
    # The run itself passed ReplicaConsistencyCheck(every_n_steps=1) at every step; compare the final states too.
    rank0, rank1 = _result(runs["ddp"], 0)["state"], _result(runs["ddp"], 1)["state"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_default_gradient_init_gives_every_rank_the_same_calibrated_A(runs: dict[str, Path]) -> None:
    # FalqonConfig() calibrates A on gradients summed over ranks: bit-identical on every rank (DDP never broadcasts
    # the FP8 buffers), from the same name-seeded provisional A, and the same A when the rows are sharded.
    ddp = [_result(runs["ddp"], rank)["A"] for rank in (0, 1)]
    sharded = [_result(runs["sharded"], rank)["A"] for rank in (0, 1)]
    assert ddp[0]["weight_fp8"].keys() == ddp[1]["weight_fp8"].keys() and len(ddp[0]["weight_fp8"]) == 14
    for name, weight in ddp[0]["weight_fp8"].items():
        assert torch.equal(weight, ddp[1]["weight_fp8"][name]), name
    for name, calibrated in ddp[0]["calibrated"].items():
        assert not torch.equal(calibrated, ddp[0]["provisional"][name]), name
        for record in (ddp[1], *sharded):
            assert torch.equal(record["provisional"][name], ddp[0]["provisional"][name]), name
            assert torch.equal(record["calibrated"][name], calibrated), name


def test_fabric_run_launches_the_same_ddp_training(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        launched, spawned = _result(runs["fabric-run"], rank), _result(runs["ddp"], rank)
        assert launched["losses"] == spawned["losses"]
        assert launched["state"].keys() == spawned["state"].keys()
        assert all(torch.equal(launched["state"][k], spawned["state"][k]) for k in spawned["state"])


def test_ddp_matches_single_process_to_rounding(runs: dict[str, Path]) -> None:
    # SVD init: the gradient calibration sums the batch in another order on 2 ranks, so A itself would differ by
    # FP8 roundings before the first step; this test is about the steps.
    single, ddp = _result(runs["single"]), _result(runs["ddp-svd"])
    # Per-token activation scales make every sequence's FP8 rounding independent of its micro-batch; what remains
    # is fp32 summation order (one loss over 8 sequences vs the mean of two losses over 4): ~1e-7 in B per step,
    # which now and then moves a merged value across an FP8 rounding boundary.
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), rtol=0, atol=1e-4)
    state_s, state_d = single["state"], ddp["state"]
    assert state_s.keys() == state_d.keys()
    # A B that differs in the last bits can flip a merged value by one FP8 step, or (rarely) swap a near-tied
    # top-k row; measured over the 14 layers after 6 steps: 103 of 90,112 bytes, relative L2 difference 2.3e-3.
    differing = total = 0
    diff_sq = norm_sq = torch.zeros(())
    for key in _fp8_keys(state_s):
        scale_key = key.replace("weight_fp8", "weight_scale")
        w_s = dequantize(state_s[key].view(torch.float8_e4m3fn), state_s[scale_key])
        w_d = dequantize(state_d[key].view(torch.float8_e4m3fn), state_d[scale_key])
        diff_sq, norm_sq = diff_sq + (w_s - w_d).square().sum(), norm_sq + w_s.square().sum()
        differing += int((state_s[key] != state_d[key]).sum())
        total += state_s[key].numel()
    assert differing <= 0.005 * total
    assert diff_sq.sqrt() <= 1e-2 * norm_sq.sqrt()
    for key in state_s:  # everything that is neither FP8 nor merge statistics is exactly equal
        if not key.endswith((".weight_fp8", ".weight_scale")) and ".merge_" not in key:
            assert torch.equal(state_s[key], state_d[key]), key


def test_sharded_matches_ddp_exactly(runs: dict[str, Path]) -> None:
    # Same forward GEMMs on the gathered weight, the same averaged gradient (reduce-scatter instead of all-reduce)
    # and the same global top-k: the row-sharded run is DDP, bit for bit.
    ddp, sharded = _result(runs["ddp"]), _result(runs["sharded"])
    assert sharded["losses"] == ddp["losses"]
    assert sharded["state"].keys() == ddp["state"].keys()
    for key, value in ddp["state"].items():
        if key.endswith(STATS):
            torch.testing.assert_close(sharded["state"][key], value, rtol=1e-6, atol=0)
        else:
            assert torch.equal(sharded["state"][key], value), key
    gathered_on_rank1 = _result(runs["sharded"], 1)["state"]
    for key, value in sharded["state"].items():  # every rank gathers the same full model
        assert torch.equal(gathered_on_rank1[key], value), key


def test_sharded_checkpoint_is_sharded_and_resume_is_bit_exact(runs: dict[str, Path]) -> None:
    ckpt = runs["sharded"] / "ckpt" / "epoch=0-step=3.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    straight, resumed = _result(runs["sharded"]), _result(runs["resumed"])
    assert resumed["losses"] == straight["losses"][3:]
    for key, value in straight["state"].items():
        assert torch.equal(resumed["state"][key], value), key


def test_sharded_export_folder_holds_the_gathered_model(runs: dict[str, Path]) -> None:
    from falqon_lit.export.loading import load_for_export

    source = load_for_export(runs["sharded"] / "saved")
    trained = _result(runs["sharded"])["state"]
    exported = source.model.state_dict()
    for key in _fp8_keys(trained):
        local = key.removeprefix("model.")
        assert torch.equal(exported[local].view(torch.uint8), trained[key]), key
        assert torch.equal(exported[local.replace("weight_fp8", "weight_scale")], trained[key[:-3] + "scale"])


def test_replica_check_fails_on_corrupted_replica(tmp_path: Path, tiny_chat_tokenizer_dir: Path) -> None:
    done = _launch("ddp-corrupt", tiny_chat_tokenizer_dir, tmp_path / "corrupt")
    assert done.returncode != 0
    assert (
        f"ReplicaConsistencyCheck: data-parallel replicas diverged after optimizer step 2: 'weight_fp8' of layer "
        f"'{CORRUPTED}' differs between rank 0 and rank 1 (1 of 42 checked tensors differ)"
    ) in done.stderr


# --------------------------------------------------------------------------------------- in-process, one rank
@pytest.fixture
def one_rank_mesh(tmp_path: Path):
    """A gloo process group and 1-D mesh of world size 1, in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("b_policy", list(BPolicy))
@pytest.mark.parametrize("scaling", list(ScaleGranularity))
def test_sharded_layer_equals_falqon_linear(
    one_rank_mesh, b_policy: BPolicy, scaling: ScaleGranularity, rounding: Rounding
) -> None:
    torch.manual_seed(0)
    config = FalqonConfig(weight_scaling=scaling, act_scaling=scaling, b_policy=b_policy, merge_rounding=rounding)
    full = FalqonLinear.from_linear(torch.nn.Linear(64, 48, bias=True), config, name="layer")
    sharded = ShardedFalqonLinear(full, one_rank_mesh)
    for step in range(3):
        x = torch.randn(2, 5, 64, requires_grad=True)
        outs = []
        for layer in (full, sharded):
            xi = x.detach().clone().requires_grad_(True)
            y = layer(xi)
            (y * torch.linspace(-1, 1, 48)).sum().backward()
            grad_b = layer.lora_B.grad.full_tensor() if isinstance(layer.lora_B.grad, DTensor) else layer.lora_B.grad
            outs.append((y.detach(), xi.grad, grad_b.clone()))
            with torch.no_grad():  # an "optimizer step" that leaves B non-zero
                layer.lora_B.add_(layer.lora_B.grad, alpha=-0.5)
                layer.lora_B.grad = None
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b), step
        rows_full, rows_sharded = full.proxy_update(8), sharded.proxy_update(8)
        assert torch.equal(rows_full, rows_sharded)
    assert full.flush() == sharded.flush()

    state = sharded.state_dict()
    assert isinstance(state["weight_fp8"], DTensor) and isinstance(state["lora_B"], DTensor)
    sharded.load_state_dict(state)
    holder = torch.nn.Module()
    holder.layer = sharded
    gather_falqon_model(holder)
    assert type(holder.layer) is FalqonLinear
    _assert_same_state(full, holder.layer)


def _assert_same_state(full: FalqonLinear, gathered: FalqonLinear) -> None:
    expected, actual = full.state_dict(), gathered.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        value = value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value
        other = actual[key].view(torch.uint8) if actual[key].dtype == torch.float8_e4m3fn else actual[key]
        assert torch.equal(value, other), key


def test_sharded_layer_is_a_falqon_layer_not_a_falqon_linear(one_rank_mesh) -> None:
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.dense, full = (FalqonLinear.from_linear(torch.nn.Linear(64, 48), FalqonConfig()) for _ in range(2))
    holder.sharded = ShardedFalqonLinear(full, one_rank_mesh)
    assert isinstance(holder.sharded, FalqonLayer) and not isinstance(holder.sharded, FalqonLinear)
    assert {name: type(layer) for name, layer in falqon_layers(holder).items()} == {
        "dense": FalqonLinear,
        "sharded": ShardedFalqonLinear,
    }
    with pytest.raises(ValueError, match="chooses its rows over all ranks"):
        holder.sharded.proxy_update(4, torch.arange(4))


def test_sharded_flush_rounds_as_falqon_linear(one_rank_mesh) -> None:
    torch.manual_seed(0)
    full = FalqonLinear.from_linear(torch.nn.Linear(64, 48), FalqonConfig(b_policy=BPolicy.KEEP), name="layer")
    with torch.no_grad():
        full.lora_B.normal_(std=0.05)
    sharded = ShardedFalqonLinear(full, one_rank_mesh)
    assert full.flush(Rounding.STOCHASTIC) == sharded.flush(Rounding.STOCHASTIC) == 48
    holder = torch.nn.Module()
    holder.layer = sharded
    gather_falqon_model(holder)
    _assert_same_state(full, holder.layer)


def test_fingerprint_changes_with_any_byte() -> None:
    tensor = torch.randn(7, 9).to(torch.float8_e4m3fn)
    base = fingerprint(tensor)
    for index in (0, 17, 62):
        flipped = tensor.clone()
        flipped.view(torch.uint8).view(-1)[index] ^= 1
        assert not torch.equal(fingerprint(flipped), base)
    assert torch.equal(fingerprint(tensor.clone()), base)


def test_replica_check_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        ReplicaConsistencyCheck(every_n_steps=0)
