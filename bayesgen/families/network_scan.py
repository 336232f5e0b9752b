"""A scan that calls a network once a step, with the network's parameter gradient taken once.

Reverse-mode autodiff of ``lax.scan`` over a step that applies a network ``f(theta, u)``
accumulates the parameter cotangent step by step: at each of the N steps an outer product
the size of every weight matrix is added into an accumulator. For a wide first or last layer
(the diffusion families' score network on a deep GP's 2500-d latent has two 2500 x 256
matrices) that is N read-modify-writes of megabytes, memory-bound on a CPU, and it costs
more than the forward pass.

:func:`scan_with_network` takes the same gradient another way. The reverse pass runs with
the parameters held fixed and a zero "probe" added to the network's output at each step, so
it yields the cotangent ``g_k`` of the output at step k along with the inputs ``x_k`` the
network saw; the parameter gradient ``sum_k (d f(theta, x_k) / d theta)^T g_k`` is then one
VJP of the network batched over the N steps (matrix-matrix products instead of N
matrix-vector ones). The result is the same gradient up to round-off (tested against plain
autodiff); the forward pass is unchanged.

The step also gets the network's output a second time with the parameters' gradient
stopped: the "frozen" network of sticking-the-landing estimators (Roeder, Wu & Duvenaud,
2017), which differentiate a density only through its argument. It is the same evaluation
(same value, same derivative in ``x``, no parameter cotangent), so sticking the landing no
longer costs a second network pass a step.

Why by hand: JAX's scan has no such option (its transpose accumulates loop-invariant
cotangents in the carry), and the saving is large for the diffusion guides on deep GPs
(docs/benchmarks.md); the pieces used are ``jax.custom_vjp`` and ``jax.make_jaxpr`` (to
make the network's parameters explicit arguments of the custom rule).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def scan_with_network(step: Callable, network: Callable, carry, xs, example_args: tuple, *,
                      batched_param_grad: bool = True, remat: bool = False):
    """``lax.scan(lambda c, x: step(apply, c, x), carry, xs)`` with ``apply`` the network.

    Parameters
    ----------
    step : ``(apply, carry, x) -> (carry, y)``, calling ``apply(*args)`` exactly once; it
        returns ``(live, frozen)``: ``network(*args)`` twice, the second with the gradient of
        the network's parameters stopped (its derivative in ``args`` kept).
    network : the network, closing over its parameters (arrays or tracers).
    example_args : arguments of one call of ``network`` (arrays of the right shapes and
        dtypes), to find what it closes over.
    batched_param_grad : take the parameters' gradient once over all steps (module
        docstring; the default); ``False`` for plain autodiff through the scan (the same
        gradient up to round-off, slower; kept to check the first against).
    remat : recompute each step in the backward pass (memory O(1) in the steps).
    """
    net_c, consts, out_shape = _hoist_parameters(network, example_args)
    if not batched_param_grad:
        stopped = jax.lax.stop_gradient(consts)

        def apply(*args):
            return net_c(*args, *consts), net_c(*args, *stopped)

        body = _counted(step, apply)
        return jax.lax.scan(jax.checkpoint(body) if remat else body, carry, xs)
    return _scan(step, net_c, remat, out_shape, carry, xs, *consts)


def stop_parameter_gradient(network: Callable, example_args: tuple) -> Callable:
    """``network`` with the gradient of what it closes over (its parameters) stopped."""
    net_c, consts, _ = _hoist_parameters(network, example_args)
    stopped = jax.lax.stop_gradient(consts)
    return lambda *args: net_c(*args, *stopped)


def _hoist_parameters(network, example_args):
    """``(net, params, out_shape)`` with ``net(*args, *params) == network(*args)``: the
    floating-point arrays ``network`` closes over (its parameters, traced or not) made
    explicit arguments; ``out_shape``, the shapes and dtypes of its output.

    ``jax.closure_convert`` does this too, but it caches on the function object in a strong
    LRU cache of 4096 entries, so each new closure of concrete parameters (a guide's eager
    call) would keep its arrays alive; this traces the network once a call instead.
    """
    closed, out_shape = jax.make_jaxpr(network, return_shape=True)(*example_args)
    consts = list(closed.consts)
    hoisted = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts]
    num_args = len(example_args)
    out_tree = jax.tree.structure(out_shape)

    def net(*args_and_params):
        args, params = args_and_params[:num_args], iter(args_and_params[num_args:])
        values = [next(params) if h else c for c, h in zip(consts, hoisted)]
        out = jax.core.eval_jaxpr(closed.jaxpr, values, *jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    return net, [c for c, h in zip(consts, hoisted) if h], out_shape


def _counted(step, apply):
    """``step`` bound to ``apply``, checked to call it exactly once."""

    def body(c, x):
        calls = []

        def counted(*args):
            calls.append(args)
            return apply(*args)

        out = step(counted, c, x)
        if len(calls) != 1:
            raise ValueError(
                f"scan_with_network: the step must call the network exactly once, it called it "
                f"{len(calls)} times")
        return out

    return body


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _scan(step, net_c, remat, out_shape, carry, xs, *consts):
    def apply(*args):
        out = net_c(*args, *consts)
        return out, out

    body = _counted(step, apply)
    return jax.lax.scan(jax.checkpoint(body) if remat else body, carry, xs)


def _scan_fwd(step, net_c, remat, out_shape, carry, xs, *consts):
    def probed(carry, xs, probes):
        def body(c, x_probe):
            x, probe = x_probe
            seen = []

            def apply(*args):
                seen.append(args)
                out = net_c(*args, *consts)
                return jax.tree.map(jnp.add, out, probe), out

            c, y = _counted(step, apply)(c, x)
            return c, (y, seen[0])

        if remat:
            body = jax.checkpoint(body)
        c_end, (ys, inputs) = jax.lax.scan(body, carry, (xs, probes))
        return (c_end, ys), inputs

    n = jax.tree.leaves(xs)[0].shape[0]
    probes = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), out_shape)
    out, pull_back, inputs = jax.vjp(probed, carry, xs, probes, has_aux=True)
    return out, (pull_back, inputs, consts)


def _scan_bwd(step, net_c, remat, out_shape, residuals, cotangent):
    pull_back, inputs, consts = residuals
    ct_carry, ct_xs, ct_outputs = pull_back(cotangent)

    def over_steps(*cs):
        return jax.vmap(lambda *args: net_c(*args, *cs))(*inputs)

    _, pull_consts = jax.vjp(over_steps, *consts)
    return (ct_carry, ct_xs, *pull_consts(ct_outputs))


_scan.defvjp(_scan_fwd, _scan_bwd)
