"""LinearisedImplicit (LIVI): the surrogate, the entropy terms and the diagnostic density.

With a linear generator ``g(eps) = A eps + b`` the family is exactly ``N(m0 + L0 b, L0 (A A^T
+ sigma^2 I) L0^T)``, so the claims of :mod:`bayesgen.families.implicit` are checked against
closed forms:

* the mean of the surrogate's negative is the exact entropy, for ``m = d`` (and, with a tiny
  sigma, per draw) and for ``m < d`` with a non-trivial sigma;
* the matrix-free log-determinant equals the exact one when J's singular values are equal
  and is below it otherwise; its smallest singular value matches numpy's, and its gradient
  is the analytic gradient of ``m/2 log(s_min^2 + sigma^2)``;
* the extended-space density gives importance weights with mean exactly 1 for a normalised
  target (unbiased evidence), which fails when the generating draw is left out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from bayesgen.families.base import Family
from bayesgen.families.implicit import (
    EXACT_MAX_NOISE_DIM,
    LinearisedImplicit,
    MatrixGenerator,
    MLPGenerator,
    check_matrix_shapes,
    default_matrix_shapes,
    gram_half_log_det_exact,
    gram_half_log_det_matrix_free,
    laplace_reverse,
    resolve_entropy_method,
    smallest_singular_value,
)

RNG = np.random.default_rng(20231210)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Every test sees the same draws whatever order (or xdist worker) it runs in."""
    global RNG
    RNG = np.random.default_rng(20231210)


def linear(a, b):
    return lambda eps: a @ eps + b


def exact_entropy(a, sigma, precond_scale):
    """H[N(., L0 (A A^T + sigma^2 I) L0^T)] for a diagonal L0 (float64)."""
    a = np.asarray(a, np.float64)
    d = a.shape[0]
    cov = a @ a.T + sigma**2 * np.eye(d)
    l0 = np.diag(np.asarray(precond_scale, np.float64))
    return 0.5 * np.linalg.slogdet(2 * np.pi * np.e * l0 @ cov @ l0.T)[1]


def draw(family, key, n):
    return jax.jit(lambda k: family.sample_with_intermediates(k, (n,)))(key)


def test_family_contract():
    assert issubclass(LinearisedImplicit, Family)
    assert LinearisedImplicit.density == "approximate"


# --------------------------------------------------------------------------- (i) m = d


def test_full_rank_linear_generator_surrogate_is_the_exact_log_density():
    d = 4
    a = jnp.asarray(RNG.normal(size=(d, d)) + 2 * np.eye(d), jnp.float32)
    b = jnp.asarray(RNG.normal(size=d), jnp.float32)
    loc = jnp.asarray(RNG.normal(size=d), jnp.float32)
    scale = jnp.asarray(np.exp(RNG.normal(size=d)), jnp.float32)
    sigma = 1e-4
    fam = LinearisedImplicit(linear(a, b), d, sigma, loc, scale, entropy="exact")
    n = 20_000
    z, (log_q, eps) = draw(fam, jr.key(0), n)
    # the log-determinant term is the same for every draw: log q~ + |eps|^2 / 2 is constant
    centred = np.asarray(log_q + 0.5 * jnp.sum(eps**2, -1))
    assert np.ptp(centred) < 1e-4
    # ... and equals log N(z; m0 + L0 b, L0 A A^T L0^T) draw by draw (sigma -> 0)
    cov = np.diag(scale) @ np.asarray(a, np.float64) @ np.asarray(a, np.float64).T @ np.diag(scale)
    exact = stats.multivariate_normal(np.asarray(loc + scale * b), cov).logpdf(np.asarray(z))
    np.testing.assert_allclose(np.asarray(log_q), exact, atol=5e-3)
    # so its mean is the entropy within Monte Carlo error
    se = float(np.std(log_q)) / math.sqrt(n)
    assert abs(-float(np.mean(log_q)) - exact_entropy(a, 0.0, scale)) < 4 * se


# --------------------------------------------------------------------------- (ii) m < d


@pytest.mark.parametrize("entropy", ["exact", "matrix_free"])
def test_low_rank_linear_generator_mean_surrogate_is_the_entropy(entropy):
    """m < d, sigma = 0.3: E[-log q~] = H[N(b, A A^T + sigma^2 I)] (Sylvester's identity).

    A has equal singular values (orthonormal columns times 1.7), so the matrix-free term is
    exact too.
    """
    d, m, sigma = 6, 3, 0.3
    q, _ = np.linalg.qr(RNG.normal(size=(d, m)))
    a = jnp.asarray(1.7 * q, jnp.float32)
    b = jnp.asarray(RNG.normal(size=d), jnp.float32)
    scale = jnp.asarray(np.exp(0.5 * RNG.normal(size=d)), jnp.float32)
    fam = LinearisedImplicit(linear(a, b), m, sigma, jnp.zeros(d), scale, entropy=entropy,
                             num_iterations=5)
    n = 20_000
    _, (log_q, _) = draw(fam, jr.key(1), n)
    se = float(np.std(log_q)) / math.sqrt(n)
    truth = exact_entropy(a, sigma, scale)
    assert abs(-float(np.mean(log_q)) - truth) < 4 * se, (float(-np.mean(log_q)), truth, se)


def test_low_rank_unequal_spectrum_exact_mean_is_the_entropy():
    d, m, sigma = 7, 3, 0.2
    a = jnp.asarray(RNG.normal(size=(d, m)), jnp.float32)
    b = jnp.zeros(d)
    fam = LinearisedImplicit(linear(a, b), m, sigma, jnp.zeros(d), jnp.ones(d), entropy="exact")
    n = 20_000
    _, (log_q, _) = draw(fam, jr.key(2), n)
    se = float(np.std(log_q)) / math.sqrt(n)
    assert abs(-float(np.mean(log_q)) - exact_entropy(a, sigma, np.ones(d))) < 4 * se


# ------------------------------------------------------------------ (iii) exact vs matrix-free


def test_matrix_free_equals_exact_for_equal_singular_values():
    d, m, sigma = 9, 4, 1e-3
    q, _ = np.linalg.qr(RNG.normal(size=(d, m)))
    a = jnp.asarray(0.8 * q, jnp.float32)
    g = linear(a, jnp.zeros(d))
    eps = jnp.asarray(RNG.normal(size=m), jnp.float32)
    exact = gram_half_log_det_exact(g, eps, sigma)
    for seed in range(3):
        free = gram_half_log_det_matrix_free(g, eps, sigma, jr.key(seed), num_iterations=1)
        np.testing.assert_allclose(float(free), float(exact), atol=1e-4)
    np.testing.assert_allclose(float(exact), m * math.log(0.8**2 + sigma**2) / 2, rtol=1e-5)


def test_matrix_free_is_below_exact_for_a_spread_spectrum():
    d, m, sigma = 12, 5, 1e-3
    u, _ = np.linalg.qr(RNG.normal(size=(d, m)))
    v, _ = np.linalg.qr(RNG.normal(size=(m, m)))
    s = np.array([3.0, 2.0, 1.5, 1.0, 0.5])
    a = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
    g = linear(a, jnp.zeros(d))
    eps = jnp.zeros(m)
    exact = float(gram_half_log_det_exact(g, eps, sigma))
    np.testing.assert_allclose(exact, 0.5 * np.sum(np.log(s**2 + sigma**2)), rtol=1e-5)
    bound = 0.5 * m * math.log(s.min() ** 2 + sigma**2)
    for seed in range(3):
        # converged (30 iterations): the bound itself, well below the exact term
        free = float(gram_half_log_det_matrix_free(g, eps, sigma, jr.key(seed), 30))
        np.testing.assert_allclose(free, bound, atol=1e-3)
        assert free < exact - 1.0
        # the default 3 iterations over-estimate s_min a little, staying below the exact term
        few = float(gram_half_log_det_matrix_free(g, eps, sigma, jr.key(seed), 3))
        assert bound - 1e-4 <= few < exact


# --------------------------------------------------------------------------- (iv) s_min


@pytest.mark.parametrize("shape", [(200, 20), (60, 12), (30, 1), (5, 2)])
def test_smallest_singular_value_matches_numpy(shape):
    """Random Gaussian J: 40 iterations reach numpy's s_min to 1e-4 (relative); the default
    3 iterations never under-estimate it."""
    j = RNG.normal(size=shape)
    truth = np.linalg.svd(j, compute_uv=False).min()
    g = linear(jnp.asarray(j, jnp.float32), 0.0)
    eps = jnp.zeros(shape[1])
    keys = jr.split(jr.key(0), 3)
    s, v = jax.jit(jax.vmap(lambda k: smallest_singular_value(g, eps, k, 40)))(keys)
    assert np.all(np.abs(np.asarray(s) / truth - 1) < 1e-4)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), 1.0, rtol=1e-5)
    few = jax.jit(jax.vmap(lambda k: smallest_singular_value(g, eps, k, 3)[0]))(keys)
    rel = np.asarray(few) / truth - 1
    # Rayleigh-Ritz never goes below the true s_min; how far above after 3 iterations depends
    # on the spectrum and the start (measured up to +27% on a Gaussian 60 x 12), so a loose cap
    assert np.all((-1e-5 <= rel) & (rel < 0.5)), rel


# --------------------------------------------------------------------------- (v) gradient


def test_matrix_free_gradient_is_the_gradient_of_the_smallest_singular_value():
    """d/dA [m/2 log(s_min^2 + sigma^2)] = m s_min u v^T / (s_min^2 + sigma^2)."""
    d, m, sigma = 8, 4, 0.1
    rng = np.random.default_rng(11)  # local: the module RNG's state depends on test order
    u, _ = np.linalg.qr(rng.normal(size=(d, m)))
    v, _ = np.linalg.qr(rng.normal(size=(m, m)))
    s = np.array([3.0, 2.2, 1.6, 0.7])  # s_min separated from the rest
    a = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
    eps = jnp.asarray(rng.normal(size=m), jnp.float32)

    def term(a_):
        return gram_half_log_det_matrix_free(linear(a_, 0.0), eps, sigma, jr.key(5), 30)

    grad = np.asarray(jax.grad(term)(a))
    s_min = s[-1]
    expected = m * s_min * np.outer(u[:, -1], v[:, -1]) / (s_min**2 + sigma**2)
    # float32 and a finite iteration: agreement to 0.3% of the largest entry (a wrong singular
    # pair or the exact term's gradient would be off by O(1))
    np.testing.assert_allclose(grad, expected, atol=3e-3 * np.abs(expected).max())
    # and the exact term's gradient is the analytic sum over all singular values
    grad_exact = np.asarray(jax.grad(lambda a_: gram_half_log_det_exact(
        linear(a_, 0.0), eps, sigma))(a))
    expected_exact = u @ np.diag(s / (s**2 + sigma**2)) @ v.T
    np.testing.assert_allclose(grad_exact, expected_exact, atol=1e-4)


def test_exact_gradient_is_finite_for_repeated_singular_values():
    d, m = 5, 3
    q, _ = np.linalg.qr(RNG.normal(size=(d, m)))
    a = jnp.asarray(q, jnp.float32)
    grad = jax.grad(lambda a_: gram_half_log_det_exact(linear(a_, 0.0), jnp.ones(m), 1e-3))(a)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(a) / (1 + 1e-6), rtol=1e-4)


# --------------------------------------------------------------------------- (vi) diagnostics


def _gaussian_family(sigma=0.5, **options):
    a = jnp.array([[1.2, 0.3], [-0.4, 0.9]])
    b = jnp.array([0.3, -0.2])
    return LinearisedImplicit(linear(a, b), 2, sigma, jnp.array([0.1, 0.0]),
                              jnp.array([1.0, 1.5]), **options), a, b


def test_importance_weights_are_unbiased_and_need_the_generating_draw():
    """E[p(z) / q^_K(z)] = 1 for a normalised p; without eps_0 the mean is clearly above 1."""
    fam, _, _ = _gaussian_family()
    target = stats.multivariate_normal(np.array([0.5, -0.3]), np.array([[1.2, 0.3], [0.3, 1.6]]))
    n, k = 40_000, 4
    z, inter = draw(fam, jr.key(3), n)
    log_qk = jax.jit(lambda key: fam.log_importance_density(key, z, inter, k))(jr.key(4))
    w = np.exp(target.logpdf(np.asarray(z)) - np.asarray(log_qk))
    se = w.std() / math.sqrt(n)
    assert abs(w.mean() - 1.0) < 4 * se, (w.mean(), se)

    # the same K fresh draws without the generating one: biased upward
    w_half = fam.to_whitened(z)
    fresh = jr.normal(jr.key(5), (n, k, 2))
    log_cond = jax.vmap(fam.log_conditional)(w_half, fresh)  # (n, k)
    log_q_without = jax.nn.logsumexp(log_cond, -1) - math.log(k) - fam._log_det_precond()
    w_bad = np.exp(target.logpdf(np.asarray(z)) - np.asarray(log_q_without))
    assert w_bad.mean() > 1.0 + 8 * se, (w_bad.mean(), se)


def test_importance_density_k0_is_the_conditional_and_large_k_the_marginal():
    fam, a, b = _gaussian_family(importance_proposal="prior")
    z, inter = draw(fam, jr.key(6), 500)
    eps0 = inter[1]
    log_q0 = fam.log_importance_density(jr.key(7), z, inter, 0)
    mean = fam.to_latent(eps0 @ a.T + b)
    cond = stats.multivariate_normal.logpdf  # q(z | eps0) = N(m0 + L0 g(eps0), sigma^2 L0^2)
    scale = np.array([1.0, 1.5])
    direct = [cond(np.asarray(z[i]), np.asarray(mean[i]), np.diag((0.5 * scale) ** 2))
              for i in range(5)]
    np.testing.assert_allclose(np.asarray(log_q0[:5]), direct, rtol=1e-5)
    # as K grows the extended density approaches the exact marginal log q(z), at 1/sqrt(K)
    # (measured mean |error|: K=10 0.69, K=4000 0.038)
    cov = np.diag(scale) @ (np.asarray(a @ a.T) + 0.25 * np.eye(2)) @ np.diag(scale)
    exact = stats.multivariate_normal(np.asarray(fam.to_latent(b)), cov).logpdf(np.asarray(z))
    errors = {}
    for k in (10, 4000):
        log_qk = jax.jit(lambda key, k=k: fam.log_importance_density(key, z, inter, k))(jr.key(8))
        errors[k] = np.mean(np.abs(np.asarray(log_qk) - exact))
    assert errors[4000] < 0.06 and errors[10] > 0.3, errors


# ------------------------------------------------------------- the Laplace reverse model

_A3 = np.array([[1.2, 0.3], [-0.4, 0.9], [0.5, 0.5]])
_B3 = np.array([0.3, -0.2, 0.1])


@pytest.mark.parametrize("d, sigma", [(2, 0.5), (3, 0.5), (2, 1e-3)])
def test_laplace_reverse_model_makes_a_linear_family_exact(d, sigma):
    """Linear g: r(eps | w) is the exact q(eps | w), so log q^_K(z) = log q(z) for every K."""
    a, b = _A3[:d], _B3[:d]
    scale = np.array([1.0, 1.5, 0.7])[:d]
    fam = LinearisedImplicit(linear(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)),
                             2, sigma, jnp.zeros(d), jnp.asarray(scale, jnp.float32))
    assert fam.importance_proposal == "laplace"  # the "auto" rule at d m <= 2^16
    z, inter = draw(fam, jr.key(0), 1000)
    cov = np.diag(scale) @ (a @ a.T + sigma**2 * np.eye(d)) @ np.diag(scale)  # float64
    exact = stats.multivariate_normal(scale * b, cov).logpdf(np.asarray(z, np.float64))
    for k in (0, 10):
        log_qk = jax.jit(lambda key, k=k: fam.log_importance_density(key, z, inter, k))(jr.key(1))
        np.testing.assert_allclose(np.asarray(log_qk), exact, atol=2e-3, rtol=0)


def _one_to_one_generator():
    c = jnp.array([[0.8, -0.5], [0.3, 0.7]])
    a, b = jnp.asarray(_A3[:2], jnp.float32), jnp.asarray(_B3[:2], jnp.float32)
    return lambda eps: a @ eps + b + 0.4 * jnp.tanh(c @ eps)


def test_laplace_proposal_is_near_exact_for_a_one_to_one_generator_where_prior_draws_fail():
    """sigma = 1e-3, m = d: log q(z) is the change of variables at the preimage up to O(sigma).

    The Laplace estimate with K = 10 is within 0.02 nats of it everywhere; prior draws with
    K = 1000 leave the generating draw's spike in charge, several nats too high (measured:
    Laplace max 0.006, prior median 9.7).
    """
    g = _one_to_one_generator()
    errors = {}
    for proposal, k in (("laplace", 10), ("prior", 1000)):
        fam = LinearisedImplicit(g, 2, 1e-3, jnp.zeros(2), jnp.ones(2),
                                 importance_proposal=proposal)
        z, inter = draw(fam, jr.key(2), 500)
        eps0 = inter[1]
        log_det = jax.vmap(lambda e: jnp.linalg.slogdet(jax.jacfwd(g)(e))[1])(eps0)
        change_of_variables = -0.5 * jnp.sum(eps0**2, -1) - math.log(2 * math.pi) - log_det
        log_qk = jax.jit(lambda key: fam.log_importance_density(key, z, inter, k))(jr.key(3))
        errors[proposal] = np.abs(np.asarray(log_qk - change_of_variables))
    assert errors["laplace"].max() < 0.02, errors["laplace"].max()
    assert np.median(errors["prior"]) > 3.0, np.median(errors["prior"])


def test_laplace_weights_are_unbiased_for_a_nonlinear_generator():
    """E[p(z) / q^_K(z)] = 1 for a normalised p with r(eps | w) only approximately q(eps | w)
    (sigma = 0.4: the Gauss-Newton Laplace approximation is not exact here)."""
    fam = LinearisedImplicit(_one_to_one_generator(), 2, 0.4, jnp.array([0.1, 0.0]),
                             jnp.array([1.0, 1.5]), importance_proposal="laplace")
    target = stats.multivariate_normal(np.array([0.5, -0.3]), np.array([[1.2, 0.3], [0.3, 1.6]]))
    n = 40_000
    z, inter = draw(fam, jr.key(4), n)
    log_qk = jax.jit(lambda key: fam.log_importance_density(key, z, inter, 2))(jr.key(5))
    w = np.exp(target.logpdf(np.asarray(z, np.float64)) - np.asarray(log_qk, np.float64))
    se = w.std() / math.sqrt(n)
    assert abs(w.mean() - 1.0) < 4 * se, (w.mean(), se)


def test_laplace_reverse_finds_the_preimage_from_zero():
    g = _one_to_one_generator()
    eps_true = jnp.array([1.3, -2.1])
    loc, chol = jax.jit(lambda w: laplace_reverse(g, w, 1e-3, 2))(g(eps_true))
    np.testing.assert_allclose(np.asarray(loc), np.asarray(eps_true), atol=1e-4)
    jac = np.asarray(jax.jacfwd(g)(loc), np.float64)
    np.testing.assert_allclose(np.asarray(chol @ chol.T), jac.T @ jac + 1e-6 * np.eye(2),
                               rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- (vii) errors


def test_bad_inputs_raise_clear_errors():
    g = linear(jnp.ones((3, 2)), 0.0)
    with pytest.raises(ValueError, match="noise_dim"):
        LinearisedImplicit(g, 4, 1e-3, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="output_noise"):
        LinearisedImplicit(g, 2, 0.0, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="entropy"):
        LinearisedImplicit(g, 2, 1e-3, jnp.zeros(3), jnp.ones(3), entropy="hutchinson")
    with pytest.raises(ValueError, match="num_iterations"):
        LinearisedImplicit(g, 2, 1e-3, jnp.zeros(3), jnp.ones(3), num_iterations=0)
    with pytest.raises(ValueError, match="precond_scale"):
        LinearisedImplicit(g, 2, 1e-3, jnp.zeros(3), jnp.ones(4))
    with pytest.raises(ValueError, match="importance_proposal must be one of"):
        LinearisedImplicit(g, 2, 1e-3, jnp.zeros(3), jnp.ones(3), importance_proposal="learned")
    fam = LinearisedImplicit(g, 2, 1e-3, jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="bayesgen.diagnose"):
        fam.log_prob(jnp.zeros(3))
    z, inter = fam.sample_with_intermediates(jr.key(0), (4,))
    with pytest.raises(ValueError, match="intermediates"):
        fam.log_importance_density(jr.key(0), z, None, 10)
    with pytest.raises(ValueError, match="num_mixing"):
        fam.log_importance_density(jr.key(0), z, inter, -1)
    with pytest.raises(ValueError, match="trailing dimension"):
        fam.log_importance_density(jr.key(0), jnp.zeros((4, 2)), inter, 10)
    with pytest.raises(ValueError, match="num_iterations"):
        smallest_singular_value(g, jnp.zeros(2), jr.key(0), 0)
    # log_prob with intermediates is the surrogate carried by the draw
    np.testing.assert_array_equal(np.asarray(fam.log_prob(z, inter)), np.asarray(inter[0]))


def test_importance_proposal_auto_rule():
    def fam(d, m):
        return LinearisedImplicit(linear(jnp.ones((d, m)), 0.0), m, 1e-3, jnp.zeros(d), jnp.ones(d))

    assert fam(1024, 64).importance_proposal == "laplace"  # d m = 2^16
    assert fam(1025, 64).importance_proposal == "prior"


def test_entropy_auto_rule():
    assert resolve_entropy_method("auto", 100, 10) == "exact"
    assert resolve_entropy_method("auto", 100, EXACT_MAX_NOISE_DIM + 1) == "matrix_free"
    assert resolve_entropy_method("auto", 2**20, 2) == "matrix_free"
    assert resolve_entropy_method("matrix_free", 5, 5) == "matrix_free"
    with pytest.raises(ValueError, match="entropy"):
        resolve_entropy_method("slogdet", 5, 5)


# --------------------------------------------------------------------------- generators


def test_mlp_generator_starts_linear_so_the_family_is_the_preconditioner_gaussian():
    d = 4
    gen = MLPGenerator(d, d, width=16, depth=2, rngs=nnx.Rngs(params=jr.key(0)))
    eps = jr.normal(jr.key(1), (d,))
    np.testing.assert_allclose(np.asarray(gen(eps)), np.asarray(eps), atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jacfwd(gen)(eps)), np.eye(d), atol=1e-6)
    low = MLPGenerator(2, 6, width=8, depth=1, rngs=nnx.Rngs(params=jr.key(2)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(low.embed.value), axis=1), 1.0,
                               rtol=1e-5)  # each output coordinate has unit variance
    with pytest.raises(ValueError, match="noise_dim"):
        MLPGenerator(5, 4, rngs=nnx.Rngs(params=jr.key(0)))


def test_matrix_generator_is_standardised_per_coordinate():
    d = 2000
    shapes = default_matrix_shapes(d, 8, 16, 1)
    assert shapes[0] == (8, 8) and shapes[-1][0] * shapes[-1][1] >= d
    gen = MatrixGenerator(shapes, d, rngs=nnx.Rngs(params=jr.key(0)))
    gen.standardise_output(jr.key(1))
    out = np.asarray(jax.jit(jax.vmap(gen))(jr.normal(jr.key(2), (4000, 64))))
    assert out.shape == (4000, d)
    sd, mean = out.std(0), out.mean(0)
    assert abs(np.median(sd) - 1) < 0.05
    assert np.mean((sd > 0.75) & (sd < 1.33)) > 0.95
    assert np.abs(mean).max() < 0.15  # Monte Carlo error of 4000 draws: 0.016 sd
    # weights O(a c + b e) per layer (plus the biases c e): here 2 * (16*8 + 45*16)
    weights = sum(np.size(layer.left.value) + np.size(layer.right.value) for layer in gen.layers)
    assert weights == 2 * (16 * 8 + 45 * 16)
    with pytest.raises(ValueError, match="shrinks"):
        check_matrix_shapes([(8, 8), (4, 16), (50, 50)])
    with pytest.raises(ValueError, match="out_dim"):
        MatrixGenerator([(4, 4), (10, 10)], 101, rngs=nnx.Rngs(params=jr.key(0)))


def test_matrix_generator_linear_head_gives_the_same_entropy_term_and_gradient():
    """The feature-space iteration (``head_gram``) equals the output-space one, cut tail
    included (here 30 cut entries spanning two rows of the 20 x 19 output)."""
    from bayesgen.nn import split_params

    d = 350
    gen = MatrixGenerator([(4, 4), (20, 19)], d, rngs=nnx.Rngs(params=jr.key(0)))
    gen.standardise_output(jr.key(1))
    apply, params = split_params(gen)
    eps = jr.normal(jr.key(2), (16,))
    jac = np.asarray(jax.jacfwd(lambda e: apply(params, e))(eps), np.float64)
    truth = np.linalg.svd(jac, compute_uv=False).min()
    u = jr.normal(jr.key(3), (4, 4))
    head = jax.jacfwd(lambda x: apply(params, x, part="head"))(u).reshape(d, 16)
    np.testing.assert_allclose(
        np.asarray(apply(params, u, part="head_gram")).ravel(),
        np.asarray(head.T @ head @ u.ravel()), rtol=1e-4, atol=1e-4)

    def term(p, iterations, factorised):
        if factorised:
            return gram_half_log_det_matrix_free(
                lambda e: apply(p, e, part="features"), eps, 1e-3, jr.key(4), iterations,
                head_gram=lambda x: apply(p, x, part="head_gram"))
        return gram_half_log_det_matrix_free(lambda e: apply(p, e), eps, 1e-3, jr.key(4),
                                             iterations)

    # converged, the feature-space iteration finds the smallest singular value of the
    # explicit Jacobian
    s_min, _ = jax.jit(lambda p: smallest_singular_value(
        lambda e: apply(p, e, part="features"), eps, jr.key(4), 30,
        head_gram=lambda x: apply(p, x, part="head_gram")))(params)
    np.testing.assert_allclose(float(s_min), truth, rtol=1e-4)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: term(p, 3, True)))(params)
    v2, g2 = jax.jit(jax.value_and_grad(lambda p: term(p, 3, False)))(params)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(
            jnp.abs(b).max()) + 1e-6)
