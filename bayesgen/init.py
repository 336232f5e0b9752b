"""Find the location and scale of each latent coordinate before training a guide.

Badly conditioned posteriors (an unstandardised regression with one coefficient of sd 1e-3
and another of sd 30) are the common case in statisticians' scripts, and unit-scale Adam on
a flow never gets there. This module finds a Gaussian ``N(m0, L0 L0^T)`` that the guides use
as a fixed preconditioner, so that the trainable part works in roughly unit-scale
coordinates.

The method is a pathfinder-style search (Zhang, Carpenter, Gelman & Vehtari, 2022): run
L-BFGS on the potential ``U(z) = -log p(x, z)`` in the unconstrained space, and at each
iterate ``z_k`` form a Gaussian from the local curvature,

    Sigma_k = (|H_k|_+)^{-1},   H_k = hessian of U at z_k

(eigenvalues replaced by their absolute values and floored, so the matrix is positive
definite even where U is not convex), or, above ``dense_max_dim`` coordinates, from a
Hutchinson estimate of diag(H_k). Each Gaussian is scored by a Monte Carlo ELBO with common
random numbers and the best one is returned. Choosing by ELBO along the path instead of
taking the end point (the Laplace approximation at the MAP) matters for hierarchical models:
their MAP sits at a collapsed scale (tau -> 0, the funnel's neck) where the Laplace
approximation is useless, while an earlier iterate gives a sensible scale.

Pathfinder proper uses the L-BFGS inverse-Hessian estimate; we use the exact Hessian (or
its diagonal) because the dimensions here are moderate and it is more robust on small
paths. blackjax's pathfinder is not used: see NOTES (it hung on logistic regression here
and its init/sample state types disagree).

References
----------
Zhang, Carpenter, Gelman & Vehtari, "Pathfinder: parallel quasi-Newton variational
inference", JMLR 23, 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import optax


class Preconditioner(NamedTuple):
    """A Gaussian N(loc, scale scale^T); ``scale`` is lower triangular (d, d) or a (d,) vector."""

    loc: jax.Array
    scale: jax.Array
    elbo: jax.Array  # Monte Carlo ELBO of the chosen Gaussian (-inf when none was finite)
    iteration: jax.Array  # which L-BFGS iterate was chosen (0 = the initial point)


def _lbfgs_path(potential, x0, num_steps):
    """Iterates of L-BFGS on ``potential`` from x0 (x0 included); stalls at nonfinite steps."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(potential)

    def step(carry, _):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        updates, new_state = opt.update(grad, state, x, value=value, grad=grad, value_fn=potential)
        new_x = optax.apply_updates(x, updates)
        ok = jnp.all(jnp.isfinite(new_x)) & jnp.isfinite(potential(new_x))
        x = jnp.where(ok, new_x, x)
        state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        return (x, state), x

    _, path = jax.lax.scan(step, (x0, opt.init(x0)), None, length=num_steps)
    return jnp.concatenate([x0[None], path], axis=0)


def _dense_scale(potential, x, floor):
    h = jax.hessian(potential)(x)
    h = 0.5 * (h + h.T)
    lam, vec = jnp.linalg.eigh(h)
    lam = jnp.maximum(jnp.abs(lam), floor)
    cov = (vec / lam) @ vec.T
    cov = 0.5 * (cov + cov.T)
    return jnp.linalg.cholesky(cov + 1e-10 * jnp.eye(x.shape[0]) * jnp.max(jnp.diagonal(cov)))


def _diag_scale(potential, x, key, num_probes, floor):
    grad = jax.grad(potential)

    def hvp(v):
        return jax.jvp(grad, (x,), (v,))[1]

    probes = jr.rademacher(key, (num_probes, x.shape[0]), dtype=x.dtype)
    diag = jnp.mean(probes * jax.vmap(hvp)(probes), axis=0)
    return 1.0 / jnp.sqrt(jnp.maximum(jnp.abs(diag), floor))


def find_preconditioner(
    potential,
    x0,
    key,
    *,
    num_steps: int = 100,
    num_draws: int = 32,
    dense: bool | None = None,
    dense_max_dim: int = 256,
    num_probes: int = 16,
    curvature_floor: float = 1e-6,
    objective: str = "iw",
    widen: bool = False,
) -> Preconditioner:
    """Best Gaussian along an L-BFGS path on ``potential`` (a function of the flat latent).

    Parameters
    ----------
    potential : callable, flat unconstrained latent (d,) -> -log p(x, z) (scalar).
    x0 : (d,) starting point.
    key : PRNG key for the ELBO draws (common random numbers across iterates) and probes.
    num_steps : L-BFGS iterations.
    num_draws : Monte Carlo draws per ELBO estimate.
    dense : full covariance (Cholesky factor) if True, diagonal if False; default
        ``d <= dense_max_dim``.
    num_probes : Rademacher probes for the diagonal-Hessian estimate (diagonal mode).
    curvature_floor : smallest curvature kept (eigenvalue or diagonal entry).

    Returns
    -------
    Preconditioner with ``loc`` (d,), ``scale`` (d, d) lower triangular or (d,), the chosen
    Gaussian's ELBO and its iterate index. When no iterate gives a finite ELBO, the start
    point with unit scale is returned (``elbo = -inf``).
    """
    x0 = jnp.asarray(x0)
    d = x0.shape[0]
    dense = d <= dense_max_dim if dense is None else dense
    k_draw, k_probe = jr.split(key)
    eps = jr.normal(k_draw, (num_draws, d), dtype=x0.dtype)
    path = _lbfgs_path(potential, x0, num_steps)

    def score(x):
        if dense:
            scale = _dense_scale(potential, x, curvature_floor)
            z = x + eps @ scale.T
            log_det = jnp.sum(jnp.log(jnp.diagonal(scale)))
        else:
            scale = _diag_scale(potential, x, k_probe, num_probes, curvature_floor)
            z = x + eps * scale
            log_det = jnp.sum(jnp.log(scale))
        energy = jax.vmap(potential)(z)
        log_q = -0.5 * jnp.sum(eps**2, axis=-1) - log_det - 0.5 * d * jnp.log(2.0 * jnp.pi)
        log_w = -energy - log_q
        if objective == "elbo":
            elbo = jnp.mean(log_w)
        else:  # importance-weighted bound over the draws
            elbo = jax.nn.logsumexp(log_w) - jnp.log(num_draws)
        ok = jnp.isfinite(elbo) & jnp.all(jnp.isfinite(scale))
        return jnp.where(ok, elbo, -jnp.inf), scale

    elbos, scales = jax.lax.map(score, path)
    best = jnp.argmax(elbos)
    found = jnp.isfinite(elbos[best])
    unit = jnp.eye(d, dtype=x0.dtype) if dense else jnp.ones(d, dtype=x0.dtype)
    loc = jnp.where(found, path[best], x0)
    scale = scales[best]
    if widen:
        # Add the start point's covariance: never narrower than the curvature at the start.
        start_ok = jnp.isfinite(elbos[0])
        start = jnp.where(start_ok, scales[0], jnp.zeros_like(scales[0]))
        if dense:
            cov = scale @ scale.T + start @ start.T
            scale = jnp.linalg.cholesky(cov + 1e-10 * jnp.max(jnp.diagonal(cov)) * jnp.eye(d))
        else:
            scale = jnp.sqrt(scale**2 + start**2)
    scale = jnp.where(found, scale, unit)
    return Preconditioner(loc, scale, elbos[best], jnp.where(found, best, 0))
