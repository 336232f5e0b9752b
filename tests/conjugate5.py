"""The 5-d conjugate Gaussian problem every guide test fits (shared by the guide tests).

Prior ``z ~ N(m, S)`` with a correlated S, observations ``y_i ~ N(A z, R)``. S and R are
chosen so that the posterior covariance is a designed matrix C with sds 0.01 .. 10 and
correlations up to 0.6, which is where a unit-scale start fails and the preconditioner
matters. The exact posterior is computed in closed form.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

D, N = 5, 20
POST_SD = np.array([0.01, 10.0, 1.0, 0.3, 3.0])
POST_CORR = np.array(
    [
        [1.0, 0.6, 0.3, 0.0, -0.4],
        [0.6, 1.0, 0.5, 0.2, 0.0],
        [0.3, 0.5, 1.0, 0.6, 0.2],
        [0.0, 0.2, 0.6, 1.0, 0.5],
        [-0.4, 0.0, 0.2, 0.5, 1.0],
    ]
)


def _conjugate_problem():
    rng = np.random.default_rng(0)
    c = POST_CORR * np.outer(POST_SD, POST_SD)
    a = rng.normal(size=(D, D)) + 2.0 * np.eye(D)
    # prior precision C^-1 / 5 and likelihood precision 4 C^-1 / 5 add up to C^-1
    prior_cov = 5.0 * c
    prior_mean = np.array([0.05, -20.0, 3.0, 1.0, 5.0])
    noise_cov = N / 0.8 * a @ c @ a.T
    z_true = rng.multivariate_normal(prior_mean, prior_cov)
    y = rng.multivariate_normal(a @ z_true, noise_cov, size=N)
    # the exact posterior, from the generic conjugate formulas
    prior_prec, noise_prec = np.linalg.inv(prior_cov), np.linalg.inv(noise_cov)
    post_cov = np.linalg.inv(prior_prec + N * a.T @ noise_prec @ a)
    post_mean = post_cov @ (prior_prec @ prior_mean + a.T @ noise_prec @ y.sum(0))
    return dict(a=a, prior_mean=prior_mean, prior_cov=prior_cov, noise_cov=noise_cov, y=y,
                post_mean=post_mean, post_cov=post_cov)


PROBLEM = _conjugate_problem()
POST_MEAN, POST_COV = PROBLEM["post_mean"], PROBLEM["post_cov"]
Y = jnp.asarray(PROBLEM["y"], jnp.float32)
_A = jnp.asarray(PROBLEM["a"], jnp.float32)
_M = jnp.asarray(PROBLEM["prior_mean"], jnp.float32)
_S = jnp.asarray(PROBLEM["prior_cov"], jnp.float32)
_R = jnp.asarray(PROBLEM["noise_cov"], jnp.float32)


def model(y=None):
    z = numpyro.sample("z", dist.MultivariateNormal(_M, _S))
    with numpyro.plate("data", N):
        numpyro.sample("y", dist.MultivariateNormal(z @ _A.T, _R), obs=y)



def posterior_errors(draws):
    """Mean error in posterior sds, relative sd error and correlation error of ``draws``."""
    draws = np.asarray(draws, np.float64)
    sd = np.sqrt(np.diag(POST_COV))
    mean_err = (draws.mean(0) - POST_MEAN) / sd
    sd_err = draws.std(0) / sd - 1.0
    corr_err = np.corrcoef(draws.T) - POST_COV / np.outer(sd, sd)
    return mean_err, sd_err, corr_err


def exact_log_evidence() -> float:
    """log p(Y) of the conjugate model in float64 (Y as the model sees it, in float32).

    The stacked observations are Gaussian: mean ``A m`` in every row, covariance
    ``I_N (x) R + 1 1^T (x) A S A^T``.
    """
    from scipy import stats

    a, m, s, r = (PROBLEM[k] for k in ("a", "prior_mean", "prior_cov", "noise_cov"))
    ones = np.ones((N, N))
    cov = np.kron(np.eye(N), r) + np.kron(ones, a @ s @ a.T)
    y = np.asarray(Y, np.float64).reshape(-1)
    return float(stats.multivariate_normal(np.tile(a @ m, N), cov).logpdf(y))
