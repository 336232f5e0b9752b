"""Benchmark targets: exact draws, densities, normalisers and stored references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density
from scipy import stats
from scipy.special import logsumexp

from bayesgen.datasets import BREAST_CANCER_FEATURES, load_breast_cancer
from bayesgen.models import targets as T

ANALYTIC = ["gaussian", "conjugate_gaussian", "banana", "funnel", "ring"]
N_DRAWS = 100_000


@pytest.fixture(scope="module")
def analytic():
    return {name: T.get_target(name) for name in ANALYTIC}


@pytest.fixture(scope="module")
def draws(analytic):
    return {
        name: t.reference(jax.random.key(i), N_DRAWS) for i, (name, t) in enumerate(analytic.items())
    }


def model_log_density(target, points):
    """numpyro's log density of the model, vmapped over the leading axis of ``points``."""

    def one(p):
        return log_density(target.model, target.args, dict(target.kwargs), p)[0]

    return np.asarray(jax.jit(jax.vmap(one))(points), np.float64)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_target_and_rejects_unknown_names():
    assert set(T.TARGETS) >= set(ANALYTIC) | {
        "eight_schools_centered",
        "eight_schools_noncentered",
        "logistic_regression",
    }
    with pytest.raises(ValueError, match="available targets"):
        T.get_target("bananas")


@pytest.mark.parametrize("name", list(T.TARGETS))
def test_latent_dim_matches_the_models_latent_sites(name):
    t = T.get_target(name)
    tr = handlers.trace(handlers.seed(t.model, 0)).get_trace(*t.args, **t.kwargs)
    size = sum(
        int(np.prod(site["value"].shape))
        for site in tr.values()
        if site["type"] == "sample" and not site["is_observed"]
    )
    assert size == t.latent_dim


# --------------------------------------------------------------------------- exact draws


@pytest.mark.parametrize("name", ["gaussian", "conjugate_gaussian", "banana", "ring"])
def test_exact_draws_match_closed_form_moments(name, analytic, draws):
    t, d = analytic[name], draws[name]
    for site, x in d.items():
        x = np.asarray(x, np.float64)
        assert x.shape[0] == N_DRAWS
        mean, sd = np.asarray(t.true_mean[site]), np.asarray(t.true_sd[site])
        se = sd / math.sqrt(N_DRAWS)
        np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * se)
        np.testing.assert_allclose(x.std(0), sd, rtol=0.03)


def test_gaussian_draws_match_covariance(analytic, draws):
    t = analytic["gaussian"]
    cov = t.extra["cov"]
    emp = np.cov(np.asarray(draws["gaussian"]["z"], np.float64).T)
    sd = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(emp / np.outer(sd, sd), cov / np.outer(sd, sd), atol=0.03)
    eig = np.linalg.eigvalsh(cov)
    assert 10 <= eig[-1] / eig[0] <= 100
    assert np.all(np.abs(t.true_mean["z"]) > 0)


def test_funnel_draws_and_truth():
    t = T.get_target("funnel")
    d = t.reference(jax.random.key(3), N_DRAWS)
    v = np.asarray(d["v"], np.float64)
    x = np.asarray(d["x"], np.float64)
    assert v.shape == (N_DRAWS,) and x.shape == (N_DRAWS, 9)
    assert abs(v.mean()) < 5 * 3 / math.sqrt(N_DRAWS)
    np.testing.assert_allclose(v.std(), 3.0, rtol=0.02)
    z = x / np.exp(v / 2)[:, None]  # x_i | v ~ N(0, exp(v/2)): standardised x is N(0, 1)
    np.testing.assert_array_less(np.abs(z.mean(0)), 5 / math.sqrt(N_DRAWS))
    np.testing.assert_allclose(z.std(0), 1.0, rtol=0.02)
    # sd(x_i)^2 = E[e^v] = integral of e^v N(v; 0, 9), by quadrature
    grid = np.linspace(-40, 40, 200_001)
    ev = np.trapezoid(np.exp(grid) * stats.norm.pdf(grid, 0, 3), grid)
    np.testing.assert_allclose(t.true_sd["x"], np.sqrt(ev), rtol=1e-6)
    assert float(t.true_sd["v"]) == 3.0


def test_ring_modes_covered():
    t = T.get_target("ring")
    z = t.reference(jax.random.key(5), 20_000)["z"]
    assert T.modes_covered(z) == 8
    assert T.modes_covered({"z": z}) == 8
    # keep only draws near three of the centres
    near = ((z[:, None] - t.extra["centers"][None]) ** 2).sum(-1).argmin(1)
    assert T.modes_covered(z[np.isin(near, [0, 3, 5])]) == 3
    # one mode holding 1% of the draws does not count
    few = np.concatenate([z[near == 0][:10], z[near == 1][:1000]])
    assert T.modes_covered(few) == 1


# --------------------------------------------------------------------------- densities


def _analytic_log_density(name, t, p):
    """Independent numpy/scipy formula for each analytic target."""
    if name == "gaussian":
        return stats.multivariate_normal(t.extra["mean"], t.extra["cov"]).logpdf(p["z"])
    if name == "conjugate_gaussian":
        return stats.multivariate_normal(t.extra["post_mean"], t.extra["post_cov"]).logpdf(
            p["z"]
        ) + t.log_Z
    if name == "banana":
        y1, y2 = p["z"][:, 0], p["z"][:, 1]
        return stats.norm(0, 10).logpdf(y1) + stats.norm.logpdf(y2 - 0.03 * y1**2 + 3.0)
    if name == "funnel":
        v, x = p["v"], p["x"]
        return stats.norm(0, 3).logpdf(v) + stats.norm.logpdf(x, 0, np.exp(v / 2)[:, None]).sum(1)
    if name == "ring":
        c = T.ring_centers(8, 5.0)
        comp = stats.norm.logpdf(p["z"][:, None, :], c[None], 0.5).sum(-1)
        return logsumexp(comp, axis=1) - math.log(8)
    raise KeyError(name)


@pytest.mark.parametrize("name", ANALYTIC)
def test_model_log_density_matches_analytic(name, analytic, draws):
    t = analytic[name]
    pts = {k: np.asarray(v[:200], np.float64) for k, v in draws[name].items()}
    # spread the points beyond the bulk too
    pts = {k: np.concatenate([v, 1.5 * v]) for k, v in pts.items()}
    expected = _analytic_log_density(name, t, pts)
    got = model_log_density(t, {k: jnp.asarray(v, jnp.float32) for k, v in pts.items()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-3)
    # the target's own normalised log_prob = model log density - log_Z
    own = np.asarray(t.log_prob({k: jnp.asarray(v, jnp.float32) for k, v in pts.items()}))
    np.testing.assert_allclose(own + t.log_Z, got, rtol=1e-4, atol=2e-3)


def _grid_log_Z(t, lo, hi, n):
    g0 = np.linspace(lo[0], hi[0], n[0])
    g1 = np.linspace(lo[1], hi[1], n[1])
    Z0, Z1 = np.meshgrid(g0, g1, indexing="ij")
    pts = np.stack([Z0.ravel(), Z1.ravel()], -1).astype(np.float32)
    lp = model_log_density(t, {"z": jnp.asarray(pts)}).reshape(Z0.shape)
    m = lp.max()
    integral = np.trapezoid(np.trapezoid(np.exp(lp - m), g1, axis=1), g0)
    return m + math.log(integral)


def test_ring_log_Z_by_grid_integration(analytic):
    t = analytic["ring"]
    assert abs(_grid_log_Z(t, (-8.5, -8.5), (8.5, 8.5), (341, 341)) - t.log_Z) < 1e-3


def test_banana_log_Z_by_grid_integration(analytic):
    t = analytic["banana"]
    # y1 within 7 sd; y2 - 0.03 (y1^2 - 100) within [-5, 5] sd across that range
    assert abs(_grid_log_Z(t, (-70.0, -8.0), (70.0, 155.0), (701, 1631)) - t.log_Z) < 1e-3


# --------------------------------------------------------------------------- conjugate model


@pytest.mark.parametrize("dim", [3, 8])
def test_conjugate_posterior_agrees_with_gaussian_conditioning(dim):
    model, data, post_mean, post_cov = T.conjugate_gaussian_model(dim)
    A = np.asarray(data["A"], np.float64)
    m0 = np.asarray(data["prior_mean"], np.float64)
    S0 = np.asarray(data["prior_cov"], np.float64)
    y = np.asarray(data["y"], np.float64)
    s2 = data["noise_scale"] ** 2
    # joint Gaussian of (z, y), conditioned on y (covariance form, no precision matrices)
    Syy = A @ S0 @ A.T + s2 * np.eye(len(y))
    K = np.linalg.solve(Syy, A @ S0).T  # S0 A^T Syy^-1
    np.testing.assert_allclose(post_mean, m0 + K @ (y - A @ m0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(post_cov, S0 - K @ A @ S0, rtol=1e-6, atol=1e-8)
    # the posterior is genuinely correlated
    sd = np.sqrt(np.diag(post_cov))
    corr = post_cov / np.outer(sd, sd)
    assert np.abs(corr - np.eye(dim)).max() > 0.3
    # log joint - log posterior = log evidence, at any z
    zs = np.random.default_rng(0).multivariate_normal(post_mean, 4 * post_cov, size=50)
    got = np.asarray(
        jax.vmap(lambda z: log_density(model, (), data, {"z": z})[0])(jnp.asarray(zs, jnp.float32)),
        np.float64,
    )
    diff = got - stats.multivariate_normal(post_mean, post_cov).logpdf(zs)
    log_ev = stats.multivariate_normal(A @ m0, Syy).logpdf(y)
    np.testing.assert_allclose(diff, log_ev, atol=5e-3)
    assert abs(T.ConjugateGaussian(model, data, post_mean, post_cov).log_evidence - log_ev) < 1e-8


# --------------------------------------------------------------------------- stored references


def test_eight_schools_reference_file():
    ref = T.load_reference("eight_schools")
    for k in ("mu", "tau", "theta"):
        assert ref[k].dtype == np.float32
    n = ref["mu"].shape[0]
    assert n >= 10_000 and ref["tau"].shape == (n,) and ref["theta"].shape == (n, 8)
    for k in ("meta_num_warmup", "meta_num_samples", "meta_seed", "meta_num_chains",
              "meta_numpyro_version", "meta_max_rhat"):
        assert k in ref
    assert float(ref["meta_max_rhat"]) < 1.01
    assert abs(ref["mu"].mean() - 4.4) < 0.3
    assert abs(ref["tau"].mean() - 3.6) < 0.3
    assert np.all(ref["tau"] > 0)
    path = T._data_path("eight_schools_reference.npz")
    with __import__("importlib").resources.as_file(path) as p:
        assert p.stat().st_size < 2_000_000


def test_eight_schools_targets_share_the_reference():
    c = T.get_target("eight_schools_centered")
    nc = T.get_target("eight_schools_noncentered")
    rc = c.reference(jax.random.key(0), 500)
    rnc = nc.reference(jax.random.key(0), 500)
    assert set(rc) == {"mu", "tau", "theta"}
    assert set(rnc) == {"mu", "tau", "theta", "theta_tilde"}
    np.testing.assert_allclose(rnc["mu"], rc["mu"])
    np.testing.assert_allclose(
        rnc["mu"][:, None] + rnc["tau"][:, None] * rnc["theta_tilde"], rnc["theta"], atol=1e-3
    )
    lp = model_log_density(c, {k: jnp.asarray(v) for k, v in rc.items()})
    assert np.all(np.isfinite(lp))
    with pytest.raises(ValueError, match="stored"):
        c.reference(jax.random.key(0), 10**7)
    m = T.reference_moments(nc)
    assert abs(m["tau"][0] - 3.6) < 0.3 and m["theta"][1].shape == (8,)


def test_breast_cancer_loader():
    X, y = load_breast_cancer()
    assert X.shape == (569, 30) and y.shape == (569,)
    assert int(y.sum()) == 212 and set(np.unique(y)) == {0, 1}
    X2, _, names = load_breast_cancer(return_feature_names=True)
    assert names == BREAST_CANCER_FEATURES and len(names) == 30
    X2[0, 0] = -1.0
    assert load_breast_cancer()[0][0, 0] == 17.99  # callers get copies


@pytest.mark.parametrize("standardize", [True, False])
def test_logistic_regression_reference(standardize):
    t = T.get_target("logistic_regression", standardize=standardize)
    X = np.asarray(t.args[0], np.float64)
    if standardize:
        np.testing.assert_allclose(X.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(X.std(0), 1, rtol=1e-4)
    ref = t.reference(jax.random.key(1), 2000)
    assert ref["intercept"].shape == (2000,) and ref["beta"].shape == (2000, 30)
    lp = model_log_density(t, {k: jnp.asarray(v) for k, v in ref.items()})
    assert np.all(np.isfinite(lp))
    # the posterior-mean classifier fits the training data
    logits = ref["intercept"].mean() + X @ ref["beta"].mean(0)
    y = np.asarray(t.kwargs["y"])
    assert ((logits > 0) == (y == 1)).mean() > 0.95
    meta = T.load_reference(t.extra["reference_name"])
    assert float(meta["meta_max_rhat"]) < 1.01


def test_reference_moments_closed_form_and_stored(analytic):
    m = T.reference_moments(analytic["banana"])
    np.testing.assert_allclose(m["z"][1], [10.0, math.sqrt(19.0)])
    m = T.reference_moments(T.get_target("logistic_regression"))
    assert m["beta"][0].shape == (30,) and np.all(m["beta"][1] > 0)
