"""bayesgen.compare: one table for VI and MCMC results, against a reference."""

from __future__ import annotations

import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.autoguide import AutoNormal

import bayesgen
from bayesgen.fit import default_optimizer

matplotlib.use("Agg")

LOC = np.array([1.0, -3.0])
SCALE = np.array([0.5, 2.0])


def model():
    numpyro.sample("x", dist.Normal(jnp.asarray(LOC), jnp.asarray(SCALE)).to_event(1))


@pytest.fixture(scope="module")
def results():
    mcmc = bayesgen.mcmc.run(model, "nuts", num_chains=2, num_warmup=200, num_samples=300,
                             progress_bar=False, seed=1)
    vi = bayesgen.fit(model, AutoNormal(model), steps=1000, progress_bar=False, seed=1,
                      optimizer=default_optimizer(1000, learning_rate=0.05))
    return mcmc, vi


def test_table_and_summary_against_a_reference(results, tmp_path):
    mcmc, vi = results
    rng = np.random.default_rng(0)
    reference = {"x": LOC + SCALE * rng.normal(size=(20000, 2))}
    comp = bayesgen.compare([mcmc, vi], reference=reference, num_samples=1000)
    assert list(comp.summary.index) == ["mcmc:nuts", "vi:AutoNormal"]
    assert list(comp.summary["kind"]) == ["mcmc", "vi"]
    # the per-coordinate errors are what they say
    x = mcmc.samples["x"].reshape(-1, 2)
    row = comp.table.loc[("mcmc:nuts", "x[1]")]
    ref_sd = reference["x"][:, 1].std(ddof=1)
    np.testing.assert_allclose(
        row["mean_err_sd"], (x[:, 1].mean() - reference["x"][:, 1].mean()) / ref_sd, rtol=1e-4)
    np.testing.assert_allclose(row["sd_ratio"], x[:, 1].std(ddof=1) / ref_sd, rtol=1e-6)
    s = comp.summary
    assert s.loc["mcmc:nuts", "max_mean_err_sd"] == pytest.approx(
        np.abs(comp.table.loc["mcmc:nuts"]["mean_err_sd"]).max())
    # MCMC has ESS / R-hat and no k-hat; VI has k-hat and no ESS / R-hat
    assert s.loc["mcmc:nuts", "min_ess"] > 50 and s.loc["mcmc:nuts", "max_r_hat"] < 1.05
    assert np.isnan(s.loc["mcmc:nuts", "khat"]) and np.isnan(s.loc["vi:AutoNormal", "min_ess"])
    assert s.loc["vi:AutoNormal", "khat"] < 0.7  # the mean-field guide is exact here
    assert s.loc["vi:AutoNormal", "grad_evals"] == 1000
    assert s.loc["mcmc:nuts", "grad_evals"] == mcmc.num_grad_evals
    assert "mcmc:nuts" in str(comp)
    fig = comp.plot(tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert len(fig.axes) == 1


def test_a_result_as_reference_and_bad_input(results):
    mcmc, vi = results
    comp = bayesgen.compare([vi], reference=mcmc, names=["meanfield"], diagnose_vi=False)
    assert list(comp.summary.index) == ["meanfield"]
    assert np.all(np.abs(comp.table["mean_err_sd"]) < 0.3)
    with pytest.raises(TypeError, match="FitResult.*MCMCResult"):
        bayesgen.compare([{"x": np.zeros((10, 2))}])
    with pytest.raises(ValueError, match="distinct labels"):
        bayesgen.compare([mcmc, vi], names=["a", "a"], diagnose_vi=False)
    with pytest.raises(ValueError, match="none of the sites"):
        bayesgen.compare([mcmc], reference={"y": np.zeros(10)})
