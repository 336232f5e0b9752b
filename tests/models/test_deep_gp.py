"""Deep GP model: kernels, the collapsed Titsias bound at the optimal q of a one-layer model,
the AutoDSVI guide, minibatch unbiasedness, predictions, likelihoods and error messages."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.util import log_density, potential_energy
from scipy import stats

import bayesgen
from bayesgen.models.deep_gp import (
    AutoDSVI,
    ColumnwiseMultivariateNormal,
    DeepGP,
    GaussianExpectedLogLikelihood,
    deep_gp_log_predictive_density,
    deep_gp_predict,
    deep_gp_regression_metrics,
    kernel_diag,
    kmeans_inducing_inputs,
    matern12_kernel,
    matern32_kernel,
    matern52_kernel,
    rbf_kernel,
)
from bayesgen.models.deep_gp import _jittered_cholesky, _whitened_conditional

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """jaxlib's CPU triangular solves call scipy's OpenBLAS, whose worker threads can stall
    for milliseconds per call when the cores are shared; one BLAS thread keeps these small
    problems fast (about 8 ms -> 0.02 ms per 12 x 90 solve on a loaded 2-core machine)."""
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


RNG = np.random.default_rng(11)
N = 60
X1 = np.sort(RNG.uniform(-1.0, 1.0, size=(N, 1)), axis=0).astype(np.float32)
Y1 = (np.sin(3.0 * X1[:, 0]) + 0.1 * RNG.normal(size=N)).astype(np.float32)

# fixed hyperparameters of the Titsias checks
Z_FIXED = np.linspace(-1.0, 1.0, 8, dtype=np.float32)[:, None]
LENGTHSCALE, KVAR, NOISE, JITTER = 0.4, 1.3, 0.05, 1e-6
FIXED = {
    "Z0": jnp.asarray(Z_FIXED),
    "lengthscales0": jnp.asarray([LENGTHSCALE], jnp.float32),
    "kernel_variance0": jnp.asarray(KVAR, jnp.float32),
    "noise_variance": jnp.asarray(NOISE, jnp.float32),
}


def fix_params(model, values):
    """``model`` with its ``numpyro.param`` sites fixed to ``values`` and hidden from SVI."""
    return handlers.block(handlers.substitute(model, data=values), hide=list(values))


# --------------------------------------------------------------------------- kernels


def _hand_gram(x1, x2, ls, var, kind):
    out = np.zeros((len(x1), len(x2)))
    for i, a in enumerate(x1):
        for j, b in enumerate(x2):
            r = math.sqrt(sum(((a[d] - b[d]) / ls[d]) ** 2 for d in range(len(a))))
            if kind == "rbf":
                out[i, j] = var * math.exp(-0.5 * r * r)
            elif kind == "matern12":
                out[i, j] = var * math.exp(-r)
            elif kind == "matern32":
                out[i, j] = var * (1 + math.sqrt(3) * r) * math.exp(-math.sqrt(3) * r)
            else:
                s5 = math.sqrt(5) * r
                out[i, j] = var * (1 + s5 + s5 * s5 / 3) * math.exp(-s5)
    return out


KERNEL_FNS = {"rbf": rbf_kernel, "matern12": matern12_kernel, "matern32": matern32_kernel,
              "matern52": matern52_kernel}


@pytest.mark.parametrize("kind", list(KERNEL_FNS))
def test_kernel_gram_matches_formula_psd_and_diag(kind):
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    ls, var = np.array([0.7, 1.5, 2.0]), 1.7
    fn = KERNEL_FNS[kind]
    got = np.asarray(fn(jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(ls), var))
    np.testing.assert_allclose(got, _hand_gram(x1, x2, ls, var, kind), rtol=1e-5, atol=1e-6)
    # the Gram matrix of a set with itself: symmetric, PSD, diagonal = kernel_diag
    x = jnp.asarray(rng.normal(size=(25, 3)), jnp.float32)
    k = np.asarray(fn(x, x, jnp.asarray(ls, jnp.float32), var), np.float64)
    np.testing.assert_allclose(k, k.T, atol=1e-6)
    assert np.linalg.eigvalsh(k).min() > -1e-5 * var
    np.testing.assert_allclose(np.diag(k), np.asarray(kernel_diag(x, var)), rtol=1e-6)
    # gradients stay finite at coincident points (r = 0)
    g = jax.grad(lambda l: fn(x, x, l, var).sum())(jnp.asarray(ls, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


def test_jitter_is_raised_only_where_the_float32_factor_fails_and_the_gradient_stays_finite():
    rng = np.random.default_rng(0)
    ls, variance = jnp.ones(3), jnp.float32(1.3)
    spread = jnp.asarray(rng.normal(size=(30, 3)), jnp.float32)
    kzz = rbf_kernel(spread, spread, ls, variance)
    chol, used = _jittered_cholesky(kzz, 1e-6, variance)
    assert float(used) == pytest.approx(1e-6)  # well conditioned: the model is unchanged
    np.testing.assert_allclose(
        np.asarray(chol), np.asarray(jnp.linalg.cholesky(kzz + 1.3e-6 * jnp.eye(30))), atol=1e-6)

    # 100 inducing inputs within 1e-3 lengthscales of one point: singular to float32
    z = jnp.asarray(rng.normal(size=(1, 3)) + 1e-3 * rng.normal(size=(100, 3)), jnp.float32)
    kzz = rbf_kernel(z, z, ls, variance)
    assert not np.all(np.isfinite(np.asarray(jnp.linalg.cholesky(kzz + 1.3e-6 * jnp.eye(100)))))
    chol, used = _jittered_cholesky(kzz, 1e-6, variance)
    assert np.all(np.isfinite(np.asarray(chol))) and float(used) in (
        pytest.approx(1e-5), pytest.approx(1e-4))
    x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(100, 2)), jnp.float32)

    def loss(z, variance):
        mean, var = _whitened_conditional(rbf_kernel, x, z, ls, variance, v, 1e-6)
        return jnp.sum(mean**2) + jnp.sum(jnp.log(var))

    grads = jax.grad(loss, argnums=(0, 1))(z, variance)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_kmeans_and_mean_functions():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = np.concatenate([c + 0.1 * rng.normal(size=(30, 2)) for c in centres])
    z = kmeans_inducing_inputs(x, 3, seed=1)
    assert np.abs(np.sort(z, 0) - np.sort(centres, 0)).max() < 0.1
    # inner mean functions: SVD projection when narrowing, identity, zero padding
    x5 = rng.normal(size=(50, 5)) * np.array([5.0, 1.0, 3.0, 0.1, 0.2])
    narrow = DeepGP(x5, num_layers=3, num_inducing=10, hidden_dim=(3, 4))
    w0, w1 = narrow.mean_weights
    _, _, vt = np.linalg.svd(x5, full_matrices=False)
    np.testing.assert_allclose(np.abs(w0), np.abs(vt[:3].T), atol=1e-5)
    np.testing.assert_allclose(w1, np.eye(3, 4))
    np.testing.assert_allclose(narrow.inducing_init[1], narrow.inducing_init[0] @ w0, atol=1e-5)
    assert narrow.layer_dims == (3, 4, 1) and narrow.input_dims == (5, 3, 4)
    default = DeepGP(x5, num_layers=2, num_inducing=10)
    np.testing.assert_allclose(default.mean_weights[0], np.eye(5))  # min(30, 5) = 5
    assert default.latent_shapes == {"v0": (10, 5), "v1": (10, 1)}


# --------------------------------------------------------------------------- Titsias


def _titsias_reference():
    """Closed-form Titsias bound and the optimal q(V) in whitened coordinates (float64)."""
    x, y, z = X1.astype(np.float64), Y1.astype(np.float64), Z_FIXED.astype(np.float64)
    ls = np.array([LENGTHSCALE])
    kzz = _hand_gram(z, z, ls, KVAR, "rbf") + JITTER * KVAR * np.eye(len(z))
    kzx = _hand_gram(z, x, ls, KVAR, "rbf")
    qff = kzx.T @ np.linalg.solve(kzz, kzx)
    bound = stats.multivariate_normal(np.zeros(N), qff + NOISE * np.eye(N)).logpdf(y) - (
        N * KVAR - np.trace(qff)) / (2 * NOISE)
    # optimal q(U): S = K (K + s^-2 Kzx Kxz)^-1 K, m = s^-2 K (K + s^-2 Kzx Kxz)^-1 Kzx y
    middle = np.linalg.inv(kzz + kzx @ kzx.T / NOISE)
    s_u = kzz @ middle @ kzz
    m_u = kzz @ middle @ kzx @ y / NOISE
    chol = np.linalg.cholesky(kzz)
    m_v = np.linalg.solve(chol, m_u)
    s_v = np.linalg.solve(chol, np.linalg.solve(chol, s_u).T)
    return bound, m_v, 0.5 * (s_v + s_v.T)


def _gauss_kl(m0, s0, m1, s1):
    k = len(m0)
    s1_inv = np.linalg.inv(s1)
    d = m1 - m0
    return 0.5 * (np.trace(s1_inv @ s0) + d @ s1_inv @ d - k
                  + np.linalg.slogdet(s1)[1] - np.linalg.slogdet(s0)[1])


@pytest.fixture(scope="module")
def one_layer():
    model = DeepGP(X1, num_layers=1, inducing_init=Z_FIXED, jitter=JITTER)
    return model, fix_params(model, FIXED)


def test_one_layer_elbo_at_the_optimal_q_is_the_titsias_bound(one_layer):
    model, fixed = one_layer
    bound, m_v, s_v = _titsias_reference()
    # log p(y, V) - log q*(V) is the same constant, the bound, for every V (q* is the exact
    # normalised posterior of the bound's Gaussian log joint)
    q = stats.multivariate_normal(m_v, s_v)
    draws = q.rvs(size=5, random_state=np.random.default_rng(0))
    for v in draws:
        lp, _ = log_density(fixed, (X1, Y1), {}, {"v0": jnp.asarray(v[:, None], jnp.float32)})
        assert float(lp) - q.logpdf(v) == pytest.approx(bound, abs=0.05)
    # the same through the guide: Trace_ELBO with AutoDSVI at the optimum, any seed
    guide = AutoDSVI(fixed)
    params = {"v0_dsvi_loc": jnp.asarray(m_v[None], jnp.float32),
              "v0_dsvi_scale_tril": jnp.asarray(np.linalg.cholesky(s_v)[None], jnp.float32)}
    for seed in range(3):
        loss = Trace_ELBO().loss(jax.random.PRNGKey(seed), params, fixed, guide, X1, Y1)
        assert -float(loss) == pytest.approx(bound, abs=0.05)
    # closed-form KL (TraceMeanField_ELBO): the likelihood term is still a Monte Carlo
    # average, so agreement is up to its error
    loss = TraceMeanField_ELBO(num_particles=4000).loss(
        jax.random.PRNGKey(0), params, fixed, guide, X1, Y1)
    assert -float(loss) == pytest.approx(bound, abs=0.1)


def _fit_guide(model, guide, steps, lr, loss=None):
    # cosine decay to lr / 100: the Monte Carlo noise floor of Adam would otherwise keep
    # the full-covariance q about a nat from the optimum of this ill-conditioned posterior
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    svi = SVI(model, guide, optimizer, loss or Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), X1, Y1)

    @jax.jit
    def run(state):
        return jax.lax.scan(lambda s, _: svi.update(s, X1, Y1), state, None, length=steps)

    state, losses = run(state)
    assert np.all(np.isfinite(np.asarray(losses)))
    return svi.get_params(state)


def test_fitted_gaussian_guides_reach_the_titsias_bound(one_layer):
    model, fixed = one_layer
    bound, m_v, s_v = _titsias_reference()
    many = Trace_ELBO(num_particles=2000)

    # AutoDSVI (closed-form KL), fitted from its default start
    guide = AutoDSVI(fixed)
    params = _fit_guide(fixed, guide, 4000, 0.05, TraceMeanField_ELBO())
    m = np.asarray(params["v0_dsvi_loc"][0], np.float64)
    tril = np.asarray(params["v0_dsvi_scale_tril"][0], np.float64)
    gap = _gauss_kl(m, tril @ tril.T, m_v, s_v)  # bound - ELBO(q), exactly
    assert 0.0 <= gap < 0.5
    elbo = -float(many.loss(jax.random.PRNGKey(1), params, fixed, guide, X1, Y1))
    assert bound - 0.5 < elbo < bound + 0.05

    # a deliberately worse q (optimal mean, covariance x 4) is strictly below, by its KL
    worse = {"v0_dsvi_loc": jnp.asarray(m_v[None], jnp.float32),
             "v0_dsvi_scale_tril": jnp.asarray(2.0 * np.linalg.cholesky(s_v)[None], jnp.float32)}
    kl = _gauss_kl(m_v, 4.0 * s_v, m_v, s_v)
    assert kl > 2.0
    elbo = -float(many.loss(jax.random.PRNGKey(3), worse, fixed, guide, X1, Y1))
    assert elbo == pytest.approx(bound - kl, abs=0.3)
    assert elbo < bound - 1.0


@pytest.mark.slow
def test_auto_multivariate_normal_reaches_the_titsias_bound(one_layer):
    _, fixed = one_layer
    bound, _, _ = _titsias_reference()
    mvn = AutoMultivariateNormal(fixed, init_scale=0.1)
    params = _fit_guide(fixed, mvn, 4000, 0.05)
    elbo = -float(Trace_ELBO(num_particles=2000).loss(
        jax.random.PRNGKey(2), params, fixed, mvn, X1, Y1))
    assert bound - 0.5 < elbo < bound + 0.05


def test_predictive_variance_grows_away_from_the_data(one_layer):
    model, _ = one_layer
    _, m_v, s_v = _titsias_reference()
    draws = np.random.default_rng(0).multivariate_normal(m_v, s_v, size=300)
    samples = {"v0": jnp.asarray(draws[:, :, None], jnp.float32)}
    x_new = np.array([[-0.9], [-0.3], [0.0], [0.4], [0.9], [4.0]], np.float32)
    pred = deep_gp_predict(model, samples, FIXED, x_new, rng_key=jax.random.PRNGKey(0))
    var = np.asarray(pred.variance)
    assert var[:-1].max() < 0.1
    assert var[-1] == pytest.approx(KVAR + NOISE, rel=0.05)  # back to the prior far away
    assert var[-1] > 10 * var[:-1].max()
    # the mean follows the data inside and reverts to the zero mean far away
    np.testing.assert_allclose(np.asarray(pred.mean[:-1]), np.sin(3 * x_new[:-1, 0]), atol=0.2)
    assert abs(float(pred.mean[-1])) < 0.05
    assert pred.samples.shape == (300, 6) and pred.probs is None
    # log predictive density equals the mixture of Gaussians computed by hand
    y_new = np.sin(3 * x_new[:, 0])
    lpd = np.asarray(deep_gp_log_predictive_density(pred, y_new))
    mu, v = np.asarray(pred.f_mean[..., 0], np.float64), np.asarray(pred.f_var, np.float64) + NOISE
    dens = stats.norm(mu, np.sqrt(v)).pdf(y_new).mean(0)
    np.testing.assert_allclose(lpd, np.log(dens), rtol=1e-4, atol=1e-4)
    # Predictive runs the model itself on new inputs with the same draws
    y_rep = Predictive(handlers.substitute(model, data=FIXED), posterior_samples=samples)(
        jax.random.PRNGKey(1), x_new)["y"]
    assert y_rep.shape == (300, 6)
    assert np.var(np.asarray(y_rep[:, -1])) == pytest.approx(float(pred.variance[-1]), rel=0.25)
    rmse, ll = deep_gp_regression_metrics(pred, y_new, y_scale=2.0)
    assert rmse == pytest.approx(2.0 * np.sqrt(np.mean((np.asarray(pred.mean) - y_new) ** 2)),
                                 rel=1e-5)
    assert ll == pytest.approx(np.mean(np.log(dens)) - math.log(2.0), abs=1e-3)


# --------------------------------------------------------------------------- minibatches


def test_minibatch_log_likelihood_is_unbiased(one_layer):
    model, fixed = one_layer
    v = {"v0": jnp.asarray(np.random.default_rng(1).normal(size=(8, 1)), jnp.float32)}
    full, _ = log_density(fixed, (X1, Y1), {}, v)
    # a partition of the data into 6 batches of 10: the scaled batch log-likelihoods average
    # to the full-data log-likelihood exactly (the prior term is the same in each)
    perm = np.random.default_rng(2).permutation(N)
    parts = []
    for idx in perm.reshape(6, 10):
        batched = handlers.substitute(fixed, data={"data": jnp.asarray(idx)})
        lp, tr = log_density(batched, (X1, Y1), {"batch_size": 10}, v)
        assert tr["y"]["scale"] == pytest.approx(N / 10) and tr["y"]["value"].shape == (10,)
        parts.append(float(lp))
    assert np.mean(parts) == pytest.approx(float(full), rel=1e-5)

    # seeded random minibatches of a 2-layer model (stochastic inner layer): the mean over
    # seeds of the minibatch estimate matches the mean of the full-data estimate
    deep = DeepGP(X1, num_layers=2, num_inducing=8)
    latents = {"v0": jnp.asarray(0.3 * np.random.default_rng(3).normal(size=(8, 1)), jnp.float32),
               "v1": jnp.asarray(np.random.default_rng(4).normal(size=(8, 1)), jnp.float32)}

    def estimate(key, batch_size):
        seeded = handlers.seed(deep, key)
        return log_density(seeded, (X1, Y1), {"batch_size": batch_size},
                           {**deep.init_params(), **latents})[0]

    keys = jax.random.split(jax.random.PRNGKey(5), 400)
    est_batch = np.asarray(jax.jit(jax.vmap(lambda k: estimate(k, 12)))(keys))
    est_full = np.asarray(jax.jit(jax.vmap(lambda k: estimate(k, None)))(keys))
    se = math.sqrt(est_batch.var() / 400 + est_full.var() / 400)
    assert est_batch.std() > 0  # it is random
    assert abs(est_batch.mean() - est_full.mean()) < 4 * se


def test_unseeded_potential_is_deterministic():
    deep = DeepGP(X1, num_layers=3, num_inducing=8, hidden_dim=2, kernel="matern32")
    latents = {k: jnp.full(s, 0.1, jnp.float32) for k, s in deep.latent_shapes.items()}
    model = handlers.substitute(deep, data=deep.init_params())
    a = potential_energy(model, (X1, Y1), {}, latents)
    b = potential_energy(model, (X1, Y1), {}, latents)
    assert np.isfinite(float(a)) and float(a) == float(b)


# --------------------------------------------------------------------------- training


X_TEST = np.linspace(-0.95, 0.95, 40, dtype=np.float32)[:, None]
Y_TEST = np.sin(3.0 * X_TEST[:, 0])


@pytest.mark.parametrize(
    "guide_name", ["AutoDSVI", "AutoNormal", pytest.param("AutoRealNVP", marks=pytest.mark.slow)])
def test_two_layer_dgp_trains_with_guides(guide_name):
    model = DeepGP(X1, num_layers=2, num_inducing=10)
    if guide_name == "AutoDSVI":
        guide, steps = AutoDSVI(model), 1500
    elif guide_name == "AutoNormal":
        guide, steps = AutoNormal(model, init_scale=0.01), 1500
    else:
        guide, steps = bayesgen.AutoRealNVP(model, init_scale=None), 500
    result = bayesgen.fit(model, guide, X1, Y1, steps=steps, optimizer=optax.adam(0.01),
                          progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    assert result.losses[-100:].mean() < result.losses[:100].mean()
    draws = result.sample(num_samples=100)
    assert draws["v0"].shape == (100, 10, 1) and draws["v1"].shape == (100, 10, 1)
    x_new = np.concatenate([X_TEST, [[4.0]]]).astype(np.float32)
    pred = deep_gp_predict(model, draws, result.params, x_new, rng_key=jax.random.PRNGKey(0))
    rmse, ll = deep_gp_regression_metrics(pred._replace(
        mean=pred.mean[:-1], f_mean=pred.f_mean[:, :-1], f_var=pred.f_var[:, :-1]), Y_TEST)
    assert np.isfinite(ll)
    assert rmse < 0.5 * Y1.std()  # far better than the prior (RMSE about the data sd)
    if guide_name == "AutoDSVI":
        assert rmse < 0.2
        # far from the data the variance returns to the last layer's prior (its kernel
        # variance, learned below the data variance since the inner layer carries the scale)
        prior_var = float(result.params["kernel_variance1"] + result.params["noise_variance"])
        assert float(pred.variance[-1]) == pytest.approx(prior_var, rel=0.3)
        assert float(pred.variance[-1]) > 2.5 * float(np.mean(pred.variance[:-1]))


@pytest.mark.slow
def test_minibatch_training_with_svi():
    model = DeepGP(X1, num_layers=2, num_inducing=10)
    guide = AutoDSVI(model)
    result = bayesgen.fit(model, guide, X1, Y1, steps=1500, optimizer=optax.adam(0.01),
                          progress_bar=False, batch_size=20)
    assert np.all(np.isfinite(result.losses))
    pred = deep_gp_predict(model, result.sample(num_samples=50), result.params, X_TEST,
                           rng_key=jax.random.PRNGKey(0))
    rmse, _ = deep_gp_regression_metrics(pred, Y_TEST)
    assert rmse < 0.5 * Y1.std()


# --------------------------------------------------------------------------- classification


def _two_moons_like(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n, 2)).astype(np.float32)
    labels = (x[:, 1] > np.sin(2 * x[:, 0])).astype(np.int32)
    return x, labels


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical"])
def test_classification_likelihoods_run_and_give_probabilities(likelihood):
    x, labels = _two_moons_like(50, 0)
    num_classes = 3 if likelihood == "categorical" else None
    if likelihood == "categorical":
        labels = labels + (x[:, 0] > 1.0)
    model = DeepGP(x, num_layers=2, num_inducing=8, likelihood=likelihood,
                   num_classes=num_classes)
    guide = AutoDSVI(model)
    svi = SVI(model, guide, optax.adam(0.01), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, labels)
    if likelihood == "bernoulli":  # one jitted step: finite loss and gradients
        state, loss = jax.jit(svi.update)(state, x, labels)
    else:  # the loss only (eager, cheap to compile)
        loss = svi.evaluate(state, x, labels)
    assert np.isfinite(float(loss))
    params = svi.get_params(state)
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(16,))
    pred = deep_gp_predict(model, draws, params, x, rng_key=jax.random.PRNGKey(2))
    k = num_classes or 2
    probs = np.asarray(pred.probs)
    assert probs.shape == (50, k) and np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert pred.samples.shape == (16, 50) and set(np.unique(pred.samples)) <= set(range(k))
    lpd = np.asarray(deep_gp_log_predictive_density(pred, labels))
    np.testing.assert_allclose(lpd, np.log(probs[np.arange(50), labels]), rtol=1e-5)


@pytest.mark.slow
def test_bernoulli_likelihood_fits():
    x, labels = _two_moons_like(120, 0)
    model = DeepGP(x, num_layers=2, num_inducing=15, likelihood="bernoulli")
    guide = AutoDSVI(model)
    result = bayesgen.fit(model, guide, x, labels, steps=800, optimizer=optax.adam(0.02),
                          progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    x_test, y_test = _two_moons_like(200, 1)
    pred = deep_gp_predict(model, result.sample(num_samples=64), result.params, x_test,
                           rng_key=jax.random.PRNGKey(0))
    probs = np.asarray(pred.probs)
    assert probs.shape == (200, 2) and np.all((probs >= 0) & (probs <= 1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == y_test).mean() > 0.85
    assert set(np.unique(np.asarray(pred.samples))) <= {0, 1}
    nll = -np.asarray(deep_gp_log_predictive_density(pred, y_test)).mean()
    assert np.isfinite(nll) and nll < math.log(2)


@pytest.mark.slow
def test_categorical_likelihood_fits():
    rng = np.random.default_rng(0)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    labels = rng.integers(0, 3, size=90)
    x = (centres[labels] + 0.5 * rng.normal(size=(90, 2))).astype(np.float32)
    model = DeepGP(x, num_layers=2, num_inducing=12, likelihood="categorical", num_classes=3)
    assert model.layer_dims == (2, 3)
    guide = AutoDSVI(model)
    result = bayesgen.fit(model, guide, x, labels, steps=600, optimizer=optax.adam(0.02),
                          progress_bar=False)
    assert np.all(np.isfinite(result.losses))
    pred = deep_gp_predict(model, result.sample(num_samples=32), result.params, centres,
                           rng_key=jax.random.PRNGKey(0))
    probs = np.asarray(pred.probs)
    assert probs.shape == (3, 3) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), [0, 1, 2])


# --------------------------------------------------------------------------- pieces


def test_columnwise_normal_density_sampling_and_kl():
    rng = np.random.default_rng(0)
    m, d = 4, 3
    loc = rng.normal(size=(d, m))
    diag = np.eye(m) * rng.uniform(0.5, 1.5, (d, 1, m))
    tril = np.tril(rng.normal(size=(d, m, m)), -1) * 0.5 + diag
    q = ColumnwiseMultivariateNormal(jnp.asarray(loc, jnp.float32), jnp.asarray(tril, jnp.float32))
    assert q.event_shape == (m, d)
    value = rng.normal(size=(m, d))
    expected = sum(stats.multivariate_normal(loc[j], tril[j] @ tril[j].T).logpdf(value[:, j])
                   for j in range(d))
    assert float(q.log_prob(jnp.asarray(value, jnp.float32))) == pytest.approx(expected, rel=1e-5)
    draws = np.asarray(q.sample(jax.random.PRNGKey(0), (20000,)), np.float64)
    assert draws.shape == (20000, m, d)
    np.testing.assert_allclose(draws.mean(0), loc.T, atol=0.05)
    np.testing.assert_allclose(np.cov(draws[:, :, 1].T), tril[1] @ tril[1].T, atol=0.08)
    prior = numpyro.distributions.Normal(0.0, 1.0).expand([m, d]).to_event(2)
    kl = float(numpyro.distributions.kl_divergence(q, prior))
    expected_kl = sum(_gauss_kl(loc[j], tril[j] @ tril[j].T, np.zeros(m), np.eye(m))
                      for j in range(d))
    assert kl == pytest.approx(expected_kl, rel=1e-5)


def test_gaussian_expected_log_likelihood_site():
    site = GaussianExpectedLogLikelihood(jnp.array([0.5]), jnp.array([0.2]), 0.1)
    # E_{f ~ N(0.5, 0.2)} log N(1.0; f, 0.1), by quadrature
    f = np.linspace(0.5 - 8 * math.sqrt(0.2), 0.5 + 8 * math.sqrt(0.2), 20001)
    w = stats.norm(0.5, math.sqrt(0.2)).pdf(f)
    expected = np.trapezoid(w * stats.norm(f, math.sqrt(0.1)).logpdf(1.0), f)
    assert float(site.log_prob(1.0)[0]) == pytest.approx(expected, abs=1e-4)
    draws = np.asarray(site.sample(jax.random.PRNGKey(0), (50000,)))
    assert draws.var() == pytest.approx(0.3, rel=0.03)
    assert float(site.variance[0]) == pytest.approx(0.3)


# --------------------------------------------------------------------------- errors


def test_param_init_starts_the_named_parameters_there_and_is_checked():
    """A warm start: the parameters named in ``param_init`` start SVI at those values (the
    others at their defaults), and a bad name, shape or value is refused by name."""
    x = np.concatenate([X1, X1 ** 2], axis=1)
    base = DeepGP(x, num_layers=2, num_inducing=6)
    start = {"noise_variance": 0.2, "lengthscales1": np.array([0.5, 0.7], np.float32),
             "Z0": base.init_params()["Z0"] + 1.0}
    model = DeepGP(x, num_layers=2, num_inducing=6, param_init=start)
    svi = SVI(model, AutoDSVI(model), optax.adam(1e-3), TraceMeanField_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), x, Y1))
    for name, value in start.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-6, err_msg=name)
    for name in ("Z1", "lengthscales0", "kernel_variance0", "kernel_variance1"):
        np.testing.assert_allclose(params[name], base.init_params()[name], rtol=1e-6,
                                   err_msg=name)
    with pytest.raises(ValueError, match=r"param_init names \['auto_loc'\], which are not"):
        DeepGP(x, num_layers=2, num_inducing=6, param_init={"auto_loc": 0.0})
    with pytest.raises(ValueError, match=r"param_init\['lengthscales0'\] has shape \(3,\)"):
        DeepGP(x, num_layers=2, num_inducing=6, param_init={"lengthscales0": np.ones(3)})
    with pytest.raises(ValueError, match=r"param_init\['noise_variance'\] must be above"):
        DeepGP(x, num_layers=2, num_inducing=6, param_init={"noise_variance": 0.0})
    with pytest.raises(ValueError, match=r"param_init\['Z1'\] has NaN"):
        DeepGP(x, num_layers=2, num_inducing=6, param_init={"Z1": np.full((6, 2), np.nan)})
    with pytest.raises(ValueError, match="param_init must be a dict"):
        DeepGP(x, num_layers=2, num_inducing=6, param_init=[("noise_variance", 0.1)])


def test_errors_name_the_argument():
    x = X1
    with pytest.raises(ValueError, match="num_inducing=100 exceeds the 60 training points"):
        DeepGP(x)  # default M = 100 > N
    with pytest.raises(ValueError, match="kernel must be one of"):
        DeepGP(x, num_inducing=5, kernel="periodic")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        DeepGP(x, num_inducing=5, likelihood="poisson")
    with pytest.raises(ValueError, match="needs num_classes"):
        DeepGP(x, num_inducing=5, likelihood="categorical")
    with pytest.raises(ValueError, match="num_classes is only used"):
        DeepGP(x, num_inducing=5, num_classes=3)
    with pytest.raises(ValueError, match="num_layers"):
        DeepGP(x, num_layers=0, num_inducing=5)
    with pytest.raises(ValueError, match="hidden_dim has 2 entries"):
        DeepGP(x, num_layers=2, num_inducing=5, hidden_dim=(3, 3))
    with pytest.raises(ValueError, match="inducing_init must be an \\(M, 1\\) array"):
        DeepGP(x, inducing_init=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="num_inducing=4 disagrees"):
        DeepGP(x, num_inducing=4, inducing_init=np.zeros((5, 1)))
    with pytest.raises(ValueError, match="x must be a non-empty"):
        DeepGP(x[:, 0])
    model = DeepGP(x, num_layers=1, num_inducing=5)
    assert DeepGP(x, num_layers=1, inducing_init=np.zeros((200, 1))).num_inducing == 200
    tr = functools.partial(handlers.trace, handlers.seed(model, 0))
    with pytest.raises(ValueError, match=r"y must have shape \(60,\)"):
        tr().get_trace(x, Y1[:10])
    with pytest.raises(ValueError, match=r"x must be a non-empty \(n, 1\) array"):
        tr().get_trace(np.zeros((60, 2), np.float32), Y1)
    with pytest.raises(ValueError, match="batch_size"):
        tr().get_trace(x, Y1, batch_size=0)
    clf = DeepGP(x, num_layers=1, num_inducing=5, likelihood="categorical", num_classes=3)
    with pytest.raises(ValueError, match=r"integer labels in \[0, 3\)"):
        handlers.trace(handlers.seed(clf, 0)).get_trace(x, np.full(60, 3))
    with pytest.raises(ValueError, match="params lacks the DeepGP parameters"):
        deep_gp_predict(model, {"v0": jnp.zeros((2, 5, 1))}, {}, x, rng_key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="samples lacks the latent sites"):
        deep_gp_predict(model, {}, model.init_params(), x, rng_key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="init_scale"):
        AutoDSVI(model, init_scale=0.0)

    def scalar_model():
        numpyro.sample("a", numpyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'a'"):
        handlers.seed(AutoDSVI(scalar_model), 0)()
