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

Multi-path start (dense mode). One L-BFGS path settles in one basin, so on a multimodal
posterior the chosen Gaussian is a narrow one at a single mode, and every guide trained
from it in its whitened coordinates stays there or fails: on the ring of 8 Gaussians of the
benchmarks (sd 0.5, radius 5) AutoKSIVI covered 1 mode of 8, AutoSIVI 2, and AutoUIVI's loss
overflowed at step 215. So ``num_paths - 1 = 15`` further paths start from a box of
half-width ``start_radius = 2`` around ``x0`` (numpyro's and Stan's initialisation radius).
The end of each path counts only when it is a proper local optimum that competes with the
best Gaussian found:

* converged: positive definite Hessian, and a Newton step shorter than ``newton_tol = 0.1``
  of its own sds (a path sliding along a ridge or down a funnel fails this);
* competitive: its Laplace Gaussian's ELBO within ``basin_gap = 4`` nats of the best ELBO
  found, the first path's chosen Gaussian included. This keeps hierarchical models out:
  at their end points (the MAP) the Laplace Gaussian is far worse than the first path's
  choice (non-centered eight schools: by 10 nats, banana by 21, funnel-10 by 1e11), and on
  centered eight schools no end point is a proper optimum at all.

The counted optima are merged into basins greedily (best ELBO first): two are distinct when
each lies more than ``basin_separation = 4`` sds from the other in the other's Laplace
Gaussian. With no basin, or one that the first path's Gaussian is within ``basin_gap`` of
-- every unimodal target -- the first path's Gaussian is returned unchanged. With one basin
that it is not (the first path settled in a minor mode), that basin's Laplace Gaussian. With
two or more, the search goes on for ``num_rounds - 1 = 5`` rounds of ``num_paths`` paths
from ``N(m, spread^2 T)``, with ``(m, T)`` the mean and covariance of the basins found so
far and ``spread = 2``, so that it grows to the scale of the modes actually found rather
than to an absolute radius (on the ring the first round finds 3 to 5 adjacent modes; six
rounds find all 8 for 19 keys of 20, and 7 for the other). The result is ``N(m, W # T)``:
the mixture mean (basins weighted by exp(ELBO), a lower bound on each basin's mass) and
the matrix geometric mean of the mean within-basin covariance ``W`` and the mixture
covariance ``T`` (within plus between). The trainable part works in unit-scale whitened
coordinates and has to represent both the basins' width and their spread: with ``T``
itself (sd 3.6 on the ring) a basin is 0.14 whitened sds wide, with ``W`` (sd 0.5) the
basins are 10 sds apart, and ``W # T`` (sd 1.34) puts both equally far from 1 on a log
scale. Measured on the ring (``bayesgen bench --targets ring --methods ksivi,sivi,uivi
--steps 3000 --lr 5e-3``, modes holding >= 2% of 4000 draws; seeds 0 / 1 / 2; defaults
otherwise, noise_dim 10):

=====================  ==========  ==========  =========  ==============
start                  AutoKSIVI   AutoUIVI    AutoSIVI   best of three
=====================  ==========  ==========  =========  ==============
one path (before)      1           diverged    2          2 (seed 0)
``W # T`` (default)    1 / 4 / 8   7 / 6 / 5   2          7 / 6 / 8
``T`` ("moments")      4           diverged    2          4 (seed 0)
``W # T``, noise 2     6 / 8 / 6   3 / 4 / 2   3          6 / 8 / 6
=====================  ==========  ==========  =========  ==============

("diverged": the loss overflowed, at step 215 and 528.) A 2-d mixing noise helps
AutoKSIVI and hurts AutoUIVI, so the default noise dimension is kept.

Cost: on a unimodal target ``num_paths - 1`` further L-BFGS paths and ``num_paths``
Hessians (the first path already takes ``num_steps + 1``), and about 3 s more compilation
on a 2-core CPU; on a multimodal one up to ``num_rounds * num_paths`` paths. Above
``dense_max_dim`` (diagonal mode) there is one path, as before. ``num_paths=1`` turns the
multi-path start off. Posteriors whose modes are copies of one another (label switching in
a mixture model) are widened over the copies too; pass ``num_paths=1`` there.

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

from bayesgen.errors import check_int


class Preconditioner(NamedTuple):
    """A Gaussian N(loc, scale scale^T); ``scale`` is lower triangular (d, d) or a (d,) vector."""

    loc: jax.Array
    scale: jax.Array
    elbo: jax.Array  # Monte Carlo ELBO of the chosen Gaussian (-inf when none was finite)
    iteration: jax.Array  # chosen iterate of the first L-BFGS path (0 = x0; -1 = not from it)
    num_basins: jax.Array | int = 1  # distinct local optima the Gaussian spans


def _lbfgs_scan(potential, x0, num_steps, keep_path):
    """L-BFGS on ``potential`` from x0; stalls at nonfinite steps. Returns the iterates
    (``keep_path``) or the last one."""
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
        return (x, state), (x if keep_path else None)

    (x, _), path = jax.lax.scan(step, (x0, opt.init(x0)), None, length=num_steps)
    return path if keep_path else x


def _lbfgs_path(potential, x0, num_steps):
    """Iterates of L-BFGS on ``potential`` from x0 (x0 included); stalls at nonfinite steps."""
    path = _lbfgs_scan(potential, x0, num_steps, keep_path=True)
    return jnp.concatenate([x0[None], path], axis=0)


def _lbfgs_end(potential, x0, num_steps):
    """The last L-BFGS iterate from x0 (``_lbfgs_path(...)[-1]`` without keeping the path)."""
    return _lbfgs_scan(potential, x0, num_steps, keep_path=False)


def _cholesky(cov):
    d = cov.shape[0]
    return jnp.linalg.cholesky(cov + 1e-10 * jnp.eye(d) * jnp.max(jnp.diagonal(cov)))


def _dense_eigh(potential, x):
    h = jax.hessian(potential)(x)
    h = 0.5 * (h + h.T)
    return jnp.linalg.eigh(h)


def _scale_from_eigh(lam, vec, floor):
    lam = jnp.maximum(jnp.abs(lam), floor)
    cov = (vec / lam) @ vec.T
    cov = 0.5 * (cov + cov.T)
    return _cholesky(cov)


def _dense_scale(potential, x, floor):
    lam, vec = _dense_eigh(potential, x)
    return _scale_from_eigh(lam, vec, floor)


def _diag_scale(potential, x, key, num_probes, floor):
    grad = jax.grad(potential)

    def hvp(v):
        return jax.jvp(grad, (x,), (v,))[1]

    probes = jr.rademacher(key, (num_probes, x.shape[0]), dtype=x.dtype)
    diag = jnp.mean(probes * jax.vmap(hvp)(probes), axis=0)
    return 1.0 / jnp.sqrt(jnp.maximum(jnp.abs(diag), floor))


def _gaussian_bounds(potential, x, scale, eps, dense):
    """Monte Carlo ELBO and IW bound of N(x, scale scale^T) over the draws ``eps``."""
    d = x.shape[0]
    if dense:
        z = x + eps @ scale.T
        log_det = jnp.sum(jnp.log(jnp.diagonal(scale)))
    else:
        z = x + eps * scale
        log_det = jnp.sum(jnp.log(scale))
    energy = jax.vmap(potential)(z)
    log_q = -0.5 * jnp.sum(eps**2, axis=-1) - log_det - 0.5 * d * jnp.log(2.0 * jnp.pi)
    log_w = -energy - log_q
    elbo = jnp.mean(log_w)
    iw = jax.nn.logsumexp(log_w) - jnp.log(eps.shape[0])  # importance-weighted bound
    ok = jnp.isfinite(elbo) & jnp.isfinite(iw) & jnp.all(jnp.isfinite(scale))
    return jnp.where(ok, elbo, -jnp.inf), jnp.where(ok, iw, -jnp.inf)


def _local_optimum(potential, x, eps, floor, newton_tol):
    """Laplace Gaussian at ``x`` and whether ``x`` is a converged, proper local optimum.

    Proper: the Hessian is positive definite (smallest eigenvalue above ``floor``) and the
    Newton step ``H^{-1} g`` is shorter than ``newton_tol`` in the Laplace Gaussian's own sds
    (the Newton decrement ``sqrt(g^T H^{-1} g)``). Returns (scale, elbo, proper).
    """
    lam, vec = _dense_eigh(potential, x)
    g = jax.grad(potential)(x)
    scale = _scale_from_eigh(lam, vec, floor)
    elbo, _ = _gaussian_bounds(potential, x, scale, eps, True)
    decrement = jnp.sqrt(jnp.sum((vec.T @ g) ** 2 / jnp.maximum(jnp.abs(lam), floor)))
    proper = (lam[0] > floor) & (decrement < newton_tol) & jnp.isfinite(elbo)
    proper = proper & jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(scale))
    return scale, elbo, proper


def _distinct_basins(locs, scales, elbos, proper, reference_elbo, gap, separation):
    """Greedy clustering of the proper local optima into distinct basins.

    Candidates are the proper optima whose ELBO is within ``gap`` nats of
    ``reference_elbo``. In order of decreasing ELBO, a candidate opens a new basin when it
    lies more than ``separation`` sds from every basin opened so far, in the metric of the
    basin's Gaussian *and* in its own (so two ends of one basin never count twice). Returns
    a mask of the basins' representatives.
    """
    n = locs.shape[0]
    eligible = proper & (elbos >= reference_elbo - gap)
    order = jnp.argsort(jnp.where(eligible, -elbos, jnp.inf))

    def whitened_dist(scale, delta):  # ||scale^{-1} delta|| for each row of delta
        w = jax.scipy.linalg.solve_triangular(scale, delta.T, lower=True)
        return jnp.sqrt(jnp.sum(w**2, axis=0))

    # dist[i, j]: distance from optimum i to optimum j in the sds of optimum i
    dist = jax.vmap(lambda s, m: whitened_dist(s, locs - m))(scales, locs)
    far = (dist > separation) & (dist.T > separation)

    def body(k, rep):
        i = order[k]
        new = eligible[i] & jnp.all(jnp.where(rep, far[i], True))
        return rep.at[i].set(new)

    return jax.lax.fori_loop(0, n, body, jnp.zeros(n, bool))


def _moment_match(locs, scales, elbos, mask):
    """Moments of the mixture of N(locs_k, scales_k scales_k^T) over ``mask``, weighted by
    exp(ELBO_k) (each ELBO bounds the log mass of its basin): the mean, the mean within-basin
    covariance and the total covariance (within plus between)."""
    top = jnp.max(jnp.where(mask, elbos, -jnp.inf))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.where(mask, jnp.exp(jnp.where(mask, elbos - top, 0.0)), 0.0)
    w = w / jnp.maximum(jnp.sum(w), jnp.finfo(locs.dtype).tiny)
    locs = jnp.where(mask[:, None], locs, 0.0)  # keep nonfinite left-out entries out
    scales = jnp.where(mask[:, None, None], scales, 0.0)
    mean = w @ locs
    delta = locs - mean
    within = jnp.einsum("k,kij,klj->il", w, scales, scales)
    total = within + jnp.einsum("k,ki,kj->ij", w, delta, delta)
    return mean, 0.5 * (within + within.T), 0.5 * (total + total.T)


def _geometric_mean_scale(a, b):
    """Cholesky factor of the matrix geometric mean ``A # B`` of two covariances.

    With ``A = L L^T``, ``A # B = L (L^{-1} B L^{-T})^{1/2} L^T`` (the mean commutes with
    congruences); for commuting matrices it is ``(A B)^{1/2}``.
    """
    la = _cholesky(a)
    c = jax.scipy.linalg.solve_triangular(la, b, lower=True)
    c = jax.scipy.linalg.solve_triangular(la, c.T, lower=True)  # L^{-1} B L^{-T}
    lam, vec = jnp.linalg.eigh(0.5 * (c + c.T))
    root = (vec * jnp.sqrt(jnp.maximum(lam, 0.0))) @ vec.T
    g = la @ root @ la.T
    return _cholesky(0.5 * (g + g.T))


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
    num_paths: int = 16,
    num_rounds: int = 6,
    start_radius: float = 2.0,
    spread: float = 2.0,
    basin_separation: float = 4.0,
    basin_gap: float = 4.0,
    newton_tol: float = 0.1,
    mixture_scale: str = "geometric",
) -> Preconditioner:
    """Best Gaussian along an L-BFGS path on ``potential`` (a function of the flat latent),
    or a Gaussian over several distinct basins when more paths find them.

    Parameters
    ----------
    potential : callable, flat unconstrained latent (d,) -> -log p(x, z) (scalar).
    x0 : (d,) starting point.
    key : PRNG key for the ELBO draws (common random numbers across iterates), probes and
        the starting points of the further paths.
    num_steps : L-BFGS iterations (of every path).
    num_draws : Monte Carlo draws per ELBO estimate.
    dense : full covariance (Cholesky factor) if True, diagonal if False; default
        ``d <= dense_max_dim``.
    num_probes : Rademacher probes for the diagonal-Hessian estimate (diagonal mode).
    curvature_floor : smallest curvature kept (eigenvalue or diagonal entry).
    objective : how an iterate's Gaussian is chosen. ``"elbo"`` (default): the best Monte
        Carlo ELBO (mode-seeking: on a funnel it picks the neck). ``"iw"``: the best
        importance-weighted bound over the draws (mass-covering, but nearly flat in the
        location and prone to picking too-wide Gaussians; see the module docstring).
    num_paths : L-BFGS paths per round of the multi-path start (dense mode only; 1 turns it
        off: one path from ``x0``, the behaviour before it existed). See the module
        docstring.
    num_rounds : rounds of the multi-path start. Round 0 runs ``num_paths - 1`` paths from
        ``x0 + uniform(-start_radius, start_radius)`` beside the path from ``x0``; the later
        rounds run only once two or more distinct basins are known, each with
        ``num_paths`` paths from ``N(m, spread^2 T)`` where ``(m, T)`` are the mean and
        covariance of the basins found so far.
    start_radius : half-width of round 0's uniform box around ``x0`` (numpyro's and Stan's
        initialisation radius, 2, by default).
    spread : how much wider than the basins found so far the next round's starts are.
    basin_separation : two local optima are distinct basins only when each lies more than
        this many sds from the other in the other's Laplace Gaussian.
    basin_gap : a local optimum counts only when its Laplace Gaussian's ELBO is within this
        many nats of the best ELBO found (first path's chosen Gaussian included).
    newton_tol : a path's end is a converged local optimum only when its Hessian is positive
        definite (smallest eigenvalue above ``curvature_floor``) and its Newton step is
        shorter than this many of its own sds.
    mixture_scale : the covariance returned over two or more basins: ``"geometric"``
        (default) the matrix geometric mean ``W # T`` of the mean within-basin covariance
        and the mixture covariance; ``"moments"`` the mixture covariance ``T`` itself.

    Returns
    -------
    Preconditioner with ``loc`` (d,), ``scale`` (d, d) lower triangular or (d,), the chosen
    Gaussian's ELBO, the first path's chosen iterate index (``-1`` when the result is not
    the first path's Gaussian) and ``num_basins``, the number of distinct basins it covers
    (1 when it is one Gaussian from one path).
    Draws are antithetic pairs (``num_draws`` rounded up to even), so for a Gaussian target
    the ELBO is exact in the location. When no iterate of the first path gives a finite
    ELBO, the start point with unit scale is returned (``elbo = -inf``).
    """
    x0 = jnp.asarray(x0)
    d = x0.shape[0]
    dense = d <= dense_max_dim if dense is None else dense
    k_draw, k_probe = jr.split(key)
    if objective not in ("elbo", "iw"):
        raise ValueError(f"objective must be 'elbo' or 'iw', got {objective!r}")
    if mixture_scale not in ("geometric", "moments"):
        raise ValueError(
            f"mixture_scale must be 'geometric' or 'moments', got {mixture_scale!r}")
    check_int("num_paths", num_paths)
    check_int("num_rounds", num_rounds)
    half = jr.normal(k_draw, ((num_draws + 1) // 2, d), dtype=x0.dtype)
    eps = jnp.concatenate([half, -half])  # antithetic: a Gaussian target's ELBO is exact in loc
    path = _lbfgs_path(potential, x0, num_steps)

    def score(x):
        if dense:
            scale = _dense_scale(potential, x, curvature_floor)
        else:
            scale = _diag_scale(potential, x, k_probe, num_probes, curvature_floor)
        elbo, iw = _gaussian_bounds(potential, x, scale, eps, dense)
        return elbo, iw, scale

    elbos, iws, scales = jax.lax.map(score, path)
    best = jnp.argmax(elbos if objective == "elbo" else iws)
    found = jnp.isfinite(elbos[best])
    unit = jnp.eye(d, dtype=x0.dtype) if dense else jnp.ones(d, dtype=x0.dtype)
    loc = jnp.where(found, path[best], x0)
    scale = jnp.where(found, scales[best], unit)
    iteration = jnp.where(found, best, 0)
    single = Preconditioner(loc, scale, elbos[best], iteration, jnp.ones((), jnp.int32))
    if not dense or num_paths == 1:
        return single
    return _multi_path(
        potential, x0, jr.fold_in(key, 1), single, eps, num_steps=num_steps,
        num_paths=num_paths, num_rounds=num_rounds, start_radius=start_radius, spread=spread,
        separation=basin_separation, gap=basin_gap, floor=curvature_floor,
        newton_tol=newton_tol, mixture_scale=mixture_scale,
    )


def _multi_path(potential, x0, key, single, eps, *, num_steps, num_paths, num_rounds,
                start_radius, spread, separation, gap, floor, newton_tol, mixture_scale):
    """The multi-path start of :func:`find_preconditioner` (dense mode)."""
    d = x0.shape[0]
    p = num_paths
    k_start, k_rounds = jr.split(key)
    box = start_radius * jr.uniform(k_start, (p - 1, d), x0.dtype, -1.0, 1.0)
    starts0 = jnp.concatenate([x0[None], x0 + box])  # round 0: x0 and a box around it
    n = num_rounds * p
    carry = (jnp.zeros((n, d), x0.dtype),  # ends of the paths
             jnp.broadcast_to(jnp.eye(d, dtype=x0.dtype), (n, d, d)),  # their Laplace scales
             jnp.full(n, -jnp.inf, x0.dtype),  # their Laplace ELBOs
             jnp.zeros(n, bool))  # whether each is a proper local optimum

    def basins(locs, scales, elbos, proper):
        reference = jnp.maximum(single.elbo, jnp.max(jnp.where(proper, elbos, -jnp.inf)))
        rep = _distinct_basins(locs, scales, elbos, proper, reference, gap, separation)
        return rep, reference

    def one_round(r, carry):
        locs, scales, elbos, proper = carry
        rep, _ = basins(locs, scales, elbos, proper)

        def explore(_):
            mean, _, total = _moment_match(locs, scales, elbos, rep)
            wide = jr.normal(jr.fold_in(k_rounds, r), (p, d), x0.dtype) @ _cholesky(total).T
            starts = jnp.where(r == 0, starts0, mean + spread * wide)
            # one path after another (lax.map): a vmapped L-BFGS line search compiles ~4x
            # slower, and the paths are cheap next to the first path's Hessians
            ends = jax.lax.map(lambda s: _lbfgs_end(potential, s, num_steps), starts)
            optima = jax.lax.map(
                lambda x: _local_optimum(potential, x, eps, floor, newton_tol), ends)
            return (ends, *optima)

        def skip(_):
            return (jnp.zeros((p, d), x0.dtype),
                    jnp.broadcast_to(jnp.eye(d, dtype=x0.dtype), (p, d, d)),
                    jnp.full(p, -jnp.inf, x0.dtype), jnp.zeros(p, bool))

        # further rounds only once the target has shown two basins
        new = jax.lax.cond((r == 0) | (jnp.sum(rep) >= 2), explore, skip, None)
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, b, r * p, axis=0)
                     for a, b in zip(carry, new, strict=True))

    locs, scales, elbos, proper = jax.lax.fori_loop(0, num_rounds, one_round, carry)
    rep, reference = basins(locs, scales, elbos, proper)
    num_basins = jnp.sum(rep).astype(jnp.int32)
    mean, within, total = _moment_match(locs, scales, elbos, rep)
    if mixture_scale == "geometric":
        mix_scale = _geometric_mean_scale(within, total)
    else:
        mix_scale = _cholesky(total)
    mix_elbo, _ = _gaussian_bounds(potential, mean, mix_scale, eps, True)
    widen = (num_basins >= 2) & jnp.isfinite(mix_elbo) & jnp.all(jnp.isfinite(mix_scale))
    widen = widen & jnp.all(jnp.isfinite(mean))
    # one basin that the first path missed, and the first path's Gaussian is not within the
    # gap of it (the first path settled in a minor mode): that basin's Laplace Gaussian
    top = jnp.argmax(jnp.where(rep, elbos, -jnp.inf))
    replace = (num_basins == 1) & (single.elbo < reference - gap)
    loc = jnp.where(replace, locs[top], single.loc)
    scale = jnp.where(replace, scales[top], single.scale)
    elbo = jnp.where(replace, elbos[top], single.elbo)
    iteration = jnp.where(replace, -1, single.iteration)
    return Preconditioner(
        jnp.where(widen, mean, loc),
        jnp.where(widen, mix_scale, scale),
        jnp.where(widen, mix_elbo, elbo),
        jnp.where(widen, -1, iteration),
        jnp.where(widen, num_basins, 1),
    )
