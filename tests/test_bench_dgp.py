"""The deep-GP study keeps going when one fit diverges, and says so in its table."""

from __future__ import annotations

import math

import pytest

import bayesgen.bench.dgp as dgp
from bayesgen.errors import NonFiniteLossError

def test_a_diverged_split_is_counted_not_averaged_and_the_study_goes_on(monkeypatch):
    def fake_split(dataset, split, num_layers, method, **options):
        if method == "dbvi" and split == 1:
            raise NonFiniteLossError("The loss became nonfinite at step 7. Details follow", step=7)
        return {"dataset": dataset, "split": split, "layers": num_layers, "method": method,
                "rmse": 1.0 + split, "test_ll": -1.0 - split, "final_loss": 0.0, "wall_s": 1.0}

    monkeypatch.setattr(dgp, "run_dgp_split", fake_split)
    logs = []
    rows = dgp.dgp_uci_study(["yacht"], (2,), ("ddvi", "dbvi"), num_splits=3, log=logs.append)
    assert len(rows) == 6  # the study ran past the failure
    assert any("FAILED (The loss became nonfinite at step 7)" in line for line in logs)
    summary = {s["method"]: s for s in dgp.summarise(rows)}
    assert summary["ddvi"]["splits"] == 3 and summary["ddvi"]["failed"] == 0
    assert summary["dbvi"]["splits"] == 2 and summary["dbvi"]["failed"] == 1
    assert summary["dbvi"]["rmse"][0] == pytest.approx(2.0)  # splits 0 and 2 only
    assert not math.isnan(summary["dbvi"]["rmse"][1])
    table = dgp.format_dgp_table(dgp.summarise(rows))
    assert "| 2 (1 failed) |" in table


def test_split_ids_run_the_listed_splits_and_bad_ones_are_named(monkeypatch):
    ran = []

    def fake_split(dataset, split, num_layers, method, **options):
        ran.append(split)
        return {"dataset": dataset, "split": split, "layers": num_layers, "method": method,
                "rmse": 1.0, "test_ll": -1.0, "final_loss": 0.0, "wall_s": 1.0}

    monkeypatch.setattr(dgp, "run_dgp_split", fake_split)
    dgp.dgp_uci_study(["yacht"], (2,), ("ddvi",), split_ids=[3, 2], log=lambda _: None)
    assert ran == [3, 2]
    with pytest.raises(ValueError, match=r"split_ids \[20\] are out of range for yacht"):
        dgp.dgp_uci_study(["yacht"], (2,), ("ddvi",), split_ids=[20], log=lambda _: None)
    with pytest.raises(ValueError, match="not both"):
        dgp.dgp_uci_study(["yacht"], (2,), ("ddvi",), num_splits=2, split_ids=[1])
