"""The semi-implicit families against a closed-form case.

With a linear mixing map ``mu(eps) = A eps + b`` and a constant conditional scale ``s``,
``q(w) = N(b, A A^T + diag s^2)`` exactly, so the SIVI surrogate, UIVI's entropy gradient and
the extended-space importance weights can be checked against exact values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from bayesgen.families.semi_implicit import (
    SemiImplicit,
    UnbiasedSemiImplicit,
    gaussian_logpdf,
    mixture_log_density,
)

D, M = 3, 2
A = jnp.array([[1.0, 0.5], [-0.3, 0.8], [0.6, -0.7]])
B = jnp.array([0.5, -1.0, 2.0])
LOG_S = jnp.log(jnp.array([0.4, 0.6, 0.3]))


def _linear(theta):
    a, b, log_s = theta

    def conditional(eps):
        mu = eps @ a.T + b
        return mu, jnp.broadcast_to(jnp.exp(log_s), mu.shape)

    return conditional


def _cov(theta):
    a, _, log_s = theta
    return a @ a.T + jnp.diag(jnp.exp(2 * log_s))


def _exact_log_q(theta, w):
    return jax.scipy.stats.multivariate_normal.logpdf(w, theta[1], _cov(theta))


def _entropy(theta):
    return 0.5 * jnp.linalg.slogdet(2 * jnp.pi * jnp.e * _cov(theta))[1]


THETA = (A, B, LOG_S)


def _family(cls, theta=THETA, **kw):
    return cls(_linear(theta), M, jnp.zeros(D), jnp.ones(D), **kw)


def test_mixture_log_density_matches_direct_sum():
    fam = _family(SemiImplicit)
    w = jnp.array([0.3, -0.2, 1.5])
    eps0 = jnp.array([0.1, -0.4])
    key = jr.key(3)
    got = mixture_log_density(key, w, fam.log_conditional, eps0, M, 50, chunk_size=16)
    # the same draws, summed directly (the helper's chunking and padding must not matter)
    keys = jr.split(key, 4)
    eps = jnp.concatenate([jr.normal(k, (16, M)) for k in keys])[:50]
    direct = jax.nn.logsumexp(
        jnp.concatenate([fam.log_conditional(w, eps0[None]), fam.log_conditional(w, eps)])
    ) - jnp.log(51.0)
    np.testing.assert_allclose(got, direct, rtol=1e-5)
    # a batch of w shares the fresh draws: each entry equals its own single-w value
    w2 = jnp.stack([w, w + 1.0])
    e2 = jnp.stack([eps0, -eps0])
    batch = mixture_log_density(key, w2, fam.log_conditional, e2, M, 50, chunk_size=16)
    single = [mixture_log_density(key, w2[i], fam.log_conditional, e2[i], M, 50, chunk_size=16)
              for i in range(2)]
    np.testing.assert_allclose(batch, np.array(single), rtol=1e-5)


def test_sivi_surrogate_is_above_log_q_and_tightens_with_k():
    """E[log q_K(z)] >= E[log q(z)] (so the surrogate ELBO is below the ELBO), gap -> 0 in K."""
    gaps = []
    for num_mixing in (0, 10, 100, 1000):
        fam = _family(SemiImplicit, num_mixing=num_mixing)
        # the same key gives the same draws z for every K: the gaps are paired
        z, (log_q_k, _) = jax.jit(lambda k, f=fam: f.sample_with_intermediates(k, (4000,)))(
            jr.key(0)
        )
        gap = np.asarray(log_q_k - _exact_log_q(THETA, z), np.float64)
        mean, se = gap.mean(), gap.std() / np.sqrt(gap.size)
        assert mean > -3 * se, (num_mixing, mean, se)
        gaps.append(mean)
    # measured 2.32, 0.63, 0.11, 0.014
    assert gaps[0] > 1.0
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.03, gaps


def test_leaving_out_the_generating_draw_would_overestimate_the_entropy():
    """The wrong estimator (fresh draws only) is below log q: the surrogate is then no bound."""
    fam = _family(SemiImplicit)
    z, (_, eps0) = fam.sample_with_intermediates(jr.key(1), (4000,))
    w = z
    keys = jr.split(jr.key(2), w.shape[0])
    fresh_only = jax.vmap(
        lambda k, wi: jax.nn.logsumexp(fam.log_conditional(wi, jr.normal(k, (10, M))))
        - jnp.log(10.0)
    )(keys, w)
    with_own = jax.vmap(
        lambda k, wi, ei: mixture_log_density(k, wi, fam.log_conditional, ei, M, 10)
    )(keys, w, eps0)
    exact = _exact_log_q(THETA, w)
    assert np.mean(fresh_only - exact) < -0.1
    assert np.mean(with_own - exact) > 0.0


def test_extended_space_weights_are_unbiased_for_the_evidence():
    """p = 2 * N(b, cov) unnormalised: mean of p / q_K is 2 for any K (here K = 5)."""
    fam = _family(SemiImplicit)
    z, inter = fam.sample_with_intermediates(jr.key(4), (20000,))
    log_qk = fam.log_importance_density(jr.key(5), z, inter, num_mixing=5)
    log_w = jnp.log(2.0) + _exact_log_q(THETA, z) - log_qk
    w = np.exp(np.asarray(log_w, np.float64))
    assert abs(w.mean() - 2.0) < 4 * w.std() / np.sqrt(w.size), (w.mean(), w.std())
    # and the weights are far from constant at K = 5 (the test has power)
    assert w.std() > 0.05


def test_log_prob_without_intermediates_is_refused():
    fam = _family(SemiImplicit)
    with pytest.raises(ValueError, match="no closed-form log q"):
        fam.log_prob(jnp.zeros(D))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_mixing"):
        _family(SemiImplicit, num_mixing=-1)
    with pytest.raises(ValueError, match="num_kept"):
        _family(UnbiasedSemiImplicit, num_kept=0)
    with pytest.raises(ValueError, match="step_size"):
        _family(UnbiasedSemiImplicit, step_size=0.0)


def _entropy_gradient_draws(fam_fn, n, key):
    """Per-draw pathwise gradients of the surrogate log q wrt theta (flattened)."""

    def one(k):
        def surrogate(theta):
            z, inter = fam_fn(theta).sample_with_intermediates(k)
            return inter[0]

        g = jax.grad(surrogate)(THETA)
        return jnp.concatenate([x.ravel() for x in g])

    return np.asarray(jax.jit(jax.vmap(one))(jr.split(key, n)), np.float64)


def test_uivi_entropy_gradient_matches_the_exact_gradient():
    """grad E[log q] = -grad H, within Monte Carlo error, for A, b and the scales."""
    grads = _entropy_gradient_draws(lambda th: _family(UnbiasedSemiImplicit, th), 4000, jr.key(6))
    exact = jax.grad(lambda th: -_entropy(th))(THETA)
    exact = np.concatenate([np.ravel(x) for x in exact])
    mean, se = grads.mean(0), grads.std(0) / np.sqrt(grads.shape[0])
    z = (mean - exact) / se
    print("exact", np.round(exact, 3), "\nuivi ", np.round(mean, 3), "\nz", np.round(z, 2))
    assert np.all(np.abs(z) < 4.5), z
    assert np.sum(z**2) < len(z) + 5 * np.sqrt(2 * len(z))  # chi-square, 11 dof


def test_uivi_without_decorrelation_would_be_biased():
    """Plugging in the generating eps (no chain) gives a wrong gradient: the test has power."""

    class NoChain(UnbiasedSemiImplicit):
        def marginal_score(self, key, w, eps0):
            mu, sigma = self.conditional(eps0)
            return jax.lax.stop_gradient(-(w - mu) / sigma**2), jnp.ones(())

    grads = _entropy_gradient_draws(lambda th: _family(NoChain, th), 4000, jr.key(6))
    exact = jax.grad(lambda th: -_entropy(th))(THETA)
    exact = np.concatenate([np.ravel(x) for x in exact])
    se = grads.std(0) / np.sqrt(grads.shape[0])
    assert np.max(np.abs(grads.mean(0) - exact) / se) > 10


def test_uivi_chain_accepts_and_value_is_the_sivi_estimate():
    fam = _family(UnbiasedSemiImplicit)
    z, (val, eps, acc) = fam.sample_with_intermediates(jr.key(7), (500,))
    assert float(jnp.mean(acc)) > 0.8
    gap = np.asarray(val - _exact_log_q(THETA, z))
    assert 0.0 < gap.mean() < 0.5  # K = 32 SIVI estimate, above log q


def test_gaussian_logpdf():
    w, mu, s = jnp.array([1.0, 2.0]), jnp.array([0.5, 1.0]), jnp.array([2.0, 0.5])
    want = jax.scipy.stats.norm.logpdf(w, mu, s).sum()
    np.testing.assert_allclose(gaussian_logpdf(w, mu, s), want, rtol=1e-6)


# --- the reverse model (IWHVI) -------------------------------------------------------------
# With A's columns orthogonal under diag(s^-2), q(eps | w) is a diagonal Gaussian, so the
# exact reverse model is representable: precision I + A^T S^-2 A, mean P^-1 A^T S^-2 (w - b).
A_DIAG = jnp.array([[1.0, 0.0], [0.0, 0.8], [0.0, 0.0]])
THETA_DIAG = (A_DIAG, B, LOG_S)


def _exact_reverse(theta):
    a, b, log_s = theta
    s2 = jnp.exp(2 * log_s)
    prec = 1.0 + jnp.sum(a * a / s2[:, None], axis=0)  # diagonal of I + A^T S^-2 A

    def reverse(w):
        loc = ((w - b) / s2) @ a / prec
        return loc, jnp.broadcast_to(1.0 / jnp.sqrt(prec), loc.shape)

    return reverse


def _poor_reverse(w):
    loc = 0.3 * w[..., :M]
    return loc, jnp.full(loc.shape, 1.3)  # wider than the prior: bounded weights p / tau


def test_exact_reverse_model_gives_log_q_exactly():
    """tau = q(eps | w): every term q(w | eps) p(eps) / tau(eps | w) equals q(w), for any K."""
    fam = _family(SemiImplicit, THETA_DIAG, num_mixing=3, reverse=_exact_reverse(THETA_DIAG))
    z, (log_q_k, _) = fam.sample_with_intermediates(jr.key(0), (500,))
    np.testing.assert_allclose(log_q_k, _exact_log_q(THETA_DIAG, z), atol=2e-4)
    # while the prior's draws (SIVI) at the same K are far off
    sivi = _family(SemiImplicit, THETA_DIAG, num_mixing=3)
    z2, (log_q_sivi, _) = sivi.sample_with_intermediates(jr.key(0), (500,))
    assert np.mean(np.abs(log_q_sivi - _exact_log_q(THETA_DIAG, z2))) > 0.1


def test_any_reverse_model_keeps_the_bound_and_the_unbiased_evidence():
    fam = _family(SemiImplicit, num_mixing=10, reverse=_poor_reverse)
    z, inter = fam.sample_with_intermediates(jr.key(1), (4000,))
    gap = np.asarray(inter[0] - _exact_log_q(THETA, z), np.float64)
    assert gap.mean() > -3 * gap.std() / np.sqrt(gap.size), gap.mean()
    assert gap.mean() > 0.01  # a poor tau leaves a visible gap (the test has power)
    # extended-space weights stay exact: mean of p / q_K is the evidence (2) for any tau
    z, inter = fam.sample_with_intermediates(jr.key(4), (20000,))
    log_qk = fam.log_importance_density(jr.key(5), z, inter, num_mixing=5)
    w = np.exp(np.asarray(jnp.log(2.0) + _exact_log_q(THETA, z) - log_qk, np.float64))
    assert abs(w.mean() - 2.0) < 4 * w.std() / np.sqrt(w.size), (w.mean(), w.std())
    assert w.std() > 0.05
