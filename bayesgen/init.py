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
Hutchinson estimate of diag(H_k). Each Gaussian is scored by a Monte Carlo ELBO over
common antithetic draws (pairs eps, -eps: for a Gaussian target the estimate is then exact
in the location), and the best one is returned. Scoring along the path instead of taking the
end point (the Laplace approximation at the MAP) matters for hierarchical models: their MAP
sits at a collapsed scale (tau -> 0) where the Laplace approximation is useless.

Why the ELBO and not the importance-weighted (IW) bound, which is mass-covering and keeps a
funnel's wide start instead of its neck: any consistent estimate of log Z is flat in the
location, and at tens of draws a mislocated or far too wide Gaussian wins by one lucky heavy
weight. On non-centered eight schools the IW choice put log tau at 2.4 +- 1.6, the first
steps overflowed (losses near 1e7) and AutoMAF never recovered; with the ELBO choice every
benchmark target trains (the funnel from its neck too: AutoRealNVP sd(v) 2.54 at 10k steps).
``objective="iw"`` stays available. (Widening the chosen Gaussian by the start point's
covariance was also tried, and broke centered eight schools in the same way.)

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
    objective: str = "elbo",
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
    objective : how an iterate's Gaussian is chosen. ``"elbo"`` (default): the best Monte
        Carlo ELBO (mode-seeking: on a funnel it picks the neck). ``"iw"``: the best
        importance-weighted bound over the draws (mass-covering, but nearly flat in the
        location and prone to picking too-wide Gaussians; see the module docstring).

    Returns
    -------
    Preconditioner with ``loc`` (d,), ``scale`` (d, d) lower triangular or (d,), the chosen
    Gaussian's ELBO and its iterate index. Draws are antithetic pairs (``num_draws`` rounded
    up to even), so for a Gaussian target the ELBO is exact in the location. When no iterate
    gives a finite ELBO, the start point with unit scale is returned (``elbo = -inf``).
    """
    x0 = jnp.asarray(x0)
    d = x0.shape[0]
    dense = d <= dense_max_dim if dense is None else dense
    k_draw, k_probe = jr.split(key)
    if objective not in ("elbo", "iw"):
        raise ValueError(f"objective must be 'elbo' or 'iw', got {objective!r}")
    half = jr.normal(k_draw, ((num_draws + 1) // 2, d), dtype=x0.dtype)
    eps = jnp.concatenate([half, -half])  # antithetic: a Gaussian target's ELBO is exact in loc
    n_eps = eps.shape[0]
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
        elbo = jnp.mean(log_w)
        iw = jax.nn.logsumexp(log_w) - jnp.log(n_eps)  # importance-weighted bound
        ok = jnp.isfinite(elbo) & jnp.isfinite(iw) & jnp.all(jnp.isfinite(scale))
        return jnp.where(ok, elbo, -jnp.inf), jnp.where(ok, iw, -jnp.inf), scale

    elbos, iws, scales = jax.lax.map(score, path)
    best = jnp.argmax(elbos if objective == "elbo" else iws)
    found = jnp.isfinite(elbos[best])
    unit = jnp.eye(d, dtype=x0.dtype) if dense else jnp.ones(d, dtype=x0.dtype)
    loc = jnp.where(found, path[best], x0)
    scale = jnp.where(found, scales[best], unit)
    return Preconditioner(loc, scale, elbos[best], jnp.where(found, best, 0))
