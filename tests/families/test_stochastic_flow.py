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
- The backward path (``reverse_path`` / ``reference_log_ratio``): its term is the forward
  surrogate of the same path (run forward with the noises that retrace it, path by path);
  from exact posterior draws its mean is an upper bound on log Z (the EUBO) and
  ``E_B[Z / w] = 1``; with an affine layer that is the exact transport both bounds are log Z.
  With the backward Langevin Delta S sign flipped, the EUBO tests fail (EUBO gap 0.71
  instead of 0.30, mean of Z / w 1.7e4 instead of 1, weights with sd 2.0 on the exact
  transport) and the retrace test fails for the controlled step; with the control's sign
  not flipped in the backward drift only the retrace test (and CMCD's) catches it, since
  the backward weights are then exact for another forward process.
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
        layers = dict(final_layer=chain_layers(layer.bind(first), affine))
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


# --------------------------------------------------------------------------- the backward path


def _control(u, g, t):
    return 0.3 * jnp.tanh(u) * t + 0.1 * g


def _tilted_affine():
    """An initial layer that is not the identity (its inverse and log-det both matter)."""
    return affine_layer(jnp.array([0.1, 0.0, -0.1]),
                        jnp.array([[1.1, 0.0, 0.0], [0.2, 0.9, 0.0], [-0.1, 0.3, 1.2]]))


def _exact_draws(key, n):
    return MEAN + jr.normal(key, (n, D)) @ CHOL.T


def _reverse_log_weights(family, key, n):
    """``log p(x, z) - reference_log_ratio(z)`` for n exact posterior draws z."""
    z = _exact_draws(jr.fold_in(key, 1), n)
    return np.asarray(jax.vmap(_log_target)(z) - family.reference_log_ratio(key, z), np.float64)


@pytest.mark.parametrize(
    "mala, latent, control",
    [(False, False, _control), (True, False, None), (True, True, None)],
    ids=["controlled-langevin", "mala", "latent-mala"],
)
def test_backward_path_term_is_the_forward_surrogate_of_the_same_path(mala, latent, control):
    """Run backward from random ends, then forward with the randomness that retraces the
    path: the forward run ends where the backward one started and its surrogate equals the
    backward term, path by path (layers, block and final steps, the control's sign)."""
    n, nb, k, f = 64, 3, 2, 2
    layers = {} if latent else dict(initial_layer=_tilted_affine())
    fam = _snf(num_blocks=nb, steps=k, eps=0.5 if mala else 0.1, mala=mala, latent=latent,
               final_steps=f, control=control, **layers)
    keys = jr.split(jr.key(12), 5)

    @jax.jit
    def there_and_back(u_end):
        u0, term, retrace = jax.vmap(fam.reverse_path)(
            u_end, jr.normal(keys[1], (n, nb, k, D)), jnp.log(jr.uniform(keys[2], (n, nb, k))),
            jr.normal(keys[3], (n, f, D)), jnp.log(jr.uniform(keys[4], (n, f))))
        u_fwd, term_fwd, _ = jax.vmap(fam.path)(u0, *retrace)
        return u0, term, u_fwd, term_fwd, retrace

    u_end = 1.3 * jr.normal(keys[0], (n, D))
    u0, term, u_fwd, term_fwd, retrace = there_and_back(u_end)
    np.testing.assert_allclose(u_fwd, u_end, atol=1e-4)
    np.testing.assert_allclose(term_fwd, term, atol=1e-4)
    assert float(jnp.linalg.norm(u0 - u_end, axis=-1).min()) > 0.05  # every path moved
    if mala:  # both branches of the MALA step were taken
        moved = np.concatenate([np.ravel(retrace[1] < 0), np.ravel(retrace[3] < 0)])
        assert 0.2 < moved.mean() < 0.95, moved.mean()


@pytest.mark.parametrize(
    "mala, latent, control",
    [(False, False, None), (False, True, _control), (True, True, None)],
    ids=["langevin", "latent-controlled-langevin", "latent-mala"],
)
def test_eubo_and_elbo_bracket_log_z_and_backward_weights_are_exact(mala, latent, control):
    """Off the optimum, with exact posterior draws: E_B[log w] >= log Z >= E_F[log w], and the
    backward importance identity E_B[1 / w] = 1 / Z.

    Measured: EUBO gaps 0.296, 0.195, 0.150 (se 0.004 - 0.005), ELBO gaps -0.33, -0.22,
    -0.17, mean Z / w 0.985 +- 0.009, 0.986 +- 0.006, 0.995 +- 0.005. With the sign of the
    backward Langevin Delta S flipped: EUBO gaps 0.71 and 0.70, mean Z / w 1.7e4 +- 8.8e3
    and 1.0e4 +- 6.3e3 (Langevin, controlled Langevin).
    """
    n = 20_000
    fam = _snf(eps=0.5 if mala else 0.1, mala=mala, latent=latent, final_steps=2,
               control=control)
    lw_back = _reverse_log_weights(fam, jr.key(13), n)
    lw_fwd = _log_weights(fam, jr.key(14), n)
    eubo, se_eubo = lw_back.mean() - LOG_Z, lw_back.std() / math.sqrt(n)
    elbo, se_elbo = lw_fwd.mean() - LOG_Z, lw_fwd.std() / math.sqrt(n)
    assert eubo > -4 * se_eubo and elbo < 4 * se_elbo, (eubo, elbo)
    assert 0.1 < eubo < 0.5 and -0.5 < elbo < -0.1, (eubo, elbo)
    inv_w = np.exp(LOG_Z - lw_back)
    mean, se = inv_w.mean(), inv_w.std() / math.sqrt(n)
    assert se < 0.02 and abs(mean - 1.0) < 4 * se, (mean, se)


@pytest.mark.parametrize("mala", [False, True], ids=["langevin", "mala"])
def test_exact_transport_closes_both_bounds(mala):
    """An affine layer that maps N(0, I) exactly onto the posterior: the steps start (and end)
    at their target, and both bounds are log Z with nearly constant weights (exactly, for
    MALA: its Delta S telescope). Langevin: the paper layout, the layer first and every block
    on the posterior; MALA: the latent layout, the layer as the final T."""
    m0, l0 = MEAN + 0.3, 1.2 * CHOL
    l0_inv = jnp.linalg.inv(l0)
    exact = affine_layer(l0_inv @ (MEAN - m0), l0_inv @ CHOL)
    layers = dict(final_layer=exact) if mala else dict(initial_layer=exact)
    fam = StochasticNormalizingFlow(
        _log_target, m0, l0, step_sizes=jnp.full((2,), 0.5 if mala else 0.02),
        lambdas=linear_schedule(2) if mala else jnp.ones(2), langevin_steps=2, final_steps=3,
        mala=mala, **layers)
    for lw in (_reverse_log_weights(fam, jr.key(15), 2000), _log_weights(fam, jr.key(16), 2000)):
        # measured: |mean - log Z| < 6e-4, sd 0.015 (Langevin), 1e-7 and 4e-7 (MALA); with
        # the backward Langevin Delta S sign flipped, the backward sd is 2.0
        assert abs(lw.mean() - LOG_Z) < 0.01 and lw.std() < 0.05, (lw.mean() - LOG_Z, lw.std())


def test_layers_invert_and_reference_log_ratio_vectorises():
    u = jnp.array([0.3, -1.2, 0.8])
    coupling, params = _random_couplings(jr.key(5), 1, 0.3)
    block = {"loc": jnp.array([0.1, 0.0, -0.1]), "scale": jnp.array([1.1, 0.8, 1.3])}
    first = jax.tree.map(lambda a: a[0], params)
    layers = [_tilted_affine(), affine_layer(jnp.ones(D), jnp.array([0.5, 2.0, 1.5])),
              elementwise_affine_block.bind(block), coupling.bind(first),
              chain_layers(coupling.bind(first), _tilted_affine())]
    for layer in layers:
        y, ld = layer(u)
        x, ild = layer.inverse(y)
        np.testing.assert_allclose(x, u, atol=1e-5)
        np.testing.assert_allclose(ild, -ld, atol=1e-5)
        assert float(jnp.abs(y - u).max()) > 0.05 and abs(float(ld)) > 0.01
    fam = StochasticNormalizingFlow(_log_target, MEAN, CHOL, step_sizes=jnp.full((1,), 0.1),
                                    lambdas=jnp.ones(1), langevin_steps=1)
    z = _exact_draws(jr.key(6), 6)
    flat = fam.reference_log_ratio(jr.key(7), z)
    batched = fam.reference_log_ratio(jr.key(7), z.reshape(2, 3, D))
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched.reshape(6), flat, rtol=1e-6)
    with pytest.raises(ValueError, match="trailing dimension"):
        fam.reference_log_ratio(jr.key(7), jnp.zeros((4, D + 1)))
    plain = StochasticNormalizingFlow(_log_target, MEAN, CHOL, step_sizes=jnp.full((2,), 0.1),
                                      lambdas=linear_schedule(2),
                                      final_layer=lambda v: (v, jnp.zeros(())))
    with pytest.raises(TypeError, match="inverse of final_layer"):
        plain.reference_log_ratio(jr.key(0), z)


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
