"""The diffusion family's claims: an exact start, a path-space lower bound, exact weights.

- With a zero network the surrogate is the log-density of the start's Gaussian on every path
  (DDVI: the preconditioner's Gaussian; DBVI: the learned start noised over the horizon).
- With the exact score of a Gaussian target the bound tends to log Z as the steps grow; a
  wrong score stays strictly below. For DBVI the limit is minus the closed-form mismatch
  KL(rho || end of the bridged reference).
- For any network the path weights are exact importance weights: their mean is Z.
- The sticking-the-landing gradient has the same mean as the plain reparameterised one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy import stats

from bayesgen.families.diffusion import (
    DenoisingDiffusion,
    bridge_log_h,
    linear_beta_schedule,
    log_snr_schedule,
)

D = 3
LOG_Z = 1.7
NUM_PATHS = 20_000


def _gaussian_target():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D, D))
    cov = a @ a.T / D + 0.3 * np.eye(D)
    return jnp.asarray(rng.normal(size=D), jnp.float32), jnp.asarray(cov, jnp.float32)


MEAN, COV = _gaussian_target()


def _log_target(u):
    r = u - MEAN
    return (LOG_Z - 0.5 * r @ jnp.linalg.solve(COV, r)
            - 0.5 * jnp.linalg.slogdet(2 * math.pi * COV)[1])


def _log_weights(family, key, n=NUM_PATHS):
    z, (log_q,) = jax.jit(lambda k: family.sample_with_intermediates(k, (n,)))(key)
    return np.asarray(jax.vmap(_log_target)(z) - log_q, np.float64), z


def _gaussian_logpdf(x, mean, var):
    return jnp.sum(-0.5 * (x - mean) ** 2 / var - 0.5 * jnp.log(2 * math.pi * var), -1)


def _zero(u, t):
    return jnp.zeros_like(u), 0.0


def test_zero_network_is_the_preconditioner_gaussian_on_every_path():
    rng = np.random.default_rng(1)
    loc = jnp.asarray(rng.normal(size=D), jnp.float32)
    scale = jnp.asarray(np.tril(rng.normal(size=(D, D)), -1) * 0.3 + np.diag([0.5, 2.0, 1.0]),
                        jnp.float32)
    fam = DenoisingDiffusion(_zero, loc, scale, log_snr_schedule(16))
    z, (log_q,) = fam.sample_with_intermediates(jr.key(0), (7,))
    exact = jax.scipy.stats.multivariate_normal.logpdf(z, loc, scale @ scale.T)
    np.testing.assert_allclose(log_q, exact, atol=2e-4)
    assert fam.density == "lower_bound"


def test_bridged_zero_network_is_the_start_noised_over_the_horizon():
    mu, s = jnp.array([0.5, -0.3, 1.0]), jnp.array([0.7, 1.2, 0.9])
    sched = log_snr_schedule(16, log_snr_min=0.0)
    fam = DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), sched,
                             start_loc=mu, start_scale=s)
    z, (log_q,) = fam.sample_with_intermediates(jr.key(0), (7,))
    a = float(sched.signal_to_end[0])  # sqrt(abar_N) = sqrt(1/2)
    np.testing.assert_allclose(a, math.sqrt(0.5), rtol=1e-5)
    exact = _gaussian_logpdf(z, a * mu, a * a * s * s + 1.0 - a * a)
    np.testing.assert_allclose(log_q, exact, atol=2e-4)


def _exact_score(sched, cov_factor=1.0, mean=MEAN, cov=COV):
    """The score of the reference noised target N(mean, cov), as the family's correction."""

    def network(u, t):
        abar = jnp.interp(t, sched.times, sched.alpha_bar)
        c = abar * cov * cov_factor + (1.0 - abar) * jnp.eye(D)
        return -jnp.linalg.solve(c, u - jnp.sqrt(abar) * mean) + u, 0.0

    return network


def _bound(sched, network, key, **kw):
    fam = DenoisingDiffusion(network, jnp.zeros(D), jnp.ones(D), sched,
                             parameterization="score", **kw)
    lw, _ = _log_weights(fam, key)
    return lw.mean() - LOG_Z, lw.std() / math.sqrt(lw.size)


def test_exact_score_bound_tends_to_log_z_and_a_wrong_score_stays_below():
    gaps, ses = [], []
    for n in (8, 32, 128):
        sched = linear_beta_schedule(n)
        gap, se = _bound(sched, _exact_score(sched), jr.key(n))
        gaps.append(gap)
        ses.append(se)
        assert gap < 4 * se, (n, gap, se)  # a lower bound
    # measured: -0.126, -0.033, -0.0074 (x64): the gap shrinks like 1/N
    assert gaps[0] < gaps[1] - 4 * ses[1] and gaps[1] < gaps[2] - 4 * ses[2], gaps
    assert abs(gaps[2]) < 0.02, gaps
    sched = linear_beta_schedule(128)
    wrong, se = _bound(sched, _exact_score(sched, cov_factor=1.5), jr.key(7))
    assert wrong < gaps[2] - 10 * max(se, ses[2]), (wrong, gaps[2])  # measured -0.145


def _kl(m0, c0, m1, c1):
    c1i = jnp.linalg.inv(c1)
    r = m1 - m0
    return 0.5 * (jnp.trace(c1i @ c0) + r @ c1i @ r - m0.shape[0]
                  + jnp.linalg.slogdet(c1)[1] - jnp.linalg.slogdet(c0)[1])


@pytest.mark.parametrize("scale", [1.0, 0.3, 1e-3, 1.6e-6])
def test_bridge_log_h_is_accurate_in_float32_for_narrow_starts(scale):
    """log h(u) = log of the integral of N(x; A u, V) rho(x) / N(x; 0, 1), from the Gaussian
    product in float64 (an independent derivation), against the float32 code. Written as two
    mu^2 / s^2 terms that cancel, the constant had ~1e6 of round-off at s = 1.6e-6 (the start
    scale an AutoDBVI deep-GP fit reached)."""
    signal, mu = 0.7, np.array([12.0, -3.0, 0.4])
    u = np.array([0.3, -1.1, 2.0])
    v, s2 = 1.0 - signal**2, scale**2
    v_star = v * s2 / (v + s2)
    m_star = (signal * u * s2 + mu * v) / (v + s2)
    exact = np.sum(stats.norm.logpdf(signal * u, mu, np.sqrt(v + s2)) + 0.5 * np.log(2 * np.pi)
                   - 0.5 * np.log1p(-v_star) + m_star**2 / (2 * (1 - v_star)))
    got = bridge_log_h(jnp.asarray(u, jnp.float32), jnp.float32(signal),
                       jnp.asarray(mu, jnp.float32), jnp.full(3, scale, jnp.float32))
    assert abs(float(got) - exact) < 1e-3 * max(1.0, abs(exact)), (float(got), exact)


def test_bridged_exact_score_gap_is_the_start_mismatch():
    """DBVI with the optimal network: the gap tends to KL(rho || p^h_T) (closed form)."""
    mu, s = jnp.array([0.5, -0.3, 1.0]), jnp.array([0.7, 1.2, 0.9])
    sched = linear_beta_schedule(128, beta_max=3.0)
    a = float(sched.signal_to_end[0])
    prec = 1.0 / s**2
    dd = 1.0 + (1.0 - a * a) * (prec - 1.0)
    # pi / h(., 0) is Gaussian: precision cov^-1 - diag(P), linear term -b
    p_quad, b_lin = (prec - 1.0) * a * a / dd, a * mu * prec / dd
    cov_inv = jnp.linalg.inv(COV)
    lam = cov_inv - jnp.diag(p_quad)
    tilted_cov = jnp.linalg.inv(lam)
    tilted_mean = tilted_cov @ (cov_inv @ MEAN - b_lin)
    # the bridged reference started at the posterior ends in rho * N(A m~, A^2 C~ + 1 - A^2) / N(0, I)
    c_end = a * a * tilted_cov + (1.0 - a * a) * jnp.eye(D)
    c_end_inv = jnp.linalg.inv(c_end)
    end_cov = jnp.linalg.inv(jnp.diag(prec) + c_end_inv - jnp.eye(D))
    end_mean = end_cov @ (mu * prec + c_end_inv @ (a * tilted_mean))
    expected = -float(_kl(mu, jnp.diag(s * s), end_mean, end_cov))  # -0.221
    net = _exact_score(sched, mean=tilted_mean, cov=tilted_cov)
    gap, se = _bound(sched, net, jr.key(3), start_loc=mu, start_scale=s)
    assert expected < -0.1  # the mismatch is not negligible here
    assert abs(gap - expected) < 4 * se + 0.02, (gap, expected, se)


def _perturbed(network, key, scale=0.2):
    """``network`` plus a smooth perturbation of the correction and the variance factor."""
    k1, k2, k3 = jr.split(key, 3)
    w = scale * jr.normal(k1, (D, D))
    b = scale * jr.normal(k2, (D,))
    c = scale * jr.normal(k3, (D,))

    def perturbed(u, t):
        f, _ = network(u, t)
        return f + jnp.tanh(u @ w + b) * (1.0 + t), c * (1.0 - t)

    return perturbed


@pytest.mark.parametrize("bridged", [False, True], ids=["DDVI", "DBVI"])
def test_path_weights_are_exact_importance_weights(bridged):
    """For a network off the optimum (gap ~0.3 nats), E[exp(log p - surrogate)] = Z exactly."""
    sched = linear_beta_schedule(16, beta_max=8.0)
    mu, s = jnp.array([0.3, -0.5, 0.2]), jnp.array([0.8, 1.1, 0.9])
    start = dict(start_loc=mu, start_scale=s) if bridged else {}
    net = _perturbed(_exact_score(sched), jr.key(5), scale=0.05)
    fam = DenoisingDiffusion(net, jnp.zeros(D), jnp.ones(D), sched, parameterization="score",
                             **start)
    lw, _ = _log_weights(fam, jr.key(6), n=200_000)
    w = np.exp(lw - LOG_Z)
    mean_w, se_w = w.mean(), w.std() / math.sqrt(w.size)
    gap = lw.mean() - LOG_Z
    assert -1.0 < gap < -0.1, gap  # off the optimum, but with well-behaved weights
    assert abs(mean_w - 1.0) < 4 * se_w + 0.003, (mean_w, se_w, gap)


def test_sticking_the_landing_gradient_is_unbiased():
    """STL and the plain reparameterised gradient agree in mean; STL has less variance."""
    sched = log_snr_schedule(8, log_snr_min=-4.0)

    def make(params, frozen):
        def network(u, t):
            return jnp.tanh(u @ params["w"] + params["b"]) * (1.0 + t), params["c"]

        return DenoisingDiffusion(network, jnp.zeros(D), jnp.ones(D), sched,
                                  stick_the_landing=frozen)

    params = {"w": 0.2 * jr.normal(jr.key(1), (D, D)), "b": 0.1 * jnp.ones(D),
              "c": -0.2 * jnp.ones(D)}

    def per_path_grads(frozen, key, n):
        def loss(p, k):
            z, (log_q,) = make(p, frozen).sample_with_intermediates(k, ())
            return log_q - _log_target(z)

        g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, jr.split(key, n))
        return np.concatenate([np.asarray(x).reshape(n, -1) for x in jax.tree.leaves(g)], 1)

    n = 40_000
    g_plain = per_path_grads(False, jr.key(2), n)
    g_stl = per_path_grads(True, jr.key(3), n)
    diff = g_plain.mean(0) - g_stl.mean(0)
    se = np.sqrt(g_plain.var(0) / n + g_stl.var(0) / n)
    assert np.all(np.abs(diff) < 4.5 * se + 1e-3), (diff, se)
    assert np.mean(g_stl.var(0)) < np.mean(g_plain.var(0))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_steps"):
        log_snr_schedule(0)
    with pytest.raises(ValueError, match="log_snr_max"):
        log_snr_schedule(8, log_snr_max=-1.0, log_snr_min=0.0)
    with pytest.raises(ValueError, match="beta_min"):
        linear_beta_schedule(8, beta_min=2.0, beta_max=1.0)
    with pytest.raises(ValueError, match="parameterization"):
        DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), log_snr_schedule(4),
                           parameterization="eps")
    with pytest.raises(ValueError, match="start_loc and start_scale"):
        DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), log_snr_schedule(4),
                           start_loc=jnp.zeros(D))
    with pytest.raises(TypeError, match="DiffusionSchedule"):
        DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), (jnp.zeros(2), jnp.ones(2)))
    fam = DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), log_snr_schedule(4))
    with pytest.raises(ValueError, match="intermediates"):
        fam.log_prob(jnp.zeros(D))


@pytest.mark.parametrize("bridged", [False, True], ids=["DDVI", "DBVI"])
def test_reference_paths_give_an_upper_bound_with_exact_reverse_weights(bridged):
    """On (bridged) reference paths from exact draws: EUBO >= log Z, E[q / (pi r)] = 1."""
    sched = linear_beta_schedule(16, beta_max=8.0)
    start = dict(start_loc=jnp.array([0.3, -0.5, 0.2]),
                 start_scale=jnp.array([0.8, 1.1, 0.9])) if bridged else {}
    net = _perturbed(_exact_score(sched), jr.key(5), scale=0.05)
    fam = DenoisingDiffusion(net, jnp.zeros(D), jnp.ones(D), sched, parameterization="score",
                             **start)
    n = 100_000
    z = jr.multivariate_normal(jr.key(7), MEAN, COV, (n,))
    ratio = jax.jit(fam.reference_log_ratio)(jr.key(8), z)
    log_w = np.asarray(jax.vmap(_log_target)(z) - ratio, np.float64)
    eubo, se = log_w.mean() - LOG_Z, log_w.std() / math.sqrt(n)
    elbo = _log_weights(fam, jr.key(6), n=n)[0].mean() - LOG_Z
    assert elbo < -0.1 and eubo > 0.1, (elbo, eubo)  # measured -0.47 / +0.35
    inv = np.exp(LOG_Z - log_w)  # q(path) / (pi(z) r(path | z)): mean 1 under the reference
    assert abs(inv.mean() - 1.0) < 4 * inv.std() / math.sqrt(n) + 0.003, inv.mean()


def _coupling_layer(key):
    """A RealNVP stack at random (non-identity) parameters, chained with an affine map."""
    from bayesgen.families.flows import build_flow
    from bayesgen.families.stochastic_flow import (
        affine_layer,
        bijection_block,
        chain_layers,
        stack_bijection_blocks,
    )

    flow = build_flow("realnvp", key, D, num_layers=4, hidden=8, depth=1)
    arrays, static = stack_bijection_blocks(flow, 1)
    leaves, tree = jax.tree.flatten(arrays)
    keys = jr.split(jr.fold_in(key, 1), len(leaves))
    arrays = jax.tree.unflatten(tree, [
        x + 0.3 * jr.normal(k, x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys, strict=True)])
    arrays = jax.tree.map(lambda a: a[0], arrays)
    scale = jnp.array([[1.3, 0.0, 0.0], [0.4, 0.6, 0.0], [-0.2, 0.5, 2.0]])
    return chain_layers(bijection_block(static).bind(arrays),
                        affine_layer(jnp.array([0.5, -1.0, 0.2]), scale))


@pytest.mark.parametrize("bridged", [False, True], ids=["ddvi", "dbvi"])
def test_final_layer_surrogate_is_the_flow_density_with_a_zero_network(bridged):
    """With f = 0 (and c = 1) the path term telescopes to the start's log density on every
    path, so with a final layer T the surrogate is exactly the pushforward's density
    log N(T^-1(v)) + log|det dT^-1/dv| (or its noised-start counterpart for DBVI): forward
    draws, reference paths from those draws, and the density computed through T's inverse
    all agree. A wrong sign of either log-determinant breaks the equality by 2 log|det|."""
    layer = _coupling_layer(jr.key(5))
    sched = log_snr_schedule(8, log_snr_min=0.0 if bridged else -10.0)
    kw = {}
    if bridged:
        kw = {"start_loc": jnp.array([0.3, 0.0, -0.2]), "start_scale": jnp.array([0.8, 1.1, 0.9])}
    fam = DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), sched, final_layer=layer, **kw)
    z, (log_q,) = fam.sample_with_intermediates(jr.key(0), (64,))
    u0, log_det_inv = jax.vmap(layer.inverse)(z)
    if bridged:  # q(u_0) is the start noised over the horizon: N(A mu, A^2 s^2 + 1 - A^2)
        a = jnp.sqrt(sched.alpha_bar[-1])
        base = _gaussian_logpdf(u0, a * kw["start_loc"], a**2 * kw["start_scale"]**2 + 1 - a**2)
    else:
        base = _gaussian_logpdf(u0, 0.0, 1.0)
    np.testing.assert_allclose(log_q, base + log_det_inv, atol=2e-3)
    back = fam.reference_log_ratio(jr.key(1), z)
    np.testing.assert_allclose(back, log_q, atol=2e-3)
    assert float(jnp.std(log_det_inv)) > 0.1  # the flow is not volume-preserving here


def test_final_layer_exact_transport_closes_both_bounds_and_its_gradient_vanishes_in_mean():
    """Target N(m, C), T(u) = m + L u with L L^T = C and f = 0: every path weight is exactly
    Z (ELBO = EUBO = log Z), and at this optimum the gradient in T's parameters has mean
    zero (the network's sticking-the-landing does not touch T). Freezing T's
    log-determinant as well (a tempting "sticking the landing" for T) leaves a mean of
    L^-T in the scale's gradient, which this catches."""
    from bayesgen.families.stochastic_flow import affine_layer

    chol = jnp.linalg.cholesky(COV)
    sched = log_snr_schedule(8)

    def family(loc, scale):
        return DenoisingDiffusion(_zero, jnp.zeros(D), jnp.ones(D), sched,
                                  final_layer=affine_layer(loc, scale),
                                  stick_the_landing=True)

    fam = family(MEAN, chol)
    log_w, z = _log_weights(fam, jr.key(0), n=2000)
    np.testing.assert_allclose(log_w, LOG_Z, atol=2e-3)
    exact = jr.multivariate_normal(jr.key(1), MEAN, COV, (2000,))
    eubo = jax.vmap(_log_target)(exact) - fam.reference_log_ratio(jr.key(2), exact)
    np.testing.assert_allclose(eubo, LOG_Z, atol=2e-3)

    n = 5000

    def loss(p, k):
        # the scale is lower triangular (the guide's constraint); differentiate that part
        zz, (log_q,) = family(p["loc"], jnp.tril(p["scale"])).sample_with_intermediates(k, ())
        return log_q - _log_target(zz)

    g = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))({"loc": MEAN, "scale": chol},
                                                              jr.split(jr.key(3), n))
    g = np.concatenate([np.asarray(x).reshape(n, -1) for x in jax.tree.leaves(g)], 1)
    mean, se = g.mean(0), g.std(0) / np.sqrt(n)
    assert np.all(np.abs(mean) < 4.5 * se + 1e-3), (mean, se)
    assert np.abs(g).max() > 0.1  # not zero path by path: a real test of the mean


@pytest.mark.parametrize("bridged", [False, True], ids=["DDVI", "DBVI"])
def test_corrections_are_the_network_outputs_along_the_reverse_path(bridged):
    """``corrections`` runs the path from t_N down: step j's output is the network's at
    t_{N-j} and at the state the sampler is in there (a network that reads u's first entry
    shows it is the sampler's path: u_N, then each step's update)."""
    sched = log_snr_schedule(6)

    def network(u, t):
        return jnp.full_like(u, t) + 1e-3 * u[0], 0.0

    start = {"start_loc": jnp.full(D, 0.5), "start_scale": jnp.full(D, 2.0)} if bridged else {}
    fam = DenoisingDiffusion(network, jnp.zeros(D), jnp.ones(D), sched, **start)
    g = np.asarray(fam.corrections(jr.key(3), num_paths=4))
    assert g.shape == (4, 6, D)
    times = np.asarray(sched.times)[1:][::-1]
    k_start, k_path = jr.split(jr.key(3))
    u = np.asarray(jr.normal(k_start, (4, D)))
    if bridged:
        u = 0.5 + 2.0 * u
    xis = np.asarray(jr.normal(k_path, (4, 6, D)))
    a = np.asarray(sched.step_factor)[::-1]
    abar = np.asarray(sched.alpha_bar)[1:][::-1]
    for j in range(6):  # the DDPM-type step of the module docstring, denoiser form
        out = times[j] + 1e-3 * u[:, :1]
        np.testing.assert_allclose(g[:, j], np.broadcast_to(out, (4, D)), rtol=1e-5)
        var = 1 - a[j] ** 2
        drift = np.sqrt(abar[j] / (1 - abar[j])) * out
        u = a[j] * u + var * drift / a[j] + np.sqrt(var) * xis[:, j]
