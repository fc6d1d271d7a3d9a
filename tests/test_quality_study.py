"""Tests for benchmarks/quality.py: run plan, resumable JSONL bookkeeping, summary statistics, and a CPU smoke run."""

from __future__ import annotations

import importlib
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from falqon_lit.config import BPolicy, FalqonConfig, InitMethod, Rounding, ScaleGranularity
from falqon_lit.layer import falqon_layers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    """``benchmarks/quality.py``: the study runner."""
    return importlib.import_module("benchmarks.quality")


@pytest.fixture(scope="module")
def study_runs() -> ModuleType:
    """``benchmarks/quality_runs.py``: the run plans."""
    return importlib.import_module("benchmarks.quality_runs")


@pytest.fixture(scope="module")
def study_records() -> ModuleType:
    """``benchmarks/quality_records.py``: bookkeeping, summary, table."""
    return importlib.import_module("benchmarks.quality_records")


def _record(name: str, seed: int | None, heldout: float, acc: float | None = None, **fields: object) -> dict:
    metrics = {"gsm8k_loss": heldout - 0.5, "chat_loss": heldout + 0.5, "heldout_loss": heldout}
    if acc is not None:
        metrics["bench_acc"] = acc
    record = {
        "study": "s1",
        "key": f"{name}@{'-' if seed is None else seed}",
        "name": name,
        "group": "main",
        "kind": "falqon" if name.startswith("falqon") else "peft",
        "seed": seed,
        "status": "ok",
        "metrics": metrics,
        "merge": None,
        "wall_s": 10.0,
        "loss_curve": [2.0, 1.5, 1.0],
    }
    return {**record, **fields}


# ---------------------------------------------------------------------------------------------------------- plan
def test_plan_runs_orders_befores_main_by_seed_then_ablations(quality: ModuleType, study_runs: ModuleType) -> None:
    runs = quality.plan_runs([0, 1, 2], 16, None, True, None)
    order = ["before", "main", "ablation"]
    assert [r.group for r in runs] == sorted((r.group for r in runs), key=order.index)
    befores = ["before:base", *(f"before:fp8-{s.value}" for s in ScaleGranularity)]  # one per scaling in the study
    assert [r.name for r in runs if r.group == "before"] == befores
    main = [r for r in runs if r.group == "main"]
    assert [r.seed for r in main] == sorted(r.seed for r in main)  # all of seed 0 first, then 1, then 2
    seed0 = [r.name for r in main if r.seed == 0]
    falqon = {  # every scaling x B policy x merge rounding
        f"falqon-{s.value}-{p.value}{'-sr' if m == Rounding.STOCHASTIC else ''}"
        for s in ScaleGranularity
        for p in BPolicy
        for m in Rounding
    }
    assert seed0[0] == "bf16-lora" and set(seed0) == {"bf16-lora", "fp8base-lora", *falqon}
    assert seed0 == [r.name for r in main if r.seed == 2]
    ablations = [r for r in runs if r.group == "ablation"]
    assert [r.name.split(":")[1] for r in ablations] == ["k=1", "k=10", "k=all", "every=4", "every=16", "init=random"]
    default = study_runs.falqon_name(FalqonConfig())  # the ablations vary the library default
    assert default == "falqon-row-keep-sr"
    assert all(r.seed == 0 and not r.bench and r.name.startswith(f"{default}:") for r in ablations)
    assert ablations[-1].falqon.init.value == "random" and ablations[0].falqon.init == FalqonConfig().init
    assert len({r.key for r in runs}) == len(runs)


def test_plan_runs_variant_filter_limits_main_and_befores(quality: ModuleType) -> None:
    runs = quality.plan_runs([3], 16, ["falqon-row-*-sr"], False, None)
    assert [r.name for r in runs if r.group == "before"] == ["before:base", "before:fp8-row"]
    assert {r.name for r in runs if r.group == "main"} == {f"falqon-row-{p.value}-sr" for p in BPolicy}
    assert all(r.seed == 3 for r in runs if r.group == "main")


def test_plan_runs_unknown_ablation_base_raises(quality: ModuleType) -> None:
    with pytest.raises(ValueError, match="--ablation-base must be one of"):
        quality.plan_runs([0], 16, None, True, "bf16-lora")


def test_plan_runs_export_check_retrains_the_ablation_base_last(quality: ModuleType) -> None:
    runs = quality.plan_runs([5, 6], 16, ["bf16-lora"], False, "falqon-row-keep-sr", export_check=True)
    check = runs[-1]
    assert [r.group for r in runs].count("export") == 1 and check.group == "export"
    assert (check.name, check.seed, check.export, check.bench) == ("falqon-row-keep-sr:export", 5, True, True)
    assert (check.falqon.weight_scaling, check.falqon.merge_rounding) == (ScaleGranularity.ROW, Rounding.STOCHASTIC)
    assert "before:fp8-row" in [r.name for r in runs]  # its starting point is evaluated too
    with pytest.raises(ValueError, match="--ablation-base must be one of"):
        quality.plan_runs([0], 16, None, False, "fp8base-lora", export_check=True)


def test_shard_of_splits_runs_round_robin_without_loss(quality: ModuleType, study_records: ModuleType) -> None:
    runs = quality.plan_runs([0, 1], 16, None, True, None)
    shards = [study_records.shard_of(runs, f"{i}/3") for i in range(3)]
    assert sorted(r.key for shard in shards for r in shard) == sorted(r.key for r in runs)
    assert shards[1][:2] == [runs[1], runs[4]] and study_records.shard_of(runs, None) == runs
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            study_records.shard_of(runs, bad)


# --------------------------------------------------------------------------------------------------- bookkeeping
def test_pending_runs_skips_runs_recorded_for_the_same_study(quality: ModuleType, study_records: ModuleType) -> None:
    runs = quality.plan_runs([0], 16, ["bf16-lora", "fp8base-lora"], False, None)
    records = [
        _record("bf16-lora", 0, 2.0),
        _record("before:base", None, 3.0, group="before", study="other-settings"),
        _record("fp8base-lora", 0, 2.0, status="skipped"),
    ]
    assert [r.key for r in study_records.pending_runs(runs, records, "s1")] == ["before:base@-"]
    retried = study_records.pending_runs(runs, records, "s1", retry_failed=True)
    assert [r.key for r in retried] == ["before:base@-", "fp8base-lora@0"]


def test_append_record_after_a_cut_line_keeps_every_record(
    quality: ModuleType, tmp_path: Path, study_records: ModuleType
) -> None:
    path = tmp_path / "quality.jsonl"
    study_records.append_record(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"b": 2, "cut')  # a writer killed mid-line
    study_records.append_record(path, {"c": 3})
    assert study_records.read_records(path) == [{"a": 1}, {"c": 3}]


_APPEND_MANY = """
import sys
from pathlib import Path
from benchmarks.quality_records import append_record
for i in range(40):
    append_record(Path(sys.argv[1]), {"tag": int(sys.argv[2]), "i": i, "pad": "x" * 5000})
"""


def test_append_record_from_concurrent_processes_keeps_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "quality.jsonl"
    workers = [  # from the repo root, where `python -c` imports benchmarks
        subprocess.Popen([sys.executable, "-c", _APPEND_MANY, str(path), str(tag)], cwd=REPO) for tag in range(3)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0]
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses: none interleaved
    assert sorted((r["tag"], r["i"]) for r in records) == [(t, i) for t in range(3) for i in range(40)]


def test_estimate_seconds_falls_back_from_name_to_group(quality: ModuleType, study_records: ModuleType) -> None:
    runs = {
        r.key: r for r in quality.plan_runs([0, 1], 16, ["bf16-lora", "falqon-tensor-zero"], True, "falqon-tensor-zero")
    }
    records = [
        _record("bf16-lora", 0, 2.0, wall_s=20.0),
        _record("falqon-tensor-zero", 0, 2.0, wall_s=40.0),
        _record("falqon-tensor-zero", 1, 2.0, wall_s=50.0),
        _record("bf16-lora", 1, 2.0, wall_s=99.0, study="other"),
        _record("falqon-tensor-zero:k=1", 0, 2.0, wall_s=7.0, status="failed"),
    ]
    assert study_records.estimate_seconds(runs["falqon-tensor-zero@1"], records, "s1") == 45.0  # same name
    assert study_records.estimate_seconds(runs["bf16-lora@1"], records, "s1") == 20.0  # other study ignored
    assert study_records.estimate_seconds(runs["falqon-tensor-zero:k=10@0"], records, "s1") == 45.0  # same kind
    assert study_records.estimate_seconds(runs["bf16-lora@0"], [], "s1") is None


def test_fits_keeps_the_report_reserve(study_records: ModuleType) -> None:
    reserve = study_records.REPORT_RESERVE_S
    assert study_records.fits(100.0, 50.0, 150.0 + reserve)
    assert not study_records.fits(100.0, 50.1, 150.0 + reserve)
    assert study_records.fits(1e9, None, 10.0)  # nothing to estimate from: start
    assert study_records.fits(1e9, 1e9, None)  # no budget


# ------------------------------------------------------------------------------------------------------- summary
def test_summarize_mean_std_and_deltas(study_records: ModuleType) -> None:
    records = [
        _record("before:base", None, 3.0, 0.30, group="before"),
        _record("bf16-lora", 0, 2.0, 0.40),
        _record("bf16-lora", 1, 2.2, 0.50),
        _record("falqon-tensor-zero", 0, 2.1, 0.42, merge={"lost_fraction": 0.9}),
        _record("falqon-tensor-zero", 1, 2.3, 0.44, merge={"lost_fraction": 0.7}),
        _record("falqon-tensor-zero:k=1", 0, 2.31, group="ablation"),
        _record("fp8base-lora", 0, 0.0, status="skipped", reason="skipped: torchao not installed"),
        _record("bf16-lora", 9, 9.9, status="failed", reason="boom"),
        _record("bf16-lora", 9, 2.1, 0.45),  # the retry of the failed run
        _record("bf16-lora", 7, 100.0, study="other"),
    ]
    summary = study_records.summarize(records, "s1")
    main = {row["variant"]: row for row in summary["main"]}
    ref, falqon = main["bf16-lora"], main["falqon-tensor-zero"]
    assert ref["n"] == 3 and ref["heldout_loss"] == pytest.approx(2.1) and ref["heldout_loss_std"] == pytest.approx(0.1)
    assert ref["bench_acc"] == pytest.approx(0.45) and ref["delta_loss_pct"] == 0.0
    assert falqon["heldout_loss"] == pytest.approx(2.2)
    assert falqon["heldout_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert falqon["delta_loss_pct"] == pytest.approx(100 * 0.1 / 2.1)
    assert falqon["delta_acc_pts"] == pytest.approx(-2.0)
    assert falqon["merge_lost_fraction"] == pytest.approx(0.8)
    assert summary["before"][0]["heldout_loss_std"] is None  # one value: no std
    base, k1 = summary["ablation"]
    assert base["variant"].startswith("falqon-tensor-zero (") and base["heldout_loss"] == pytest.approx(2.1)
    assert k1["delta_loss_pct"] == pytest.approx(10.0)  # vs the base at the ablation seed, not vs bf16-lora
    assert k1["bench_acc"] is None and k1["delta_acc_pts"] is None
    assert summary["not_ok"] == [
        {"key": "fp8base-lora@0", "status": "skipped", "reason": "skipped: torchao not installed"}
    ]
    table = study_records.format_table(summary)
    assert "+4.76%" in table and "-2.00pt" in table and "fp8base-lora@0 skipped" in table


def test_summarize_rows_follow_the_plan_not_the_file(study_records: ModuleType) -> None:
    """Concurrent shards append in whatever order they finish: the summary must not depend on it."""
    names = ["bf16-lora", "falqon-nomerge", "bf16-lora-fa-svd", "falqon-row-keep-sr"]
    records = [_record(n, s, 2.0 + i / 10, group="control") for s in (0, 1) for i, n in enumerate(names)]
    plan = ["before:base", *names]
    for seed in range(4):  # a few shuffled file orders
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        summary = study_records.summarize(shuffled, "s1", plan)
        assert [row["variant"] for row in summary["control"]] == names
    unplanned = study_records.summarize([*records, _record("extra", 0, 2.5, group="control")], "s1", names[::-1])
    assert [row["variant"] for row in unplanned["control"]] == [*names[::-1], "extra"]


# --------------------------------------------------------------------------------------------------- smoke run
def test_quality_smoke_run_records_and_resumes(quality: ModuleType, tmp_path: Path, study_records: ModuleType) -> None:
    args = ["--smoke", "--out", str(tmp_path), "--seeds", "0", "--variants", "bf16-lora,falqon-row-keep"]
    args += ["--no-export-check"]
    assert quality.main([*args, "--no-ablations", "--device", "cpu"]) == 0
    records = study_records.read_records(tmp_path / "quality.jsonl")
    assert [(r["key"], r["status"]) for r in records] == [
        ("before:base@-", "ok"),
        ("before:fp8-row@-", "ok"),
        ("bf16-lora@0", "ok"),
        ("falqon-row-keep@0", "ok"),
    ]
    lora, falqon = records[2], records[3]
    assert len(lora["loss_curve"]) == len(falqon["loss_curve"]) == 2
    assert set(falqon["metrics"]["bench"]) == {"arc_easy", "arc_challenge", "hellaswag", "boolq", "mmlu_subset"}
    assert falqon["metrics"]["bench"]["mmlu_subset"]["n"] == 5  # ceil(2 / 5) items of each of 5 subjects
    rank, layers = 16, 2 * 7
    # k = r rows per layer after each of the 2 steps; `keep` leaves unmerged rows that the final flush merges
    assert falqon["proxy"]["rows_merged"] == 2 * rank * layers
    assert falqon["merge"]["merge_rows"] == falqon["proxy"]["rows_merged"] + falqon["proxy"]["rows_flushed"]
    assert lora["merge"] is None and records[0]["loss_curve"] == []

    assert quality.main([*args, "--no-ablations", "--device", "cpu"]) == 0  # everything done: nothing reruns
    assert len(study_records.read_records(tmp_path / "quality.jsonl")) == 4
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    assert [row["variant"] for row in summary["main"]] == ["bf16-lora", "falqon-row-keep"]
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_smoke_export_check_scores_the_export_like_the_trainer(
    quality: ModuleType, tmp_path: Path, study_records: ModuleType
) -> None:
    args = ["--smoke", "--out", str(tmp_path), "--seeds", "0", "--variants", "none", "--no-ablations"]
    assert quality.main([*args, "--ablation-base", "falqon-row-keep-sr", "--device", "cpu"]) == 0
    records = study_records.read_records(tmp_path / "quality.jsonl")
    assert [(r["key"], r["status"]) for r in records] == [
        ("before:base@-", "ok"),
        ("before:fp8-row@-", "ok"),
        ("falqon-row-keep-sr:export@0", "ok"),
    ]
    trained, compute = records[-1]["metrics"], records[-1]["export"]["compute"]
    # On the CPU the FP8 GEMM is compressed-tensors' own arithmetic: the folder scores exactly as the trainer.
    assert list(compute) == ["float32"] and compute["float32"]["trainer"] == trained
    assert compute["float32"]["export"] == trained and len(records[-1]["loss_curve"]) == 2
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    (row,) = summary["export"]
    assert row["delta_acc_pts"] == 0.0 and row["delta_loss_pct"] == 0.0 and row["compute"] == "float32"
    assert set(row["tasks"]) == set(trained["bench"]) and summary["main"] == []


# ------------------------------------------------------------------------------------------- issue 18 studies
def test_plan_controls_runs_every_control_seed_before_the_remedies(study_runs: ModuleType) -> None:
    runs = study_runs.plan_controls([0, 1, 2], 16, None, steps=150)
    controls = ["bf16-lora", "falqon-row-keep-sr", "falqon-nomerge", "bf16-lora-fa-svd", "bf16-lora-fa-random"]
    assert [r.name for r in runs[:15]] == controls * 3 and [r.seed for r in runs[:15]] == [0] * 5 + [1] * 5 + [2] * 5
    assert {r.group for r in runs[:15]} == {"control"} and {r.group for r in runs[15:]} == {"remedy"}
    by_name = {r.name: r for r in runs}
    assert len(runs) == 3 * len(by_name) and len({r.key for r in runs}) == len(runs)
    nomerge = by_name["falqon-nomerge"]
    assert not nomerge.merge and nomerge.falqon == by_name["falqon-row-keep-sr"].falqon
    assert by_name["falqon-row-keep-sr"].falqon.init == InitMethod.SVD  # the defaults the controls decompose
    fa = {n: r for n, r in by_name.items() if r.kind == "peft-fa"}
    assert {n: r.falqon.init.value for n, r in fa.items()} == {
        "bf16-lora-fa-svd": "svd",
        "bf16-lora-fa-random": "random",
        "bf16-lora-fa-gradient": "gradient",
    }
    refresh = by_name["falqon+init=gradient+refresh=50"]
    assert refresh.refresh_every == 50 and refresh.falqon.init == InitMethod.GRADIENT
    assert by_name["falqon+merge>=1step"].falqon.merge_threshold == 1.0
    only = study_runs.plan_controls([4], 16, ["bf16-lora", "falqon+*"], steps=30)
    remedies = [n.replace("refresh=50", "refresh=10") for n in by_name if n.startswith("falqon+")]
    assert [r.name for r in only] == ["bf16-lora", *remedies] and {r.seed for r in only} == {4}


def test_long_study_uses_the_paper_hyper_parameters(quality: ModuleType, study_runs: ModuleType) -> None:
    args = quality._parser().parse_args(["--study", "long", "--seeds", "0"])
    settings = quality.study_settings(args)
    assert (settings["steps"], settings["rank"], settings["alpha"], settings["k"]) == (1000, 64, 16.0, "10")
    optim = (settings["scheduler"], settings["warmup"], settings["grad_clip"], settings["lr"])
    assert optim == ("constant", 30, 3.0, 2e-4) and settings["eval_every"] == 100
    assert quality.study_settings(quality._parser().parse_args(["--study", "long", "--lr", "2e-5"]))["lr"] == 2e-5
    runs = quality.plan_study(args, settings)
    names = ["bf16-lora", "qlora-nf4", "falqon-row-keep-sr", "falqon+init=gradient+refresh=250"]
    assert [r.name for r in runs] == names
    falqon = runs[2]
    assert falqon.k == "10" and falqon.falqon.rank == 64 and falqon.falqon.lora_alpha == 16.0
    # the issue-8 study keeps its settings (and so its key): its earlier records still count
    main = quality.study_settings(quality._parser().parse_args([]))
    assert "study" not in main and (main["lr"], main["rank"], main["grad_clip"], main["warmup"]) == (1e-3, 16, 1.0, 15)


def test_lora_fa_freezes_falqon_initial_A_and_trains_only_B(quality: ModuleType) -> None:
    base, _ = quality.load_base(smoke=True)
    factory = quality.ModelFactory(base, torch.device("cpu"))
    config = FalqonConfig(rank=16, target_modules=list(quality.TARGETS), init=InitMethod.RANDOM)
    run = quality.Run("fa", "control", "peft-fa", seed=3, falqon=config)
    settings = {"rank": 16}
    model = factory.build(run, settings, [])
    torch.manual_seed(3)  # the same seed converts FALQON's random A in the same order
    falqon = factory.build(quality.Run("f", "control", "falqon", seed=3, falqon=config), settings, [])
    layers = falqon_layers(falqon)
    adapters = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m.lora_A, "keys")}
    assert len(adapters) == len(layers) == 14
    for name, module in adapters.items():
        weight = module.lora_A["default"].weight
        assert not weight.requires_grad and module.lora_B["default"].weight.requires_grad
        assert torch.equal(weight, layers[name.removeprefix("base_model.model.")].lora_A())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_B" in n
    }


def test_quality_smoke_controls_in_two_shard_processes(
    quality: ModuleType,
    tmp_path: Path,
    study_records: ModuleType,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)  # the shards run as `python -m benchmarks.quality` from the working directory
    variants = "bf16-lora,falqon-nomerge,bf16-lora-fa-gradient,falqon+init=gradient+refresh=*"
    args = ["--smoke", "--study", "controls", "--out", str(tmp_path), "--seeds", "0", "--variants", variants]
    assert quality.main([*args, "--jobs", "2", "--eval-every", "1", "--device", "cpu"]) == 0
    records = {r["key"]: r for r in study_records.read_records(tmp_path / "quality.jsonl")}
    assert {k: r["status"] for k, r in records.items()} == {
        k: "ok"
        for k in ("bf16-lora@0", "falqon-nomerge@0", "falqon+init=gradient+refresh=1@0", "bf16-lora-fa-gradient@0")
    }
    assert {r["shard"] for r in records.values()} == {"0/2", "1/2"}
    nomerge, refresh = records["falqon-nomerge@0"], records["falqon+init=gradient+refresh=1@0"]
    assert nomerge["merge"]["merge_rows"] == 0 and nomerge["proxy"]["rows_flushed"] == 0  # B is never merged
    assert refresh["proxy"]["refreshes"] == 1 and refresh["proxy"]["rows_refreshed"] > 0  # after step 1 of 2
    lora, fa = records["bf16-lora@0"], records["bf16-lora-fa-gradient@0"]
    assert fa["trainable_params"] * 2 == lora["trainable_params"]  # B only
    assert len(fa["loss_curve"]) == len(lora["loss_curve"]) == 2
    # held-out loss after step 1 (not after the last: the final evaluation scores that)
    assert all([step for step, _, _ in r["heldout_curve"]] == [1] for r in records.values())
    assert (tmp_path / "quality.png").stat().st_size > 0
    printed = capsys.readouterr().out.strip().splitlines()
    header, *rows = printed[-5:]  # the gap table comes last
    assert "gap vs bf16-lora" in header and {row.split()[0] for row in rows} == {k[:-2] for k in records}
    assert all(row.split()[-2].endswith("%") for row in rows)
    summary = json.loads((tmp_path / "quality_summary.json").read_text())
    assert [row["variant"] for row in summary["control"]] == ["bf16-lora", "falqon-nomerge"]
