"""The LLC reference suite (experiments/llc_reference_suite.py): every case sits at a critical point of its empirical
loss (science-notes "bias trap"), and the BEFORE table classifies verdicts as issue 16 defines them."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import llc_reference_suite as suite  # noqa: E402


@pytest.mark.parametrize("name", ["dln_a_n1000", "dln_b_n1000", "relu_n1000", "tanh_n1000", "cnn_n1000",
                                  "transformer_n1000"])
def test_cases_are_critical_points(name):
    case = suite.build_cases()[name]()
    loss = case.loss_fn(case.model, (case.x, case.y))
    grads = torch.autograd.grad(loss, list(case.model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-5
    assert case.closed_form is None or case.closed_form > 0


def test_verdicts():
    gold = {"hmc": {"value": 10.0, "sem": 0.1}, "n": 1000, "d": 5}
    assert suite.table_row("a", {"llc": 10.3, "converged": False}, gold)["verdict"].startswith("FALSE ALARM")
    assert suite.table_row("a", {"llc": 11.5, "converged": True}, gold)["verdict"].startswith("MISS")
    assert suite.table_row("a", {"llc": 10.3, "converged": True}, gold)["verdict"] == "correct"
    assert suite.table_row("a", {"llc": 8.0, "converged": False}, gold)["verdict"].startswith("not converged")
    assert suite.table_row("a", {"timed_out": True}, gold)["verdict"] == "timed out"
    closed = suite.table_row("a", {"llc": 9.0, "converged": True}, {"closed_form": {"value": 9.0}})
    assert closed["gold_source"] == "closed form" and closed["default_rel_error"] == 0.0
    no_gold = suite.table_row("a", {"llc": 9.0, "converged": True}, {"sgld": {"value": 9.0, "sem": 0.1}})
    assert no_gold["gold"] is None and no_gold["verdict"] == "no gold"
