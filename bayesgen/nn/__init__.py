"""flax nnx building blocks shared by the families, and their registration with numpyro.

Networks are built eagerly (``nnx.Rngs`` needs concrete keys) and used functionally: the
module is split once into a graph definition and a pure dict of parameters, the dict is
registered with ``numpyro.param``, and each call merges the current values back into a fresh
module. Nothing is mutated in place, so the guide stays a pure function of its params under
``jit`` and ``vmap`` (numpyro's own ``nnx_module`` writes the traced values into the eager
module).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
from flax import nnx


class MLP(nnx.Module):
    """Multi-layer perceptron ``R^din -> R^dout`` with ``depth`` hidden layers of ``width``."""

    def __init__(
        self,
        din: int,
        dout: int,
        *,
        width: int,
        depth: int,
        rngs: nnx.Rngs,
        activation: Callable = jax.nn.gelu,
    ):
        sizes = [din] + [width] * depth + [dout]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.activation = activation

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def zero_last_layer(mlp: MLP) -> MLP:
    """Zero the last layer of ``mlp`` (kernel and bias), so the network starts at output 0.

    The families use it to start exactly at their reference (a flow at the identity, a
    diffusion at its reference process, a reverse model at the prior).
    """
    last = mlp.layers[-1]
    last.kernel.value = jnp.zeros_like(last.kernel.value)
    last.bias.value = jnp.zeros_like(last.bias.value)
    return mlp


def split_params(module: nnx.Module):
    """``(apply, params)``: a pure ``apply(params, *args)`` and the module's parameter dict."""
    graphdef, state = nnx.split(module, nnx.Param)
    params = nnx.to_pure_dict(state)

    def apply(p, *args, **kwargs):
        st = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(*args, **kwargs)

    return apply, params


def stringify_keys(tree):
    """Nested dict with every key a string (numpyro params and checkpoints; nnx lists use ints)."""
    if isinstance(tree, dict):
        return {str(k): stringify_keys(v) for k, v in tree.items()}
    return tree


def restore_keys(tree, template):
    """Undo :func:`stringify_keys`, taking the original keys from ``template``."""
    if isinstance(template, dict):
        return {k: restore_keys(tree[str(k)], v) for k, v in template.items()}
    return tree


def nnx_param(name: str, module: nnx.Module):
    """Register ``module``'s parameters as the numpyro param ``name``; return the applied net.

    Call inside a guide or model; returns ``net(*args)`` that evaluates the module at the
    current (possibly substituted or optimised) parameter values.
    """
    apply, params = split_params(module)
    value = numpyro.param(name, stringify_keys(params))
    current = restore_keys(value, params)

    def net(*args, **kwargs):
        return apply(current, *args, **kwargs)

    return net


def rescale_output(module: MLP, key, din: int, target_sd, *, num_draws: int = 2048):
    """Rescale the last layer so that ``module(eps)``, eps ~ N(0, I), has mean 0 and sd ``target_sd``.

    A data-free, data-dependent initialisation (one forward pass on base draws) so that a
    family starts close to the preconditioner's Gaussian whatever the network's width.
    """
    eps = jax.random.normal(key, (num_draws, din))
    out = module(eps)
    mean, sd = jnp.mean(out, 0), jnp.std(out, 0) + 1e-12
    last = module.layers[-1]
    factor = jnp.asarray(target_sd) / sd
    last.kernel.value = last.kernel.value * factor
    last.bias.value = (last.bias.value - mean) * factor
    return module


def time_features(t, num_frequencies: int = 4):
    """``[t, sin(pi 2^j t), cos(pi 2^j t)]_{j < num_frequencies}`` for a time in [0, 1]."""
    t = jnp.asarray(t)
    angles = jnp.pi * (2.0 ** jnp.arange(num_frequencies)) * t[..., None]
    return jnp.concatenate([t[..., None], jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ScoreNet(nnx.Module):
    """``f(u, t)``: an MLP of the state (dim) and Fourier features of the time, output zeroed.

    The last layer starts at zero, so a diffusion family built on it starts as its
    reference (see :mod:`bayesgen.families.diffusion`).
    """

    def __init__(self, dim: int, dout: int | None = None, *, width: int, depth: int,
                 rngs: nnx.Rngs, num_frequencies: int = 4, activation: Callable = jax.nn.gelu):
        self.num_frequencies = num_frequencies
        self.mlp = MLP(dim + 1 + 2 * num_frequencies, dout or dim, width=width, depth=depth,
                       rngs=rngs, activation=activation)
        zero_last_layer(self.mlp)

    def __call__(self, u, t):
        feats = time_features(t, self.num_frequencies)
        feats = jnp.broadcast_to(feats, jnp.shape(u)[:-1] + feats.shape[-1:])
        return self.mlp(jnp.concatenate([u, feats], axis=-1))


class ControlNet(nnx.Module):
    """``c(u, g, t) = NN_1(u, t) + NN_2(t) * g``: a control from the state and its target score.

    ``g`` is the (clipped) score of the target at ``u``; ``NN_2(t)`` scales it per coordinate
    and time. Both last layers start at zero, so a family built on it starts uncontrolled
    (the "PISGRAD" network of path-integral samplers, Zhang & Chen 2022, used by CMCD).
    """

    def __init__(self, dim: int, *, width: int, depth: int, rngs: nnx.Rngs,
                 num_frequencies: int = 4, activation: Callable = jax.nn.gelu):
        self.num_frequencies = num_frequencies
        feats = 1 + 2 * num_frequencies
        self.state = MLP(dim + feats, dim, width=width, depth=depth, rngs=rngs,
                         activation=activation)
        self.gain = MLP(feats, dim, width=width, depth=depth, rngs=rngs, activation=activation)
        zero_last_layer(self.state)
        zero_last_layer(self.gain)

    def __call__(self, u, g, t):
        feats = time_features(t, self.num_frequencies)
        feats = jnp.broadcast_to(feats, jnp.shape(u)[:-1] + feats.shape[-1:])
        return self.state(jnp.concatenate([u, feats], axis=-1)) + self.gain(feats) * g
