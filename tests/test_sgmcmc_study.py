"""The BNN-classification SG-MCMC study's helpers (the study itself is a benchmark:
``bayesgen bench-sgmcmc``, docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest

from bayesgen.bench.sgmcmc import (
    _budget,
    _step_size,
    format_paired_table,
    format_sgmcmc_table,
    stratified_split,
)


def test_stratified_split_keeps_class_proportions_and_partitions():
    y = np.array([0] * 357 + [1] * 212)
    train, test = stratified_split(y, 0.2, np.random.default_rng(0))
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(y.size))
    assert (y[test] == 1).sum() == round(0.2 * 212) and (y[test] == 0).sum() == round(0.2 * 357)
    again, _ = stratified_split(y, 0.2, np.random.default_rng(0))
    other, _ = stratified_split(y, 0.2, np.random.default_rng(1))
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_budget_and_step_size_units():
    # 4 cycles of 100 kept draws: 4 * (ceil(100 * 0.8 / 0.2) + 100) = 4 * 501 sampling steps
    assert _budget(400, 4, 0.8) == 5
    assert _budget(300, 3, 0.75) == 4
    with pytest.raises(ValueError, match="multiple"):
        _budget(402, 4, 0.8)
    assert _step_size("sgld", 0.5, 500) == pytest.approx(1e-3)
    assert _step_size("entropy_sgld", 0.5, 500) == pytest.approx(1e-3)
    # SGHMC: momentum SGD with lr h^2 N and momentum 0.9 has effective step 10 h^2 N = lr
    h = _step_size("sghmc", 0.5, 500)
    assert 10 * h**2 * 500 == pytest.approx(0.5)


def _fake_result():
    per_split, rows = [], []
    for split in range(3):
        for method, shift in (("sgld", 0.0), ("cyclical_sgld", -0.01)):
            r = {"split": split, "method": method, "draws": "theta"}
            for pool in ("chain", "pooled"):
                r.update({f"{pool}_accuracy": 0.9 + 0.01 * split,
                          f"{pool}_nll": 0.2 + 0.1 * split + shift, f"{pool}_ece": 0.05})
            per_split.append(r)
    for method in ("sgld", "cyclical_sgld"):
        row = {"method": method, "draws": "theta", "lr": 0.1, "eta": None, "wall_s": 1.0,
               "grad_evals": 100, "data_passes": 7.0, "tv_halves": 0.01, "tv_halves_se": 0.001}
        for pool in ("chain", "pooled"):
            for m in ("accuracy", "nll", "ece"):
                row[f"{pool}_{m}"], row[f"{pool}_{m}_se"] = 0.5, 0.1
        rows.append(row)
    return {"rows": rows, "per_split": per_split}


def test_tables():
    result = _fake_result()
    table = format_sgmcmc_table(result)
    assert "| SGLD | θ | 0.1 |" in table and "0.500 ± 0.100" in table
    paired = format_paired_table(result, "sgld")
    # the split-to-split spread (0.1 per split) cancels in the pairs: exactly -0.01
    row = "| cyclical SGLD | θ | +0.0000 ± 0.0000 | -0.0100 ± 0.0000 | +0.0000 ± 0.0000 |"
    assert row in paired
    with pytest.raises(ValueError, match="baseline"):
        format_paired_table(result, "nuts")
    with pytest.raises(ValueError, match="pool"):
        format_sgmcmc_table(result, "mean")
