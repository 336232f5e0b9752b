"""The stochastic normalizing flow's claims: an exact flow without noise, exact path weights.

- With no stochastic steps and no layers the surrogate is the preconditioner's Gaussian
  log-density on every draw; with layers it is the flow's log-density (log-dets checked
  against ``jax.jacobian`` of the whole map).
- For any layers, step sizes and schedule the path weights ``exp(log p - surrogate)`` are
  exact importance weights (mean Z) and ``E[log p - surrogate] <= log Z``, for Langevin and
  for MALA steps. Checked by hand when the tests were written: a flipped sign of either
  Delta S, of the layers' log-dets, a dropped Langevin Delta S, or the Langevin Delta S in
  place of MALA's, each moves the mean weight by 8 - 27% or more (>50 standard errors) or
  puts the "bound" above log Z.
- Langevin steps on the exact target tighten the bound.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from bayesgen.families.flows import build_flow
from bayesgen.families.stochastic_flow import (
    StochasticNormalizingFlow,
    affine_layer,
    bijection_block,
    chain_layers,
    elementwise_affine_block,
    linear_schedule,
    monotone_schedule,
    stack_bijection_blocks,
)

D = 3
LOG_Z = 1.7


def _gaussian_target():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(D, D))
    cov = a @ a.T / D + 0.3 * np.eye(D)
    return jnp.asarray(rng.normal(size=D), jnp.float32), jnp.asarray(cov, jnp.float32)


MEAN, COV = _gaussian_target()
CHOL = jnp.linalg.cholesky(COV)


def _log_target(z):
    r = z - MEAN
    return (LOG_Z - 0.5 * r @ jnp.linalg.solve(COV, r)
            - 0.5 * jnp.linalg.slogdet(2 * math.pi * COV)[1])


def _log_weights(family, key, n):
    z, (log_q,) = jax.jit(lambda k: family.sample_with_intermediates(k, (n,)))(key)
    return np.asarray(jax.vmap(_log_target)(z) - log_q, np.float64)


def _random_couplings(key, num_blocks, scale, layers_per_block=2):
    """RealNVP blocks with every weight perturbed by ``scale`` (no longer the identity)."""
    bij = build_flow("realnvp", key, D, num_layers=num_blocks * layers_per_block, hidden=16)
    arrays, static = stack_bijection_blocks(bij, num_blocks)
    params, fixed = eqx.partition(arrays, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(jr.fold_in(key, 1), len(leaves))
    leaves = [x + scale * jr.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return bijection_block(static), eqx.combine(jax.tree.unflatten(treedef, leaves), fixed)


def _snf(num_blocks=3, steps=2, eps=0.1, mala=False, flow_scale=0.05, shift=0.3, spread=1.2,
         latent=False, **kw):
    """Off-optimum SNF on the Gaussian target: couplings interleaved with the steps, or
    (``latent``) one coupling stack and an affine map after them, the steps in its input."""
    if latent:
        layer, params = _random_couplings(jr.key(11), 1, flow_scale)
        first = jax.tree.map(lambda a: a[0], params)
        affine = affine_layer(jnp.array([0.1, -0.1, 0.05]), jnp.array([1.1, 0.9, 1.05]))
        layers = dict(final_layer=chain_layers(lambda v: layer(first, v), affine))
    else:
        layer, params = _random_couplings(jr.key(11), num_blocks, flow_scale)
        layers = dict(block_layer=layer, block_params=params)
    return StochasticNormalizingFlow(
        _log_target, MEAN + shift, spread * CHOL, step_sizes=jnp.full((num_blocks,), eps),
        lambdas=linear_schedule(num_blocks), langevin_steps=steps, mala=mala, **layers, **kw)


# --------------------------------------------------------------------------- exact cases


def test_no_steps_no_layers_is_the_preconditioner_gaussian():
    loc = jnp.array([0.3, -1.0, 2.0])
    scale = jnp.array([[0.5, 0.0, 0.0], [0.2, 2.0, 0.0], [-0.3, 0.1, 1.0]])
    fam = StochasticNormalizingFlow(_log_target, loc, scale, step_sizes=jnp.full((2,), 0.1),
                                    lambdas=linear_schedule(2), langevin_steps=0)
    z, (log_q,) = fam.sample_with_intermediates(jr.key(0), (7,))
    exact = jax.scipy.stats.multivariate_normal.logpdf(z, loc, scale @ scale.T)
    np.testing.assert_allclose(log_q, exact, atol=1e-4)
    assert fam.density == "lower_bound"
    # the path form: log N(u_0) with u_0 the whitened draw
    u0 = jnp.array([0.4, -1.2, 0.7])
    u, path_term, _ = fam.path(u0, jnp.zeros((2, 0, D)), jnp.zeros((2, 0)))
    np.testing.assert_allclose(u, u0)
    np.testing.assert_allclose(path_term, jax.scipy.stats.norm.logpdf(u0).sum(), rtol=1e-6)


def test_layer_log_dets_match_the_jacobian():
    """No stochastic steps: the surrogate is log N(u_0) - log|det d(z)/d(u_0)|."""
    layer, params = _random_couplings(jr.key(3), 2, 0.3, layers_per_block=1)
    loc0, tril = jnp.array([0.1, -0.2, 0.3]), jnp.array([[1.2, 0, 0], [0.4, 0.7, 0],
                                                          [-0.5, 0.2, 1.5]])
    blocks = {"loc": jnp.array([[0.1, 0.0, -0.1], [0.0, 0.3, 0.0]]),
              "scale": jnp.array([[1.1, 0.8, 1.3], [0.9, 1.2, 0.7]])}

    def coupled(p, u):
        u, ld1 = layer(p["coupling"], u)
        u, ld2 = elementwise_affine_block(p["affine"], u)
        return u, ld1 + ld2

    pre_scale = jnp.array([0.5, 2.0, 1.5])
    fam = StochasticNormalizingFlow(
        _log_target, MEAN, pre_scale, step_sizes=jnp.full((2,), 0.1),
        lambdas=linear_schedule(2), initial_layer=affine_layer(loc0, tril), block_layer=coupled,
        block_params={"coupling": params, "affine": blocks},
        final_layer=affine_layer(jnp.array([0.5, 0.0, -0.5]),
                                 jnp.array([[0.8, 0, 0], [-0.3, 1.4, 0], [0.2, 0.5, 0.6]])),
        langevin_steps=0)

    def run(u0):
        u, term, _ = fam.path(u0, jnp.zeros((2, 0, D)), jnp.zeros((2, 0)))
        return fam.to_latent(u), term - fam._log_det_precond()

    @jax.jit
    def check(u0):
        jac = jax.jacobian(lambda v: run(v)[0])(u0)
        expected = jax.scipy.stats.norm.logpdf(u0).sum() - jnp.linalg.slogdet(jac)[1]
        return run(u0)[1], expected

    for u0 in jr.normal(jr.key(4), (4, D)):
        term, expected = check(u0)
        np.testing.assert_allclose(term, expected, atol=2e-4)
    # and the perturbed couplings really move points (the check above is not trivial)
    u1, ld = layer(jax.tree.map(lambda x: x[0], params), jnp.ones(D))
    assert float(jnp.abs(u1 - 1.0).max()) > 0.05 and abs(float(ld)) > 0.01


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize(
    "mala, latent", [(False, False), (True, False), (True, True)],
    ids=["langevin", "mala", "latent-mala"],
)
def test_path_weights_are_exact_importance_weights(mala, latent):
    """Off the optimum (gap 0.1 - 0.5 nats): E[exp(log p - surrogate)] = Z and the mean is below.

    MALA runs with larger steps so that a good share of proposals is rejected and both
    branches of its Delta S are exercised. ``latent``: the steps run before a final layer,
    on the target pulled back through it.
    """
    fam = _snf(eps=0.5 if mala else 0.1, mala=mala, latent=latent)
    n = 100_000
    lw = _log_weights(fam, jr.key(6), n)
    w = np.exp(lw - LOG_Z)
    mean_w, se_w = w.mean(), w.std() / math.sqrt(n)
    gap, se_gap = lw.mean() - LOG_Z, lw.std() / math.sqrt(n)
    assert -0.5 < gap < -0.1, gap  # measured: -0.35, -0.25, -0.17
    assert gap < 4 * se_gap  # the lower bound
    assert abs(mean_w - 1.0) < 4 * se_w + 0.005, (mean_w, se_w, gap)
    if mala:
        _, _, info = fam.sample_with_diagnostics(jr.key(7), (4000,))
        acc = float(info["acceptance"].mean())
        assert 0.3 < acc < 0.95, acc  # measured 0.77


def test_langevin_on_the_exact_target_tightens_the_bound():
    """No layers, a wrong start: more Langevin steps (fixed step size) close the gap."""
    gaps, ses = [], []
    for k in (0, 5, 25):
        fam = StochasticNormalizingFlow(
            _log_target, MEAN + 0.5, 1.5 * CHOL, step_sizes=jnp.full((4,), 0.02),
            lambdas=linear_schedule(4), langevin_steps=k)
        lw = _log_weights(fam, jr.key(k), 20_000)
        gaps.append(lw.mean() - LOG_Z)
        ses.append(lw.std() / math.sqrt(lw.size))
        assert gaps[-1] < 4 * ses[-1]
    # measured: -1.38, -0.98, -0.48
    assert gaps[0] < gaps[1] - 4 * ses[1] and gaps[1] < gaps[2] - 4 * ses[2], gaps
    assert gaps[2] > 0.5 * gaps[0], gaps


# --------------------------------------------------------------------------- gradients, schedule


def test_gradients_are_finite_and_reach_every_parameter():
    mala = True
    layer, arrays = _random_couplings(jr.key(2), 2, 0.05)
    params, fixed = eqx.partition(arrays, eqx.is_inexact_array)  # integer permutations stay

    def loss(p, key):
        fam = StochasticNormalizingFlow(
            _log_target, MEAN, CHOL, step_sizes=jax.nn.softplus(p["raw_eps"]),
            lambdas=monotone_schedule(p["logits"]), block_layer=layer,
            block_params=eqx.combine(p["flow"], fixed),
            langevin_steps=2, mala=mala)
        z, (log_q,) = fam.sample_with_intermediates(key, (64,))
        return jnp.mean(log_q - jax.vmap(_log_target)(z))

    p = {"raw_eps": jnp.full((2, D), -1.0), "logits": jnp.array([0.3, -0.2]), "flow": params}
    g = jax.jit(jax.grad(loss))(p, jr.key(0))
    for leaf in jax.tree.leaves(g):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # the first block's step sizes and the schedule move the loss
    assert np.abs(np.asarray(g["raw_eps"][0])).max() > 0
    assert np.abs(np.asarray(g["logits"])).max() > 0
    assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(g["flow"])) > 0


def test_mala_rejects_overflowing_proposals_with_finite_gradients():
    """A target with a wall where it overflows: proposals beyond are rejected, gradients finite."""

    def walled(z):
        return _log_target(z) - jnp.exp(60.0 * (z[0] - MEAN[0] - 1.0))

    def loss(raw_eps, key):
        fam = StochasticNormalizingFlow(walled, MEAN, CHOL, step_sizes=jax.nn.softplus(raw_eps),
                                        lambdas=jnp.ones(2), langevin_steps=3, mala=True)
        z, (log_q,) = fam.sample_with_intermediates(key, (512,))
        return jnp.mean(log_q - jax.vmap(walled)(z)), z

    raw = jnp.full((2, D), 0.5)  # large steps: many proposals land beyond the wall
    (value, z), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(raw, jr.key(0))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.isfinite(np.asarray(jax.vmap(walled)(z))))
    # the wall was hit: some proposals overflowed
    fam = StochasticNormalizingFlow(walled, MEAN, CHOL, step_sizes=jax.nn.softplus(raw),
                                    lambdas=jnp.ones(2), langevin_steps=3, mala=True)
    u = jr.normal(jr.key(1), (512, D)) * 1.6
    prop = jax.vmap(walled)(fam.to_latent(u))
    assert not np.all(np.isfinite(np.asarray(prop)))


def test_final_mala_steps_move_the_draws_but_not_the_loss_or_its_gradient():
    """The path term telescopes over MALA steps on the posterior: same loss, same gradient.

    The final layer is an affine map with learned parameters, so the target the steps see
    depends on them too (its pulled-back log-density must stay live in them).
    """
    nb, k, f, n = 2, 1, 6, 128
    keys = jr.split(jr.key(9), 5)
    u0 = jr.normal(keys[0], (n, D))
    noises = jr.normal(keys[1], (n, nb, k, D))
    log_unif = jnp.log(jr.uniform(keys[2], (n, nb, k)))
    final_noises = jr.normal(keys[3], (n, f, D))
    final_log_unif = jnp.log(jr.uniform(keys[4], (n, f)))

    def mean_loss(p, final_steps):
        fam = StochasticNormalizingFlow(
            _log_target, MEAN + 0.3, 1.2 * CHOL, step_sizes=jnp.full((nb,), 0.4),
            lambdas=linear_schedule(nb), final_layer=affine_layer(p["loc"], p["scale"]),
            langevin_steps=k, mala=True, final_steps=final_steps)

        def one(u, e, lu, fe, flu):
            v, term, _ = fam.path(u, e, lu, fe, flu)
            return term - fam._log_det_precond() - _log_target(fam.to_latent(v)), v

        loss, v = jax.vmap(one)(u0, noises, log_unif, final_noises[:, :final_steps],
                                final_log_unif[:, :final_steps])
        return jnp.mean(loss), v

    p = {"loc": jnp.array([0.1, 0.0, -0.1]),
         "scale": jnp.array([[1.1, 0.0, 0.0], [0.3, 0.9, 0.0], [-0.2, 0.1, 1.2]])}
    results = {}
    for final_steps in (0, f):
        (loss, v), g = jax.jit(jax.value_and_grad(lambda q: mean_loss(q, final_steps),
                                                  has_aux=True))(p)
        results[final_steps] = (float(loss), v, jax.tree.leaves(g))
    (l0, v0, g0), (l1, v1, g1) = results[0], results[f]
    assert float(jnp.abs(v1 - v0).max()) > 0.1  # the final steps moved the draws
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-5)


def test_monotone_schedule_is_linear_at_zero_and_ends_at_one():
    np.testing.assert_allclose(monotone_schedule(jnp.zeros(4)), linear_schedule(4), rtol=1e-6)
    lam = monotone_schedule(jnp.array([2.0, -1.0, 0.5, -3.0]))
    assert np.all(np.diff(np.asarray(lam)) > 0) and lam[0] > 0
    np.testing.assert_allclose(lam[-1], 1.0, rtol=1e-6)


def test_errors_name_the_argument():
    base = dict(step_sizes=jnp.full((2,), 0.1), lambdas=linear_schedule(2))
    with pytest.raises(ValueError, match="langevin_steps"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, langevin_steps=-1, **base)
    with pytest.raises(ValueError, match="step_sizes"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, step_sizes=jnp.ones(3),
                                  lambdas=linear_schedule(2))
    with pytest.raises(ValueError, match="lambdas"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, step_sizes=jnp.ones(2),
                                  lambdas=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="score_clip"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, score_clip=0.0, **base)
    with pytest.raises(ValueError, match="block_layer and block_params"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, block_layer=elementwise_affine_block,
                                  **base)
    with pytest.raises(ValueError, match="block_params"):
        StochasticNormalizingFlow(_log_target, MEAN, CHOL, block_layer=elementwise_affine_block,
                                  block_params={"loc": jnp.zeros((3, D)),
                                                "scale": jnp.ones((3, D))}, **base)
    with pytest.raises(TypeError, match="log_density"):
        StochasticNormalizingFlow(None, MEAN, CHOL, **base)
    fam = StochasticNormalizingFlow(_log_target, MEAN, CHOL, **base)
    with pytest.raises(ValueError, match="intermediates"):
        fam.log_prob(jnp.zeros(D))
    z, inter = fam.sample_with_intermediates(jr.key(0), (5,))
    np.testing.assert_allclose(fam.log_importance_density(jr.key(1), z, inter), inter[0])
