"""The arviz layout of a VI fit equals arviz.from_numpyro's layout of an MCMC run."""

import arviz
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

from bayesgen.diagnostics.arviz import vi_to_datatree
from bayesgen.fit import fit

Y8 = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA8 = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
X = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", 8):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def regression(x, y=None):
    # a vector site without a plate, and deterministic sites (one vector, one scalar)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    mean = numpyro.deterministic("mean", x @ w)
    numpyro.deterministic("s2", s**2)
    numpyro.sample("y", dist.Normal(mean, s).to_event(1), obs=y)


CASES = {
    "eight_schools": (eight_schools, (SIGMA8,), {"y": Y8}, AutoNormal),
    "regression": (regression, (X,), {"y": X @ np.array([1.0, -1.0, 0.5], np.float32)}, AutoDiagonalNormal),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, args, kwargs, guide_cls = CASES[request.param]
    mcmc = MCMC(NUTS(model), num_warmup=50, num_samples=50, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), *args, **kwargs)
    result = fit(model, guide_cls(model), *args, steps=200, progress_bar=False, **kwargs)
    return request.param, mcmc, result


def _layout(ds):
    return {
        "vars": sorted(ds.data_vars),
        "dims": {k: v.dims for k, v in ds.data_vars.items()},
        "coords": {
            k: np.asarray(v.values).tolist() for k, v in ds.coords.items() if k not in ("chain", "draw")
        },
    }


def test_posterior_layout_matches_mcmc(case):
    name, mcmc, result = case
    ref = arviz.from_numpyro(mcmc)
    tree = result.to_arviz(num_samples=50)
    assert _layout(tree.posterior.to_dataset()) == _layout(ref.posterior.to_dataset())
    assert tree.posterior.sizes["chain"] == 1 and tree.posterior.sizes["draw"] == 50
    for var in ref.posterior.data_vars:
        assert tree.posterior[var].shape == ref.posterior[var].shape
        assert np.all(np.isfinite(tree.posterior[var].values))
    assert _layout(tree.observed_data.to_dataset()) == _layout(ref.observed_data.to_dataset())
    loss = tree.sample_stats["loss"]
    assert loss.dims == ("step",) and loss.shape == (200,)
    np.testing.assert_array_equal(loss.values, result.losses)
    np.testing.assert_array_equal(tree.sample_stats["step"].values, np.arange(1, 201))
    if name == "regression":
        # deterministic sites are functions of the same draw, as in MCMC output
        post = tree.posterior
        np.testing.assert_allclose(post["s2"].values, post["s"].values ** 2, rtol=1e-5)
        np.testing.assert_allclose(
            post["mean"].values, np.einsum("nk,cdk->cdn", X, post["w"].values), rtol=1e-4, atol=1e-5
        )


def test_latent_only_draws_get_deterministic_sites(case):
    name, mcmc, _ = case
    model, args, kwargs, _ = CASES[name]
    ref = arviz.from_numpyro(mcmc)
    samples = mcmc.get_samples()
    latent = {k: v for k, v in samples.items() if k not in ("mean", "s2")}
    tree = vi_to_datatree(model, latent, args, kwargs, num_chains=1)
    assert _layout(tree.posterior.to_dataset()) == _layout(ref.posterior.to_dataset())
    assert "sample_stats" not in tree.children
    for var in ref.posterior.data_vars:
        np.testing.assert_allclose(tree.posterior[var].values, ref.posterior[var].values, rtol=1e-5, atol=1e-5)


def test_num_chains_split_and_errors():
    draws = {"mu": np.arange(6.0), "tau": np.ones(6), "theta": np.zeros((6, 8))}
    tree = vi_to_datatree(eight_schools, draws, (SIGMA8,), {"y": Y8}, num_chains=2)
    assert tree.posterior["theta"].dims == ("chain", "draw", "J")
    assert tree.posterior.sizes["chain"] == 2 and tree.posterior.sizes["draw"] == 3
    np.testing.assert_array_equal(tree.posterior["mu"].values, [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="num_chains"):
        vi_to_datatree(eight_schools, draws, (SIGMA8,), {"y": Y8}, num_chains=4)
    with pytest.raises(ValueError, match="leading"):
        vi_to_datatree(eight_schools, {**draws, "mu": np.arange(5.0)}, (SIGMA8,), {"y": Y8})
