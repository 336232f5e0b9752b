"""MALA with a mass matrix, so that blackjax's window adaptation can tune it.

blackjax's ``mala`` has a step size but no mass matrix, and its ``window_adaptation``
needs a kernel ``(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix)``. This
file supplies that kernel by a change of variables: with ``M^{-1} = L L^T`` (``L =
diag(sqrt(m))`` for a diagonal inverse mass matrix ``m``), write ``x = L u`` and run
blackjax's own MALA kernel on ``u`` with log density ``log p(L u)`` (the Jacobian is
constant). In ``x`` this is the preconditioned Langevin proposal

    x' = x + h M^{-1} grad log p(x) + sqrt(2 h) L xi,   xi ~ N(0, I),

with its Metropolis-Hastings correction, so nothing of the MALA step is rewritten here.
Positions are flat ``(d,)`` arrays.

References
----------
Roberts, G. O. and Tweedie, R. L. (1996). Exponential convergence of Langevin
distributions and their discrete approximations. *Bernoulli* 2(4), 341-363.
"""

from __future__ import annotations

from collections.abc import Callable

import blackjax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from blackjax.base import SamplingAlgorithm
from blackjax.mcmc.mala import MALAInfo, MALAState

__all__ = ["as_top_level_api", "build_kernel", "init"]


def init(position, logdensity_fn: Callable) -> MALAState:
    """The MALA state at ``position`` (value and gradient of the log density)."""
    return blackjax.mcmc.mala.init(position, logdensity_fn)


def _maps(inverse_mass_matrix):
    m = jnp.asarray(inverse_mass_matrix)
    if m.ndim == 1:
        s = jnp.sqrt(m)
        return (lambda u: s * u), (lambda x: x / s), (lambda gx: s * gx), (lambda gu: gu / s)
    chol = jnp.linalg.cholesky(m)
    return (
        lambda u: chol @ u,
        lambda x: jsl.solve_triangular(chol, x, lower=True),
        lambda gx: chol.T @ gx,
        lambda gu: jsl.solve_triangular(chol.T, gu, lower=False),
    )


def build_kernel():
    """A MALA kernel ``(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix)``."""
    mala_kernel = blackjax.mcmc.mala.build_kernel()

    def kernel(rng_key, state: MALAState, logdensity_fn, step_size, inverse_mass_matrix=None):
        if inverse_mass_matrix is None:
            return mala_kernel(rng_key, state, logdensity_fn, step_size)
        to_x, to_u, grad_to_u, grad_to_x = _maps(inverse_mass_matrix)
        state_u = MALAState(to_u(state.position), state.logdensity, grad_to_u(state.logdensity_grad))
        new_u, info = mala_kernel(rng_key, state_u, lambda u: logdensity_fn(to_x(u)), step_size)
        new = MALAState(to_x(new_u.position), new_u.logdensity, grad_to_x(new_u.logdensity_grad))
        return new, MALAInfo(info.acceptance_rate, info.is_accepted)

    return kernel


def as_top_level_api(logdensity_fn: Callable, step_size, inverse_mass_matrix=None) -> SamplingAlgorithm:
    """Preconditioned MALA as a blackjax ``SamplingAlgorithm`` (``init``, ``step``)."""
    kernel = build_kernel()

    def init_fn(position, rng_key=None):
        del rng_key
        return init(position, logdensity_fn)

    def step_fn(rng_key, state):
        return kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix)

    return SamplingAlgorithm(init_fn, step_fn)


class _Algorithm:
    """What ``blackjax.window_adaptation`` needs of an algorithm: ``init``, ``build_kernel``."""

    init = staticmethod(init)
    build_kernel = staticmethod(build_kernel)

    def __call__(self, logdensity_fn, step_size, inverse_mass_matrix=None):
        return as_top_level_api(logdensity_fn, step_size, inverse_mass_matrix)


preconditioned_mala = _Algorithm()
