"""Verification results as strict JSON and as a terminal table (80 columns, markup-safe)."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from falqon_lit.export import Tolerance, VerifyResult, print_report

NOT_INSTALLED = "vLLM is not installed (pip install 'falqon-lit[vllm]' on a CUDA host)"


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _results() -> list[VerifyResult]:
    measured = VerifyResult(
        "transformers + compressed-tensors (CPU)",
        Tolerance(0.1244, 0.9, "noise"),
        max_rel_err=0.0871,
        mean_rel_err=0.0123,
        token_agreement=0.989,
        prompts_identical=9,
        prompts=10,
        bytes_identical=(210, 210),
    )
    tokens_only = VerifyResult(
        "vLLM", Tolerance(math.inf, 0.75, "bf16"), token_agreement=0.8, prompts=10, unmeasured="tokens, not logits"
    )
    skipped = VerifyResult("vLLM", Tolerance(math.inf, 0.75, "bf16"), skipped=NOT_INSTALLED)
    return [measured, tokens_only, skipped]


def test_verify_result_as_dict_is_strict_json_and_skipped_is_not_passed():
    measured, tokens_only, skipped = (_strict(json.dumps(r.as_dict())) for r in _results())
    assert measured["status"] == "pass" and measured["passed"] is True and measured["why_null"] is None
    assert tokens_only["max_rel_err"] is None and tokens_only["tolerance"]["max_rel_err"] is None
    assert tokens_only["why_null"] == "tokens, not logits" and tokens_only["token_agreement"] == 0.8
    assert skipped["status"] == "skipped" and skipped["passed"] is None
    assert skipped["why_null"].startswith("skipped: vLLM is not installed")


def test_skipped_check_does_not_fail_the_export_report():
    from falqon_lit.export import ExportReport

    report = ExportReport("vllm", None, 0, _results())
    assert report.passed
    report.results[0].max_rel_err = 0.2
    assert not report.passed


def test_print_report_fits_80_columns_and_keeps_brackets():
    out = io.StringIO()
    print_report(_results(), Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text  # nothing truncated
    assert "pip install 'falqon-lit[vllm]'" in text  # rich markup would eat [vllm]
    assert "≤ 0.124," in text  # not "≤ 1e-01"
    for word in ("max rel err", "greedy agreement", "weights bitwise", "210/210 layers", "9/10 prompts"):
        assert word in text, word


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_manifest_refuses_non_finite_numbers(tmp_path, value):
    from falqon_lit.export.manifest import write_manifest

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_manifest(tmp_path, "vllm", {}, {"bad": value})
