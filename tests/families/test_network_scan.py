"""scan_with_network: the batched parameter gradient is autodiff's, up to round-off."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from bayesgen.families.diffusion import DenoisingDiffusion, log_snr_schedule
from bayesgen.families.network_scan import scan_with_network

D, N = 5, 7


def _params(key):
    k1, k2, k3 = jr.split(key, 3)
    return {"w1": 0.5 * jr.normal(k1, (D + 1, 8)), "w2": 0.5 * jr.normal(k2, (8, 2 * D)),
            "b": 0.1 * jr.normal(k3, (8,))}


def _network(p):
    def network(u, t):
        h = jnp.tanh(jnp.concatenate([u, t[None]]) @ p["w1"] + p["b"])
        out = h @ p["w2"]
        return out[:D], out[D:]

    return network


def _step(apply, carry, x):
    """A diffusion-like step that uses the live output for the move and the frozen one for
    a residual, as sticking-the-landing does."""
    u, acc = carry
    xi, t = x
    (g, lv), (g_frozen, lv_frozen) = apply(u, t)
    u_next = 0.9 * u + 0.3 * g + jnp.exp(0.5 * jnp.tanh(lv)) * xi
    res = (u_next - 0.9 * u - 0.3 * g_frozen) * jnp.exp(-0.5 * jnp.tanh(lv_frozen))
    return (u_next, acc + jnp.sum(res**2) + jnp.sum(u_next * t)), jnp.sum(u_next)


def _loss(params, u0, xs, batched, remat=False):
    (u, acc), ys = scan_with_network(_step, _network(params), (u0, 0.0), xs,
                                     (u0, xs[1][0]), batched_param_grad=batched, remat=remat)
    return jnp.sum(u**2) + acc + jnp.sum(jnp.sin(ys))


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("remat", [False, True])
def test_batched_parameter_gradient_is_autodiffs(remat):
    params = _params(jr.key(0))
    u0 = jr.normal(jr.key(1), (D,))
    xs = (jr.normal(jr.key(2), (N, D)), jnp.linspace(1.0, 0.1, N))
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    want = grad(params, u0, xs, False, False)
    got = grad(params, u0, xs, True, remat)
    np.testing.assert_allclose(_loss(params, u0, xs, True), _loss(params, u0, xs, False),
                               rtol=1e-6)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=2e-5, atol=2e-5)
    assert np.abs(_flat(want[0])).max() > 1e-2


def test_frozen_output_has_no_parameter_gradient_and_live_has():
    params = _params(jr.key(3))
    u0 = jr.normal(jr.key(4), (D,))
    xs = (jnp.zeros((1, D)), jnp.ones(1))

    def one(params, role, batched):
        def step(apply, carry, x):
            out = apply(carry, x[1])[role]
            return carry, jnp.sum(out[0]) + jnp.sum(out[1])

        _, ys = scan_with_network(step, _network(params), u0, xs, (u0, xs[1][0]),
                                  batched_param_grad=batched)
        return ys[0]

    for batched in (True, False):
        frozen = jax.grad(one)(params, 1, batched)
        live = jax.grad(one)(params, 0, batched)
        assert np.all(_flat(frozen) == 0.0)
        want = jax.grad(lambda p: sum(jnp.sum(o) for o in _network(p)(u0, xs[1][0])))(params)
        np.testing.assert_allclose(_flat(live), _flat(want), rtol=1e-5, atol=1e-6)


def test_the_step_must_call_the_network_once():
    params = _params(jr.key(5))
    u0 = jnp.zeros(D)
    xs = (jnp.zeros((3, D)), jnp.ones(3))

    def twice(apply, carry, x):
        apply(carry, x[1])
        apply(carry, x[1])
        return carry, None

    for batched in (True, False):
        with pytest.raises(ValueError, match="exactly once, it called it 2 times"):
            scan_with_network(twice, _network(params), u0, xs, (u0, xs[1][0]),
                              batched_param_grad=batched)


@pytest.mark.parametrize("shape", [(4,), ()])
@pytest.mark.parametrize("bridged", [False, True])
@pytest.mark.parametrize("stl", [False, True])
def test_diffusion_family_gradient_is_the_same_either_way(bridged, stl, shape):
    """The family's loss gradient over a batch of paths (vmapped) or one path (not), in the
    network's parameters and the start's, with the batched and per-step rules."""
    sched = log_snr_schedule(6, log_snr_min=-4.0)
    params = _params(jr.key(6))
    start = {"loc": 0.3 * jnp.ones(D), "scale": 0.7 * jnp.ones(D)}

    def loss(params, start, rule):
        kw = {"start_loc": start["loc"], "start_scale": start["scale"]} if bridged else {}
        fam = DenoisingDiffusion(_network(params), jnp.zeros(D), jnp.ones(D), sched,
                                 stick_the_landing=stl, param_grad=rule, **kw)
        z, (log_q,) = fam.sample_with_intermediates(jr.key(7), shape)
        return jnp.mean(log_q + 0.5 * jnp.sum((z - 1.0) ** 2, -1))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    want, got = grad(params, start, "per_step"), grad(params, start, "batched")
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-4, atol=1e-5)
    assert np.abs(_flat(want[0])).max() > 1e-2
