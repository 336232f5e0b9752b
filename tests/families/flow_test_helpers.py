"""Helpers shared by the flow tests (imported by basename: pytest puts this folder on sys.path)."""

import equinox as eqx
import jax
import jax.random as jr


def perturb(module, key, scale):
    """Add N(0, scale^2) noise to every inexact-array leaf (weights, biases, raw parameters).

    The flow stacks start at the identity, which would hide a wrong log-determinant.
    """
    params, static = eqx.partition(module, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [x + scale * jr.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)
