"""bayesgen.mcmc.run: exactness of the full-batch kernels, SG kernels with minibatches,
the arviz layout, the flat log density and the errors a user gets."""

from __future__ import annotations

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from arviz_stats.base import array_stats
from numpyro.infer import MCMC, NUTS

import bayesgen.mcmc as bm
from bayesgen.errors import ModelStructureError
from bayesgen.mcmc.potential import model_log_density

# 5-d correlated Gaussian with sds 0.5 .. 3
MU = np.array([1.0, -2.0, 0.5, 3.0, 0.0])
SD = np.array([0.5, 1.0, 2.0, 3.0, 1.5])
CORR = np.array(
    [
        [1.0, 0.7, 0.2, 0.0, -0.3],
        [0.7, 1.0, 0.4, 0.1, 0.0],
        [0.2, 0.4, 1.0, 0.5, 0.2],
        [0.0, 0.1, 0.5, 1.0, 0.6],
        [-0.3, 0.0, 0.2, 0.6, 1.0],
    ]
)
COV = CORR * np.outer(SD, SD)


def gaussian_model():
    numpyro.sample("z", dist.MultivariateNormal(jnp.asarray(MU), jnp.asarray(COV)))


def _within_mcse(draws, z=4.0):
    """Means and variances of (chain, draw, d) draws within z Monte Carlo standard errors."""
    mean_err = draws.mean(axis=(0, 1)) - MU
    mean_se = array_stats.mcse(draws, chain_axis=0, draw_axis=1, method="mean")
    sq = (draws - MU) ** 2
    var_err = sq.mean(axis=(0, 1)) - np.diag(COV)
    var_se = array_stats.mcse(sq, chain_axis=0, draw_axis=1, method="mean")
    return np.abs(mean_err / mean_se), np.abs(var_err / var_se)


@pytest.mark.parametrize(
    "kernel, options, num_samples",
    [("nuts", None, 1000), ("mala", {"dense_mass": True}, 2000)],
)
def test_full_batch_kernels_are_exact_on_a_correlated_gaussian(kernel, options, num_samples):
    result = bm.run(
        gaussian_model, kernel, num_chains=4, num_warmup=1000, num_samples=num_samples,
        seed=3, progress_bar=False, kernel_options=options,
    )
    draws = result.samples["z"]
    assert draws.shape == (4, num_samples, 5)
    mean_z, var_z = _within_mcse(draws)
    assert np.all(mean_z < 4.0), mean_z
    assert np.all(var_z < 4.0), var_z
    acc = result.sample_stats["acceptance_rate"].mean()
    if kernel == "mala":  # dual averaging hits MALA's target; NUTS's average runs above it
        assert abs(acc - 0.574) < 0.1
    else:
        assert 0.7 < acc < 0.99
    assert result.num_grad_evals >= 4 * (1000 + num_samples)


def test_mcse_check_has_power():
    """A sampler with 10% too large sds fails the same check (so the test above can fail)."""
    rng = np.random.default_rng(0)
    good = rng.multivariate_normal(MU, COV, size=(4, 1000))
    wide = MU + 1.1 * (rng.multivariate_normal(MU, COV, size=(4, 1000)) - MU)
    assert np.all(np.concatenate(_within_mcse(good)) < 4.0)
    assert np.any(_within_mcse(wide)[1] > 4.0)


# --- Bayesian linear regression with a subsampled plate ------------------------------
N_DATA, P = 400, 3


def _regression_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_DATA, P))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N_DATA)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def regression_model(x, y, batch=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([P]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        numpyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def _exact_posterior(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = np.linalg.inv(np.eye(P) + x.T @ x)
    return cov @ x.T @ y, np.sqrt(np.diag(cov))


@pytest.mark.parametrize(
    "kernel, options, batch",
    [
        ("sgld", {"step_size": 2e-5}, 40),
        ("sghmc", {"step_size": 1e-3}, 40),
    ],
)
def test_sg_kernels_approach_the_exact_posterior(kernel, options, batch):
    """Small steps, minibatch 40 of 400, 32 chains: means within 4 Monte Carlo standard
    errors plus 0.05 posterior sd (the discretisation and minibatch bias), sds within 10%.

    At these steps the injected noise dominates the minibatch-gradient noise (ratio about
    0.1), so the stationary law is close to the posterior; larger steps inflate the sds by
    more than the tolerance (checked by hand: SGLD +10% at 1e-4). blackjax's own SGHMC,
    which redraws the momentum at every call, gave sds 5-11% too wide here even with
    full-batch gradients; bayesgen's keeps the momentum (bayesgen.mcmc.sghmc).
    """
    x, y = _regression_data()
    mean, sd = _exact_posterior(x, y)
    result = bm.run(
        regression_model, kernel, x, y, batch=batch, num_chains=32, num_warmup=2000,
        num_samples=5000, seed=0, progress_bar=False, kernel_options=options,
    )
    chains = result.samples["w"]
    assert chains.shape == (32, 5000, P)
    mcse = array_stats.mcse(chains, chain_axis=0, draw_axis=1, method="mean")
    err = np.abs(chains.mean(axis=(0, 1)) - mean)
    assert np.all(err < 4 * mcse + 0.05 * sd), (err / sd, mcse / sd)
    w = result.get_samples()["w"]
    assert np.all(np.abs(w.std(0) / sd - 1.0) < 0.1), w.std(0) / sd
    assert result.num_grad_evals == 32 * 7000


def test_batch_size_overrides_the_plate_and_full_batch_kernels_use_all_data():
    x, y = _regression_data()
    ld = model_log_density(
        regression_model, (x, y), {"batch": 40}, key=jax.random.PRNGKey(0), num_chains=2,
        minibatch=True,
    )
    assert ld.plates == {"data": (N_DATA, 40)}
    z = jnp.array([0.3, -1.0, 0.2])
    full = ld.logdensity(z)
    # the full-data log density, written out
    w_lp = dist.Normal(0.0, 1.0).log_prob(z).sum()
    manual = w_lp + dist.Normal(x @ z, 1.0).log_prob(y).sum()
    np.testing.assert_allclose(full, manual, rtol=1e-5)
    # minibatch estimates over a partition of the data average to the full log density
    perm = np.random.default_rng(0).permutation(N_DATA).reshape(10, 40)
    parts = [ld.minibatch_logdensity(z, {"data": jnp.asarray(p)}) for p in perm]
    np.testing.assert_allclose(np.mean(parts), full, rtol=1e-5)
    assert not np.allclose(parts[0], full, rtol=1e-3)  # a single minibatch is not the full value


def test_to_arviz_matches_numpyro_layout():
    x, y = _regression_data()
    ours = bm.run(regression_model, "nuts", x, y, num_chains=2, num_warmup=100, num_samples=50,
                  progress_bar=False)
    tree = ours.to_arviz()
    mcmc = MCMC(NUTS(regression_model), num_warmup=20, num_samples=50, num_chains=2,
                progress_bar=False, chain_method="sequential")
    mcmc.run(jax.random.PRNGKey(0), x, y)
    import arviz_base

    ref = arviz_base.from_numpyro(mcmc)
    assert set(tree.children) >= {"posterior", "sample_stats", "observed_data"}
    assert tree.posterior.to_dataset().sizes == ref.posterior.to_dataset().sizes
    assert set(tree.posterior.data_vars) == set(ref.posterior.data_vars)
    assert tree.posterior["w"].dims == ref.posterior["w"].dims
    # the observed data is the full data set although the model subsamples
    assert tree.observed_data["y"].shape == (N_DATA,)
    stats = set(tree.sample_stats.data_vars)
    assert {"lp", "acceptance_rate", "diverging", "step_size", "energy", "n_steps", "tree_depth"} <= stats
    assert set(ref.sample_stats.data_vars) <= stats  # numpyro's default: diverging
    assert tree.posterior.attrs["kernel"] == "nuts"


def test_custom_kernel_and_sequential_chains():
    step = 0.5

    def factory(logdensity):
        return blackjax.mala(logdensity, step)

    vec = bm.run(gaussian_model, factory, num_chains=2, num_warmup=0, num_samples=200, seed=5,
                 progress_bar=False)
    seq = bm.run(gaussian_model, factory, num_chains=2, num_warmup=0, num_samples=200, seed=5,
                 progress_bar=False, chain_method="sequential")
    assert vec.kernel == "custom"
    assert "acceptance_rate" in vec.sample_stats and "lp" in vec.sample_stats
    np.testing.assert_allclose(vec.positions, seq.positions, rtol=1e-4, atol=1e-5)


def test_errors_name_the_problem():
    def discrete():
        numpyro.sample("c", dist.Bernoulli(0.3))

    def no_latent():
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=1.0)

    def local_latent(x, y):
        with numpyro.plate("data", x.shape[0], subsample_size=10) as idx:
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(u, 1.0), obs=y[idx])

    x, y = _regression_data()
    with pytest.raises(ModelStructureError, match="'c'.*discrete"):
        bm.run(discrete, "nuts", progress_bar=False)
    with pytest.raises(ModelStructureError, match="no latent"):
        bm.run(no_latent, "nuts", progress_bar=False)
    with pytest.raises(ModelStructureError, match="'u'.*local to the subsampled plate 'data'"):
        bm.run(local_latent, "sgld", x, y, progress_bar=False, kernel_options={"step_size": 1e-4})
    with pytest.raises(ValueError, match="needs kernel_options=\\{'step_size'"):
        bm.run(regression_model, "sgld", x, y, batch=10, progress_bar=False)
    with pytest.raises(ValueError, match="unknown kernel 'nutz'"):
        bm.run(gaussian_model, "nutz")
    with pytest.raises(ValueError, match="not options of kernel 'nuts'"):
        bm.run(gaussian_model, "nuts", kernel_options={"step_size": 0.1})
    with pytest.raises(ValueError, match="no subsampled plate"):
        bm.run(gaussian_model, "sgld", batch_size=10, kernel_options={"step_size": 1e-3},
               progress_bar=False)
    with pytest.raises(ValueError, match="batch_size is for the SG kernels"):
        bm.run(gaussian_model, "nuts", batch_size=10)
    with pytest.raises(ValueError, match=rf"batch_size for plate 'data' must be an int in "
                                         rf"\[1, {N_DATA}\], got {N_DATA + 1}"):
        bm.run(regression_model, "sgld", x, y, batch=10, batch_size=N_DATA + 1,
               kernel_options={"step_size": 1e-4}, progress_bar=False)
    for thin in (2.5, True, 0):
        with pytest.raises(ValueError, match=r"kernel_options\['thin'\] must be a positive int"):
            bm.run(regression_model, "sgld", x, y, batch=10, progress_bar=False,
                   kernel_options={"step_size": 1e-4, "thin": thin})
    with pytest.raises(TypeError, match="not a built SamplingAlgorithm"):
        bm.run(gaussian_model, blackjax.mala(lambda z: -jnp.sum(z**2), 0.1))


_DEVICES_SCRIPT = """
import jax, numpy as np, numpyro, numpyro.distributions as dist
assert len(jax.devices()) == 2, jax.devices()
import bayesgen.mcmc as bm
from bayesgen.mcmc.sampling import _shard_chains

def model():
    numpyro.sample("z", dist.Normal(np.zeros(3), np.array([1.0, 2.0, 0.5])).to_event(1))

assert len(_shard_chains(jax.numpy.zeros((4, 3))).sharding.device_set) == 2
vec = bm.run(model, "nuts", num_chains=4, num_warmup=100, num_samples=100, progress_bar=False)
seq = bm.run(model, "nuts", num_chains=4, num_warmup=100, num_samples=100, progress_bar=False,
             chain_method="sequential")
np.testing.assert_allclose(vec.positions, seq.positions, rtol=1e-4, atol=1e-4)
print("OK")
"""


def test_chains_are_spread_across_devices():
    """With two (virtual CPU) devices the chains are sharded and give the same draws."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
