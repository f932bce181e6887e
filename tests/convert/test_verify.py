"""The audit's comparison: tolerance and greedy agreement (a real mismatch failing: tests/convert/test_cli.py)."""

from __future__ import annotations

import pytest
import torch

from r1mega.convert.verify import audit_tokens, compare


def test_compare_reports_difference_agreement_and_tolerance() -> None:
    reference = torch.tensor([[[0.0, 10.0], [3.0, 1.0]]])
    report = compare(reference, reference + torch.tensor([[[0.0, 0.0], [0.0, 2.5]]]), atol=1e-4, rtol=1e-3)
    assert report.max_abs_diff == 2.5 and report.greedy_agreement == 0.5 and report.positions == 2
    assert report.tolerance == pytest.approx(1e-4 + 1e-2) and not report.passed
    assert "FAIL" in str(report) and compare(reference, reference).passed


def test_audit_tokens_are_fixed() -> None:
    assert torch.equal(audit_tokens(100), audit_tokens(100)) and audit_tokens(100).max() < 100
