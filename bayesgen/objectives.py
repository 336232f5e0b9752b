"""Losses beyond ``Trace_ELBO``: a batched ELBO and score-based objectives for semi-implicit families.

:class:`BatchedELBO` is ``Trace_ELBO`` for bayesgen's flat-latent guides with every particle
drawn in one call of the family. For a SIVI family that shares one set of K fresh mixing
draws among the particles (the authors' scheme), so a step costs K + S mixing-network passes
where ``Trace_ELBO(S)`` pays S (K + 1); each particle's term is still the SIVI bound, so the
loss is the same lower bound in expectation. It is AutoSIVI's default loss.

The score-based objectives below
Both score-based objectives measure how far the family's score is from the target's, and both avoid
the intractable marginal score ``grad log q(w)`` of a semi-implicit family

    eps ~ N(0, I_m),   w | eps ~ N(mu(eps), diag sigma(eps)^2),   z = m0 + L0 w,

by substituting the conditional score ``grad_w log q(w | eps)`` inside an expectation over
the joint ``(eps, w)``, where it is unbiased: ``E[grad_w log q(w | eps) | w] = grad_w log q(w)``.
Neither gives a value of log q, so ELBO, PSIS k-hat and evidence estimates still come from
the family's extended-space density (:func:`bayesgen.diagnose`).

Everything runs in the whitened coordinates ``w`` of the guide's fixed preconditioner. The
target score there is ``s_p(w) = L0^T grad_z log p(x, z)``. Both discrepancies weigh every
coordinate alike, and the kernel's median-heuristic bandwidth is one number for all
coordinates: in z coordinates of a posterior whose sds span 1e-2 .. 1e1 the kernel would see
only the widest coordinate and the Fisher divergence only the narrowest; whitening makes
the coordinates comparable.

The losses are numpyro loss objects: pass them to ``numpyro.infer.SVI(model, guide, optim,
loss)`` as you would ``Trace_ELBO``. :class:`KernelSteinLoss` is KSIVI, with a closed-form
inner problem; :class:`ScoreMatchingLoss` is SIVI-SM, whose critic network lives in the
guide's numpyro mutable state (:class:`~bayesgen.guides.score_based.AutoSIVISM`) and is
trained inside each SVI step.

Target-score annealing (optional, off by default)
    ``s_p <- beta_t s_p`` with ``beta_t = min(1, beta_0 + (1 - beta_0) t / T)``: the family
    first fits the tempered target ``p^beta`` (flatter, modes merged) and then sharpens,
    which keeps score-based fits from locking onto the modes nearest the start. ``t`` is a
    step counter held in the guide's mutable state (the authors' code does the same with
    ``beta_0 = 0.1``).

References
----------
Yu & Zhang, "Semi-implicit variational inference via score matching", ICLR 2023.
Cheng, Yu, Xie, Zhang & Zhang, "Kernel semi-implicit variational inference", ICML 2024.
Liu, Lee & Jordan, "A kernelized Stein discrepancy for goodness-of-fit tests", ICML 2016.
Gorham & Mackey, "Measuring sample quality with kernels", ICML 2017 (the IMQ kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from numpyro.infer.elbo import ELBO

from bayesgen.errors import check_int, check_positive
from bayesgen.guides.base import ModelDensityGuide, PreconditionedGuide

__all__ = [
    "BatchedELBO",
    "CriticState",
    "KernelSteinLoss",
    "ScoreMatchingLoss",
    "annealing_factor",
    "critic_update",
    "fisher_critic_value",
    "kernel_matrix",
    "kernel_stein_discrepancy",
    "median_bandwidth",
    "pairwise_sq_distances",
    "whitened_residuals",
]

KERNELS = ("imq", "gaussian")
STATISTICS = ("u", "v")


# --------------------------------------------------------------------------- pure pieces


def pairwise_sq_distances(x, y):
    """``D_ij = ||x_i - y_j||^2`` for ``x`` (n, d) and ``y`` (m, d), via the Gram matrix."""
    sq = jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(sq, 0.0)


def median_bandwidth(sq_dists, num_points: int, *, exclude_diagonal: bool = False):
    """Median heuristic ``h = median(D) / log(n + 1)``, gradient stopped.

    ``exclude_diagonal`` drops the zero self-distances of a one-batch matrix (only the
    entries above the diagonal enter the median).
    """
    if exclude_diagonal:
        rows, cols = jnp.triu_indices(sq_dists.shape[0], k=1)
        values = sq_dists[rows, cols]
    else:
        values = sq_dists.reshape(-1)
    h = jnp.median(values) / math.log(num_points + 1.0)
    return jax.lax.stop_gradient(jnp.maximum(h, 1e-12))


def kernel_matrix(sq_dists, bandwidth, kernel: str = "imq"):
    """Kernel values from squared distances ``D`` and bandwidth ``h``.

    ``"imq"``: ``k = (1 + D / h)^(-1/2)`` (inverse multiquadric; its KSD detects
    non-convergence, Gorham & Mackey 2017). ``"gaussian"``: ``k = exp(-D / h)`` (the
    authors' ``exp(-r^2 / (2 s^2))`` with ``s^2 = h / 2``).
    """
    if kernel == "imq":
        return jax.lax.rsqrt(1.0 + sq_dists / bandwidth)
    if kernel == "gaussian":
        return jnp.exp(-sq_dists / bandwidth)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def annealing_factor(step, anneal_steps: int, start: float = 0.1):
    """``beta_t = min(1, beta_0 + (1 - beta_0) t / T)``; 1 when ``anneal_steps`` T is 0."""
    if not anneal_steps:
        return jnp.asarray(1.0)
    t = jnp.asarray(step, jnp.result_type(float))
    return jnp.minimum(1.0, start + (1.0 - start) * t / anneal_steps)


def whitened_residuals(key, family, score_z: Callable, num_particles: int, target_scale=1.0):
    """Draw ``B`` particles and their residuals ``r = beta s_p(w) - grad_w log q(w | eps)``.

    Parameters
    ----------
    key : jax random key.
    family : a semi-implicit family (has ``sample_with_conditional_score`` and
        ``whiten_score``).
    score_z : ``z (B, d) -> grad_z log p(x, z) (B, d)``, the target score in the model's
        flat unconstrained coordinates.
    num_particles : B.
    target_scale : beta, the annealing factor on the target score.

    Returns
    -------
    w : (B, d) whitened draws (reparameterised).
    residual : (B, d), ``beta L0^T s_p(z) - score_w``.
    """
    z, w, score_w, _ = family.sample_with_conditional_score(key, (num_particles,))
    s_p = family.whiten_score(score_z(z))
    return w, target_scale * s_p - score_w


def kernel_stein_discrepancy(
    key,
    family,
    score_z: Callable,
    num_particles: int,
    *,
    kernel: str = "imq",
    statistic: str = "u",
    bandwidth=None,
    target_scale=1.0,
):
    """Monte Carlo estimate of the squared kernel Stein discrepancy KSD^2(q || p).

    With ``r(w, eps) = s_p(w) - grad_w log q(w | eps)`` and independent pairs,

        KSD^2 = E_{(eps, w), (eps', w')} [ k(w, w') r(w, eps)^T r(w', eps') ]

    (Cheng et al. 2024): each conditional score may replace the marginal score because the
    two draws are independent. ``statistic="u"`` averages over the ``B (B - 1)`` ordered
    pairs ``i != j`` of one batch; ``"v"`` over all ``B^2`` pairs of two independent
    batches (the authors' default; 2B target scores). Both are unbiased for a fixed
    bandwidth (the median heuristic's dependence on the batch is an O(1/B) effect).
    Gradients flow through ``w`` (in ``s_p`` and the kernel) and the conditional score; the
    median-heuristic bandwidth (:func:`median_bandwidth`) is a constant. ``bandwidth``
    fixes ``h`` instead (whitened squared units).
    """
    if statistic == "u":
        w, r = whitened_residuals(key, family, score_z, num_particles, target_scale)
        sq = pairwise_sq_distances(w, w)
        h = median_bandwidth(sq, num_particles, exclude_diagonal=True) if bandwidth is None \
            else bandwidth
        terms = kernel_matrix(sq, h, kernel) * (r @ r.T)
        off_diagonal = 1.0 - jnp.eye(num_particles, dtype=terms.dtype)
        return jnp.sum(terms * off_diagonal) / (num_particles * (num_particles - 1))
    if statistic == "v":
        k1, k2 = jr.split(key)
        w1, r1 = whitened_residuals(k1, family, score_z, num_particles, target_scale)
        w2, r2 = whitened_residuals(k2, family, score_z, num_particles, target_scale)
        sq = pairwise_sq_distances(w1, w2)
        h = median_bandwidth(sq, num_particles) if bandwidth is None else bandwidth
        return jnp.mean(kernel_matrix(sq, h, kernel) * (r1 @ r2.T))
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def fisher_critic_value(f, residual):
    """``mean_i [2 f_i^T r_i - ||f_i||^2]``, the SIVI-SM objective at critic outputs ``f``.

    Since ``||a||^2 = max_f (2 f^T a - ||f||^2)``, its expectation over the joint
    ``(eps, w)`` is at most the Fisher divergence ``E_q ||s_p - s_q||^2`` for every critic
    and equal to it at ``f* = s_p - s_q`` (Yu & Zhang 2023): the conditional score in
    ``r`` may replace the marginal one because ``f`` depends on ``w`` only.
    """
    return jnp.mean(2.0 * jnp.sum(f * residual, -1) - jnp.sum(f * f, -1))


class CriticState(NamedTuple):
    """SIVI-SM's inner state: the critic's parameters, its optax state and the step count."""

    params: Any
    opt_state: Any
    step: jax.Array


def critic_update(
    key,
    state: CriticState,
    family,
    score_z: Callable,
    critic_apply: Callable,
    optimizer: optax.GradientTransformation,
    *,
    num_particles: int,
    num_steps: int,
    target_scale=1.0,
):
    """``num_steps`` ascent steps on the critic, each on a fresh batch; the family is frozen.

    Maximises :func:`fisher_critic_value` over the critic parameters ``psi`` with
    ``optimizer``. The ``num_steps`` batches are drawn at once (one batch of
    ``num_steps * B`` independent particles, split) and stop-gradient'ed, so nothing flows
    back to the family and the scan over steps closes over no differentiated value. Returns the new ``(params, opt_state)``
    and the objective before each step.
    """
    w, r = whitened_residuals(key, family, score_z, num_steps * num_particles, target_scale)
    batches = jax.lax.stop_gradient(
        (w.reshape(num_steps, num_particles, -1), r.reshape(num_steps, num_particles, -1))
    )

    def step(carry, batch):
        params, opt_state = carry
        w, r = batch

        def negative_value(p):
            return -fisher_critic_value(critic_apply(p, w), r)

        value, grads = jax.value_and_grad(negative_value)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), -value

    (params, opt_state), values = jax.lax.scan(
        step, jax.lax.stop_gradient((state.params, state.opt_state)), batches
    )
    return params, opt_state, values


# --------------------------------------------------------------------------- guide plumbing


def _check_anneal(anneal_steps, anneal_start):
    check_int("anneal_steps", anneal_steps, minimum=0)
    if not 0.0 <= anneal_start <= 1.0:
        raise ValueError(f"anneal_start must be in [0, 1], got {anneal_start!r}")


def _not_semi_implicit(loss_name, guide):
    return TypeError(
        f"{loss_name} needs a semi-implicit bayesgen guide (AutoKSIVI, AutoSIVISM, AutoSIVI or "
        "AutoUIVI): it draws from the guide's family with sample_with_conditional_score, "
        f"which {getattr(type(guide), '__name__', repr(guide))} does not provide."
    )


def _require_set_up(loss_name, guide):
    if guide.prototype_trace is None:
        raise RuntimeError(
            f"{loss_name}: the guide {type(guide).__name__} has not been set up yet; run "
            "svi.init(key, *args) (or the guide once) before evaluating the loss."
        )


def semi_implicit_family(loss_name, param_map, guide):
    """The guide's semi-implicit family at ``param_map``; a clear error for other guides."""
    if not isinstance(guide, PreconditionedGuide):
        raise _not_semi_implicit(loss_name, guide)
    _require_set_up(loss_name, guide)
    family = guide.get_posterior(param_map)
    if not (hasattr(family, "sample_with_conditional_score") and hasattr(family, "whiten_score")):
        raise _not_semi_implicit(loss_name, guide)
    return family


def target_score(guide, param_map, args, kwargs) -> Callable:
    """``z (B, d) -> grad_z log p(x, z)`` on the flat unconstrained latent (Jacobians included)."""
    return jax.vmap(jax.grad(guide.flat_log_joint(param_map, args, kwargs)))


# --------------------------------------------------------------------------- losses


class BatchedELBO(ELBO):
    """Negative ELBO of a bayesgen flat-latent guide with all particles from one family call.

    ``loss = -(1/S) sum_s [log p(x, z_s) - log q~(z_s)]`` with ``z_1..S`` and their surrogates
    ``log q~`` (the family's ``log_prob`` with intermediates: exact for flows, the SIVI bound
    for semi-implicit families, UIVI's gradient surrogate) from one
    ``family.sample_with_intermediates(key, (S,))``, and ``log p(x, z)`` the model's joint
    density on the flat unconstrained latent (Jacobians included). Its value and gradient have
    the expectation of ``Trace_ELBO(S)``'s; the particles may share randomness inside the
    family, which is what makes it cheaper for SIVI: one set of K fresh mixing draws serves
    the whole batch, K + S network passes per step instead of S (K + 1).

    Parameters
    ----------
    num_particles : int, default 1
        S, the draws per step.
    """

    def __init__(self, num_particles: int = 1):
        check_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The loss (no mutable state: guides that keep one need their own loss)."""
        name = type(self).__name__
        if not isinstance(guide, PreconditionedGuide):
            raise TypeError(
                f"{name} needs a bayesgen flat-latent guide (AutoSIVI, AutoUIVI, AutoFlow, ...), "
                f"got {getattr(type(guide), '__name__', repr(guide))}; use numpyro's Trace_ELBO "
                "for other guides."
            )
        if isinstance(guide, ModelDensityGuide):
            raise TypeError(
                f"{name} cannot train {type(guide).__name__}: its family evaluates the model "
                "with the arguments of the guide's own call, which this loss does not make; "
                "use numpyro's Trace_ELBO."
            )
        _require_set_up(name, guide)
        if getattr(guide, "critic_site", None) or getattr(guide, "step_site", None):
            raise TypeError(
                f"{name} cannot train {type(guide).__name__}, which keeps mutable state for its "
                "own loss; use guide.default_loss(num_particles)."
            )
        family = guide.get_posterior(param_map)
        z, intermediates = family.sample_with_intermediates(rng_key, (self.num_particles,))
        log_q = family.log_prob(z, intermediates)
        log_p = jax.vmap(guide.flat_log_joint(param_map, args, kwargs))(z)
        return {"loss": -jnp.mean(log_p - log_q), "mutable_state": None}


class KernelSteinLoss(ELBO):
    """Kernel semi-implicit VI (KSIVI): minimise the kernel Stein discrepancy KSD^2(q || p).

    The loss is :func:`kernel_stein_discrepancy` of the guide's semi-implicit family against
    the model's posterior, in the preconditioner's whitened coordinates (module docstring).
    Restricting the SIVI-SM critic to the unit ball of an RKHS gives the inner maximum in
    closed form, so there is no inner network and no minimax. Per step: B target scores
    (2B for ``statistic="v"``) and O(B^2 d) kernel work.

    Parameters
    ----------
    num_particles : int, default 128
        B, the particles of one batch (a U-statistic needs B >= 2; KSD estimates from a few
        particles are too noisy to train on, so use at least 64).
    kernel : ``"imq"`` (default) or ``"gaussian"``.
    statistic : ``"u"`` (default: one batch, pairs ``i != j``) or ``"v"`` (two independent
        batches, all pairs; the authors' choice).
    bandwidth : float, optional
        Fixed kernel bandwidth ``h`` (whitened squared units); default the median heuristic.
    anneal_steps : int, default 0
        Target-score annealing over this many steps (0: off). Needs a step counter in the
        guide's mutable state: ``AutoKSIVI(model, anneal_steps=T)`` declares one.
    anneal_start : float, default 0.1
        beta_0 of the annealing schedule.

    References
    ----------
    Cheng, Yu, Xie, Zhang & Zhang, "Kernel semi-implicit variational inference", ICML 2024.
    """

    def __init__(
        self,
        num_particles: int = 128,
        kernel: str = "imq",
        statistic: str = "u",
        *,
        bandwidth: float | None = None,
        anneal_steps: int = 0,
        anneal_start: float = 0.1,
    ):
        check_int("num_particles", num_particles, minimum=2)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        check_positive("bandwidth", bandwidth, allow_none=True)
        _check_anneal(anneal_steps, anneal_start)
        super().__init__(num_particles=num_particles)
        self.kernel = kernel
        self.statistic = statistic
        self.bandwidth = bandwidth
        self.anneal_steps = anneal_steps
        self.anneal_start = float(anneal_start)

    def _value(self, rng_key, param_map, guide, args, kwargs, step):
        family = semi_implicit_family(type(self).__name__, param_map, guide)
        beta = annealing_factor(step, self.anneal_steps, self.anneal_start)
        return kernel_stein_discrepancy(
            rng_key, family, target_score(guide, param_map, args, kwargs), self.num_particles,
            kernel=self.kernel, statistic=self.statistic, bandwidth=self.bandwidth,
            target_scale=beta,
        )

    def _step_site(self, guide, param_map):
        site = getattr(guide, "step_site", None)
        if site is None or site not in param_map:
            return None
        return site

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """KSD^2 estimate (with the guide's step counter when it is in ``param_map``)."""
        site = self._step_site(guide, param_map)
        if self.anneal_steps and site is None:
            raise ValueError(
                f"KernelSteinLoss(anneal_steps={self.anneal_steps}) needs the step counter in "
                "the guide's mutable state: build the guide as AutoKSIVI(model, "
                f"anneal_steps={self.anneal_steps}) and train with numpyro's SVI, which passes "
                "the mutable state to the loss (or set anneal_steps=0)."
            )
        step = param_map[site] if site is not None else 0
        return self._value(rng_key, param_map, guide, args, kwargs, step)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """As :meth:`loss`, and advance the guide's step counter when it has one.

        Other known mutable sites of the guide (an AutoSIVISM critic) pass through unchanged,
        so the SVI state keeps its structure.
        """
        value = self.loss(rng_key, param_map, model, guide, *args, **kwargs)
        mutable = {
            name: param_map[name]
            for name in (getattr(guide, "critic_site", None),)
            if name is not None and name in param_map
        }
        site = self._step_site(guide, param_map)
        if site is not None:
            mutable[site] = param_map[site] + 1
        return {"loss": value, "mutable_state": mutable or None}


class ScoreMatchingLoss(ELBO):
    """SIVI-SM: minimise the Fisher divergence through its variational (critic) form.

    ``min_phi max_psi E_{(eps, w) ~ q_phi} [2 f_psi(w)^T (s_p(w) - grad_w log q_phi(w | eps))
    - ||f_psi(w)||^2]`` (:func:`fisher_critic_value`), in whitened coordinates. The critic
    ``f_psi`` and its optimiser state live in the guide's numpyro mutable state (a
    :class:`CriticState` at ``guide.critic_site``). Each SVI step runs the paper's
    alternation: ``critic_steps`` ascent steps on ``psi`` (each on a fresh batch, the family
    frozen, with the guide's critic optimiser, whose learning rate should be at least the
    family's), then returns the family's objective at the updated critic, with gradients
    through ``w`` (into ``s_p``, the conditional score and ``f_psi(w)``, ``psi`` fixed) and
    the new mutable state. The value is the Fisher-divergence estimate at the current
    critic (a lower bound in expectation, tight at ``f* = s_p - s_q``).

    Per step: ``(critic_steps + 1) B`` target scores and as many critic passes.

    Parameters
    ----------
    num_particles : int, default 128
        B, the particles of each batch (critic steps and the family's step alike).
    critic_steps : int, default 1
        Critic updates per SVI step (the paper uses 1).
    anneal_steps : int, default 0
        Target-score annealing over this many steps (0: off); uses the critic's step counter.
    anneal_start : float, default 0.1
        beta_0 of the annealing schedule.

    Use it with :class:`~bayesgen.guides.score_based.AutoSIVISM`, whose ``default_loss``
    builds it. numpyro's ``SVI.update`` passes the mutable state; ``SVI.evaluate`` does not,
    so evaluate with ``loss.loss(key, {**svi.get_params(state), **state.mutable_state},
    model, guide, ...)``.

    References
    ----------
    Yu & Zhang, "Semi-implicit variational inference via score matching", ICLR 2023.
    """

    def __init__(
        self,
        num_particles: int = 128,
        critic_steps: int = 1,
        *,
        anneal_steps: int = 0,
        anneal_start: float = 0.1,
    ):
        check_int("num_particles", num_particles)
        check_int("critic_steps", critic_steps, minimum=0)
        _check_anneal(anneal_steps, anneal_start)
        super().__init__(num_particles=num_particles)
        self.critic_steps = critic_steps
        self.anneal_steps = anneal_steps
        self.anneal_start = float(anneal_start)

    def _critic_state(self, guide, param_map):
        site = getattr(guide, "critic_site", None)
        if site is None or not callable(getattr(guide, "critic_apply", None)):
            raise TypeError(
                "ScoreMatchingLoss needs a guide that carries the SIVI-SM critic: use "
                "bayesgen.guides.AutoSIVISM (its critic network and optimiser state live in "
                f"numpyro mutable state); got {getattr(type(guide), '__name__', repr(guide))}."
            )
        if site not in param_map:
            raise ValueError(
                f"ScoreMatchingLoss needs the critic state '{site}' (the guide's numpyro "
                "mutable state) in the params it is given. numpyro's SVI.update passes it "
                "(it calls loss_with_mutable_state); SVI.evaluate and direct calls do not: pass "
                "{**svi.get_params(state), **state.mutable_state} as the params."
            )
        return site, CriticState(*param_map[site])

    def loss(self, rng_key, param_map, model, guide, *args, **kwargs):
        """The family's objective at the updated critic (needs the critic in ``param_map``)."""
        return self.loss_with_mutable_state(rng_key, param_map, model, guide, *args, **kwargs)[
            "loss"
        ]

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        """Update the critic, then return the family's loss and the new critic state."""
        name = type(self).__name__
        if not isinstance(guide, PreconditionedGuide):
            raise _not_semi_implicit(name, guide)
        site, state = self._critic_state(guide, param_map)
        family = semi_implicit_family(name, param_map, guide)
        score_z = target_score(guide, param_map, args, kwargs)
        beta = annealing_factor(state.step, self.anneal_steps, self.anneal_start)
        k_critic, k_family = jr.split(rng_key)

        params, opt_state = state.params, state.opt_state
        if self.critic_steps:
            params, opt_state, _ = critic_update(
                k_critic, state, family, score_z, guide.critic_apply, guide.critic_optimizer,
                num_particles=self.num_particles, num_steps=self.critic_steps,
                target_scale=beta,
            )
        w, r = whitened_residuals(k_family, family, score_z, self.num_particles, beta)
        f = guide.critic_apply(jax.lax.stop_gradient(params), w)
        value = fisher_critic_value(f, r)
        new_state = CriticState(params, opt_state, state.step + 1)
        return {"loss": value, "mutable_state": {site: new_state}}
