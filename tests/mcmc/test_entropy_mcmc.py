"""Tests for the Entropy-MCMC kernel (bayesgen.mcmc.entropy_mcmc).

Gaussian target N(mu, Sigma). The joint energy of (theta, theta_a) is quadratic with
precision

    A = [[P + I/eta, -I/eta], [-I/eta, I/eta]],   P = Sigma^{-1},

so the continuous-time stationary law is N((mu, mu), T A^{-1}), i.e. theta ~ N(mu, T Sigma),
theta_a ~ N(mu, T (Sigma + eta I)), Cov(theta, theta_a) = T Sigma. The Euler step is the
linear AR(1) recursion z' = (I - h A) z + sqrt(2 h T) xi; its stationary covariance solves
C = B C B + 2 h T I with B = I - h A symmetric, whose solution is
C_h = T (A - h A^2 / 2)^{-1} (the discrete Lyapunov equation, solved in closed form since
B commutes with itself). The mean stays exactly (mu, mu).

Covariance estimates pool the time averages of 1024 chains over 4000 post-burn-in steps;
their standard error, measured from the spread of the per-chain averages, is <= 0.009 of
sqrt(C_ii C_jj) for every entry, so the 0.04 relative tolerance used below is >= 4.5 SE.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blackjax
from bayesgen.mcmc.entropy_mcmc import (
    EntropySGLDState,
    as_top_level_api,
    build_kernel,
    init,
)

# --- Gaussian target --------------------------------------------------------------------

SD = np.array([0.5, 1.0, 2.0])
CORR = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.6], [0.0, 0.6, 1.0]])
SIGMA = np.outer(SD, SD) * CORR
PREC = np.linalg.inv(SIGMA)
MU = np.array([1.0, -2.0, 0.5])

NUM_CHAINS = 1024
NUM_BURNIN = 1000
NUM_SAMPLES = 4000
REL_TOL = 0.04  # |estimate - exact| <= REL_TOL * sqrt(C_ii C_jj)

# (eta, step_size, temperature). Every run starts at theta = theta_a = 0, away from MU.
CONFIGS = {
    "eta0.5": (0.5, 0.05, 1.0),
    "eta2": (2.0, 0.1, 1.0),
    "eta0.5_T0.25": (0.5, 0.05, 0.25),
}


def _joint_precision(eta):
    eye = np.eye(3)
    return np.block([[PREC + eye / eta, -eye / eta], [-eye / eta, eye / eta]])


def _stationary_cov(eta, step_size, temperature):
    """Stationary covariance of the Euler recursion (step_size=0: the continuous one)."""
    a = _joint_precision(eta)
    return temperature * np.linalg.inv(a - step_size * a @ a / 2.0)


def _scale(cov):
    d = np.sqrt(np.diag(cov))
    return np.outer(d, d)


def _gaussian_grad(position, minibatch):
    del minibatch
    return -jnp.asarray(PREC, jnp.float32) @ (position - jnp.asarray(MU, jnp.float32))


@jax.jit
def _run_gaussian_chains(keys, eta, step_size, temperature):
    """Per-chain time averages of z - m and (z - m)(z - m)^T, z = (theta, theta_a)."""
    kernel = build_kernel()
    m = jnp.concatenate([jnp.asarray(MU, jnp.float32)] * 2)

    def one_chain(key):
        burn_key, sample_key = jax.random.split(key)
        state = init(jnp.zeros(3))

        def burn(state, k):
            return kernel(k, state, _gaussian_grad, None, step_size, eta, temperature), None

        state, _ = jax.lax.scan(burn, state, jax.random.split(burn_key, NUM_BURNIN))

        def sample(carry, k):
            state, s1, s2 = carry
            state = kernel(k, state, _gaussian_grad, None, step_size, eta, temperature)
            z = jnp.concatenate([state.position, state.guide]) - m
            return (state, s1 + z, s2 + jnp.outer(z, z)), None

        init_carry = (state, jnp.zeros(6), jnp.zeros((6, 6)))
        (_, s1, s2), _ = jax.lax.scan(
            sample, init_carry, jax.random.split(sample_key, NUM_SAMPLES)
        )
        return s1 / NUM_SAMPLES, s2 / NUM_SAMPLES

    return jax.vmap(one_chain)(keys)


@pytest.fixture(scope="module")
def gaussian_runs():
    """name -> (mean error, covariance estimate, covariance standard error)."""
    out = {}
    for i, (name, (eta, h, temp)) in enumerate(CONFIGS.items()):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(2024), i), NUM_CHAINS)
        m1, m2 = _run_gaussian_chains(keys, eta, h, temp)
        m1, m2 = np.asarray(m1, np.float64), np.asarray(m2, np.float64)
        mean_err = m1.mean(0)
        cov = m2.mean(0) - np.outer(mean_err, mean_err)
        cov_se = m2.std(0) / np.sqrt(NUM_CHAINS)
        out[name] = (mean_err, cov, cov_se)
    return out


def _check_against(cov, exact, tol=REL_TOL):
    err = np.abs(cov - exact) / _scale(exact)
    assert np.all(np.isfinite(cov))
    assert err.max() <= tol, f"max relative covariance error {err.max():.4f} > {tol}"


# --- 1. Gaussian posterior: theta ~ N(mu, Sigma), theta_a ~ N(mu, Sigma + eta I) ----------


def test_gaussian_stationary_law(gaussian_runs):
    eta, h, temp = CONFIGS["eta0.5"]
    mean_err, cov, cov_se = gaussian_runs["eta0.5"]
    exact_h = _stationary_cov(eta, h, temp)
    exact = _stationary_cov(eta, 0.0, temp)

    # Sanity of the closed forms used as references.
    np.testing.assert_allclose(exact[:3, :3], SIGMA, atol=1e-10)
    np.testing.assert_allclose(exact[3:, 3:], SIGMA + eta * np.eye(3), atol=1e-10)
    np.testing.assert_allclose(exact[:3, 3:], SIGMA, atol=1e-10)
    b = np.eye(6) - h * _joint_precision(eta)
    np.testing.assert_allclose(b @ exact_h @ b + 2 * h * temp * np.eye(6), exact_h, atol=1e-10)

    # The standard errors are as small as the tolerance assumes.
    assert (cov_se / _scale(exact_h)).max() < REL_TOL / 4

    # Means: both theta and theta_a centre on mu (SE <= 0.008 sd; tolerance 0.05 sd).
    sd = np.sqrt(np.diag(exact_h))
    assert np.all(np.abs(mean_err) <= 0.05 * sd), mean_err / sd

    # Sharp: the whole 6x6 joint covariance vs the discretised chain's exact one.
    _check_against(cov, exact_h)
    # Looser: vs the continuous-time answer, allowing for the O(h) bias of C_h.
    bias = np.abs(exact_h - exact) / _scale(exact)
    assert bias.max() < 0.125
    assert (np.abs(cov - exact) / _scale(exact)).max() <= bias.max() + REL_TOL

    # The check can tell theta_a's Sigma + eta I from Sigma: measured against Sigma, every
    # diagonal entry of theta_a's block is off by more than twice the tolerance.
    wrong = np.abs(np.diag(cov[3:, 3:]) - np.diag(SIGMA)) / np.diag(exact_h[3:, 3:])
    assert np.all(wrong > 2 * REL_TOL), wrong


# --- 2. The guide's extra variance is eta: two couplings ----------------------------------


@pytest.mark.parametrize("name", ["eta0.5", "eta2"])
def test_guide_variance_tracks_eta(gaussian_runs, name):
    eta, h, temp = CONFIGS[name]
    _, cov, _ = gaussian_runs[name]
    _check_against(cov, _stationary_cov(eta, h, temp))

    # theta_a | theta ~ N(theta, eta I): Cov(theta_a) - Cov(theta) = eta I and
    # Cov(theta, theta_a) = Sigma. The Euler chain keeps both to within 0.7% of eta
    # (excess) and 0.7% of Sigma's scale (cross block) at these step sizes; a coupling with
    # the wrong force or the wrong variance breaks them by O(eta).
    excess = cov[3:, 3:] - cov[:3, :3]
    np.testing.assert_allclose(excess, eta * np.eye(3), atol=0.05 * eta)
    assert np.all(np.abs(cov[:3, 3:] - SIGMA) <= REL_TOL * _scale(SIGMA))


def test_eta_values_are_distinguished(gaussian_runs):
    ex_small = np.diag(gaussian_runs["eta0.5"][1][3:, 3:] - gaussian_runs["eta0.5"][1][:3, :3])
    ex_large = np.diag(gaussian_runs["eta2"][1][3:, 3:] - gaussian_runs["eta2"][1][:3, :3])
    np.testing.assert_allclose(ex_large / ex_small, 4.0, rtol=0.1)


# --- 3. Temperature: the whole joint is tempered ------------------------------------------


def test_temperature_scales_joint_covariance(gaussian_runs):
    eta, h, temp = CONFIGS["eta0.5_T0.25"]
    _, cov_cold, _ = gaussian_runs["eta0.5_T0.25"]
    _, cov_warm, _ = gaussian_runs["eta0.5"]
    # C_h is linear in T: theta ~ N(mu, T Sigma), theta_a ~ N(mu, T (Sigma + eta I)).
    _check_against(cov_cold, _stationary_cov(eta, h, temp))
    ratio = np.diag(cov_cold) / np.diag(cov_warm)
    np.testing.assert_allclose(ratio, temp, rtol=0.1)


# --- 4. Minibatch gradients: Bayesian linear regression -----------------------------------


def test_minibatch_linear_regression():
    n, d, batch, noise_sd, prior_sd = 1000, 3, 32, 1.0, 10.0
    key_x, key_e, key_run = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(key_x, (n, d))
    w_true = jnp.array([1.0, -0.5, 2.0])
    y = x @ w_true + noise_sd * jax.random.normal(key_e, (n,))

    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    post_prec = xn.T @ xn / noise_sd**2 + np.eye(d) / prior_sd**2
    post_cov = np.linalg.inv(post_prec)
    post_mean = post_cov @ xn.T @ yn / noise_sd**2
    post_sd = np.sqrt(np.diag(post_cov))  # about 0.03

    def logprior_fn(w):
        return -0.5 * jnp.sum(w**2) / prior_sd**2

    def loglikelihood_fn(w, datum):
        xi, yi = datum
        return -0.5 * (yi - xi @ w) ** 2 / noise_sd**2

    grad_fn = blackjax.sgmcmc.gradients.grad_estimator(logprior_fn, loglikelihood_fn, n)
    eta, step_size = 1e-3, 1e-4  # eta ~ the posterior variance, so the guide matters
    sampler = as_top_level_api(grad_fn, eta)

    num_chains, num_burnin, num_samples = 128, 500, 1500

    def one_chain(key):
        def step(state, k):
            k_batch, k_step = jax.random.split(k)
            idx = jax.random.randint(k_batch, (batch,), 0, n)
            state = sampler.step(k_step, state, (x[idx], y[idx]), step_size)
            return state, (state.position, state.guide)

        state = sampler.init(jnp.zeros(d))
        keys = jax.random.split(key, num_burnin + num_samples)
        _, (theta, guide) = jax.lax.scan(step, state, keys)
        return theta[num_burnin:], guide[num_burnin:]

    theta, guide = jax.jit(jax.vmap(one_chain))(jax.random.split(key_run, num_chains))
    theta = np.asarray(theta, np.float64).reshape(-1, d)
    guide = np.asarray(guide, np.float64).reshape(-1, d)
    assert np.all(np.isfinite(theta)) and np.all(np.isfinite(guide))

    # Stochastic gradients are unbiased and the model is linear, so the chain's stationary
    # mean is the exact posterior mean (minibatch noise only inflates the spread). For a
    # Gaussian the smoothed guide shares that mean. Tolerance: 0.2 posterior sd.
    assert np.all(np.abs(theta.mean(0) - post_mean) <= 0.2 * post_sd)
    assert np.all(np.abs(guide.mean(0) - post_mean) <= 0.2 * post_sd)
    # The guide is the wider of the two (posterior + eta I, plus gradient noise).
    assert np.all(guide.var(0) > theta.var(0))


# --- 5. Pytree positions and the exact update ---------------------------------------------


def _dict_logdensity(position):
    return -0.5 * jnp.sum((position["w"] - 1.0) ** 2) - 2.0 * (position["b"] + 2.0) ** 2


def _dict_grad(position, minibatch):
    del minibatch
    return jax.grad(_dict_logdensity)(position)


def test_pytree_position_and_exact_update():
    eta, h = 0.3, 0.01
    position = {"w": jnp.arange(6.0).reshape(2, 3) / 6.0, "b": jnp.asarray(0.5)}

    state = init(position)
    assert isinstance(state, EntropySGLDState)
    assert jax.tree.structure(state.guide) == jax.tree.structure(position)
    for leaf_p, leaf_a in zip(jax.tree.leaves(position), jax.tree.leaves(state.guide)):
        np.testing.assert_array_equal(leaf_a, leaf_p)

    # Give the guide its own value so the coupling force is non-zero.
    guide = {"w": -jnp.ones((2, 3)), "b": jnp.asarray(1.5)}
    state = EntropySGLDState(position, guide)
    grad = _dict_grad(position, None)
    expected_theta = jax.tree.map(
        lambda p, g, a: p + h * (g - (p - a) / eta), position, grad, guide
    )
    expected_guide = jax.tree.map(lambda p, a: a + h * (p - a) / eta, position, guide)

    key = jax.random.key(3)
    cold = as_top_level_api(_dict_grad, eta, temperature=0.0)
    warm = as_top_level_api(_dict_grad, eta)
    kernel = build_kernel()
    for new in (
        jax.jit(cold.step)(key, state, None, h),  # default temperature of the API
        jax.jit(lambda k, s: warm.step(k, s, None, h, temperature=0.0))(key, state),
        jax.jit(lambda k, s: kernel(k, s, _dict_grad, None, h, eta, 0.0))(key, state),
    ):
        assert isinstance(new, EntropySGLDState)
        assert jax.tree.structure(new.position) == jax.tree.structure(position)
        assert jax.tree.structure(new.guide) == jax.tree.structure(position)
        expected = jax.tree.leaves((expected_theta, expected_guide))
        for got, want in zip(jax.tree.leaves(new), expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    # At T = 1 the noise has variance 2 h per coordinate, independently for theta and
    # theta_a; shapes and dtypes follow the input.
    new = jax.jit(warm.step)(key, state, None, h)
    for got, ref in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert np.all(np.isfinite(got))
    def flat(tree):
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    noise_theta = flat(new.position) - flat(expected_theta)
    noise_guide = flat(new.guide) - flat(expected_guide)
    assert not np.allclose(noise_theta, noise_guide)
    assert 0.3 < np.sqrt(np.mean(noise_theta**2)) / np.sqrt(2 * h) < 2.0
