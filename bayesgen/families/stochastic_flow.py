"""Stochastic normalizing flows: invertible layers interleaved with Langevin or MALA steps.

In the whitened coordinates ``u`` of a fixed preconditioner (``z = m0 + L0 u``) a draw is the
end of a path that starts at ``y_0 ~ N(0, I)``, passes an optional invertible layer, runs
through ``B`` blocks, then ``F`` final steps, and passes an optional final invertible layer
``T``. Block ``b`` applies an invertible layer ``f_b`` (RealNVP couplings, an affine map, or
nothing), then ``K`` stochastic steps that target the intermediate energy

    u_b(v) = (1 - lambda_b) |v|^2 / 2 + lambda_b u_target(v),
    u_target(v) = -log p(x, m0 + L0 T(v)) - log|det dT/dv|     (T = identity if absent)

(the posterior pulled back through ``T``, up to the constant ``log|det L0|``), with
``0 <= lambda_1 <= ... <= lambda_B = 1`` (a fixed linear schedule ``lambda_b = b / B`` by
default, or learned through monotone increments). A stochastic step is overdamped Langevin
dynamics with a learned, positive, per-coordinate step ``eps_b``,

    y = x + eps F(x) + sqrt(2 eps) eta,    F = -grad u_b,    eta ~ N(0, I),

optionally followed by a Metropolis accept/reject for ``exp(-u_b)`` (MALA). The final steps
target ``u_target`` itself (``lambda = 1``) with the last block's step size.

Two layouts use this: the paper's, with layers between the blocks and no ``T``; and the
"latent" one, with every step before ``T`` (the whole flow), in coordinates where a good flow
makes the target close to N(0, I) and one step size suits the whole space (NeuTra-style
preconditioning, Hoffman et al. 2019); see :mod:`bayesgen.guides.stochastic_flow`.

Path weight (Wu, Koehler & Noe, 2020; ../shared/METHODS.md s. 5e)
    ``q(y_T)`` has no closed form; on path space, with the backward kernels ``q~_t`` that
    run the path from its end back to ``y_0``, each layer contributes

        Delta S_t = log q~_t(y_t -> y_{t-1}) - log q_t(y_{t-1} -> y_t):

    * an invertible layer: ``log|det df/dy|`` (the path is a function of its start);
    * a Langevin step: the backward kernel is the same Langevin step taken from ``y``,
      ``x = y + eps F(y) + sqrt(2 eps) eta~``, and the Gaussian normalisers cancel:
      ``Delta S = (|eta|^2 - |eta~|^2) / 2`` with ``eta~ = (x - y - eps F(y)) / sqrt(2 eps)``;
    * a MALA step: its kernel is in detailed balance with ``exp(-u_b)`` and is its own
      backward kernel, so ``Delta S = u_b(y) - u_b(x)`` (zero on rejection).

    The family's ``log_prob`` surrogate of a draw is

        log q(path) - log r(path | z) = log N(y_0; 0, I) - sum_t Delta S_t - log|det L0|,

    and ``exp(log p(x, z) - surrogate)`` is the SNF importance weight
    ``exp(-u_target(end) + u_prior(y_0) + sum Delta S)`` (up to the prior's normaliser): its
    expectation is exactly ``p(x)`` for every layer, energy and step size, so
    ``E[log p(x, z) - surrogate] <= log p(x)`` (a *lower-bound surrogate*) and
    ``log_importance_density`` returns the same term. With no stochastic steps the family is
    an ordinary flow and the surrogate is its exact log-density.

Gradients are reparameterised through the start, the Langevin noise, the layers and the
model's score at every step (so a step costs one model gradient forward and a Hessian-vector
product backward). A MALA accept/reject decision carries no gradient (its indicator is a
stopped constant); accepted proposals stay reparameterised. That estimator is biased for
MALA (the decision's dependence on the parameters is dropped), as in the reference code; the
Langevin estimator is unbiased. A MALA proposal where the target or its score overflows is
rejected, and the target is then differentiated at the current state instead (a check
without gradients comes first), since differentiating it at the rejected proposal would
give ``0 * inf = nan`` in the backward pass.

MALA steps at ``lambda = 1`` leave the weight unchanged: their Delta S telescope to
``log pi(y_F) - log pi(y_0)``, which cancels against the target term, so the loss and its
gradient do not depend on them. The final steps therefore run without gradients and the
term is added back with their end held fixed; they improve the draws at a forward cost only.

Because every kernel above is used with the same drift in both directions, the weight stays
exact for *any* drift; the target score is therefore soft-clipped per coordinate,
``c tanh(g / c)``, which limits a step where the target is very steep (the neck of a funnel)
without biasing anything.

Backward path and the evidence upper bound
    :meth:`~StochasticNormalizingFlow.reference_log_ratio` runs the path the other way, from
    a latent ``z`` (whitened) back to a start ``y_0``: the inverse of ``T``, the final steps,
    then per block, last first, its K steps with the backward kernels ``q~_t`` (MALA: the
    same MALA kernel at ``lambda_b``; Langevin: the step with the backward drift, the
    energy's minus the control) and the inverse of ``f_b``, then the initial layer's inverse.
    Its value is the forward surrogate of that path, ``log N(y_0; 0, I) - sum_t Delta S_t -
    log|det L0|`` with the same Delta S (a layer's log|det| is minus its inverse's; final
    MALA steps telescope to the same term): :meth:`~StochasticNormalizingFlow.reverse_path`
    also returns the noises with which :meth:`~StochasticNormalizingFlow.path` retraces the
    path forward, to the same value. With ``z`` from the posterior the backward path has law
    ``B = p(z | x) prod_t q~_t``, and ``w = exp(log p(x, z) - it) = p(x) B / F`` with ``F``
    the forward path law, so

        E_B[log w] = log p(x) + KL(B || F) >= log p(x),    E_B[1 / w] = 1 / p(x):

    the evidence upper bound (EUBO), for benchmarks with exact posterior draws. It needs
    every layer as a :class:`Layer` with an inverse.

References
----------
Wu, Koehler & Noe, "Stochastic normalizing flows", NeurIPS 2020.
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
Roberts & Tweedie, "Exponential convergence of Langevin distributions and their discrete
approximations", Bernoulli 1996 (MALA).
Hoffman, Sountsov, Dillon, Langmore, Tran & Vasudevan, "NeuTra-lizing bad geometry in
Hamiltonian Monte Carlo using neural transport", 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import paramax

from bayesgen.errors import check_int, check_positive
from bayesgen.families.base import (
    Family,
    PathSurrogate,
    WhitenedCoordinates,
    check_latent,
)

_LOG_2PI = math.log(2.0 * math.pi)
_MAX_SCORE = 1e12  # a MALA proposal whose score exceeds this (or overflows) is rejected


def _log_std_normal(u):
    return -0.5 * jnp.sum(u * u + _LOG_2PI, axis=-1)


# --------------------------------------------------------------------------- layers


class Layer:
    """An invertible layer: ``layer(*params, u) -> (f(u), log|det df/du|)`` and
    ``layer.inverse(*params, y) -> (f^{-1}(y), log|det df^{-1}/dy|)``.

    ``params`` is empty for the initial and final layers and a block's slice of
    ``block_params`` for a block layer. The family takes plain callables too (the forward
    map only); those run forward but give no backward path
    (:meth:`StochasticNormalizingFlow.reference_log_ratio`).
    """

    def __init__(self, forward: Callable, inverse: Callable | None = None):
        self.forward = forward
        self.inverse = inverse

    def __call__(self, *args):
        return self.forward(*args)

    def bind(self, params) -> Layer:
        """The layer with its parameters fixed: ``u -> self(params, u)``."""
        inverse = None if self.inverse is None else (lambda y: self.inverse(params, y))
        return Layer(lambda u: self.forward(params, u), inverse)


def _inverse_of(layer) -> Callable | None:
    """``layer.inverse``, or ``None`` for a plain callable."""
    return getattr(layer, "inverse", None)


def require_inverse(layer, name: str) -> Callable:
    """``layer.inverse``; a ``TypeError`` naming ``name`` for a layer without one."""
    inverse = _inverse_of(layer)
    if inverse is None:
        raise TypeError(
            f"the backward path needs the inverse of {name}; give it as a Layer with an "
            "inverse (affine_layer, chain_layers, bijection_block, elementwise_affine_block, "
            "Layer(forward, inverse)), not a plain function"
        )
    return inverse


def _compose(maps) -> Callable:
    """``u -> (m_k(...m_1(u)), sum of their log|det|)`` for maps returning ``(value, log|det|)``."""

    def composed(u):
        total = 0.0
        for f in maps:
            u, ld = f(u)
            total = total + ld
        return u, total

    return composed


def affine_layer(loc, scale) -> Layer:
    """``u -> (loc + scale u, log|det|)``: ``scale`` a (d,) vector or (d, d) lower triangular."""
    diag = scale if scale.ndim == 1 else jnp.diagonal(scale)
    log_det = jnp.sum(jnp.log(jnp.abs(diag)))

    def forward(u):
        return loc + (scale * u if scale.ndim == 1 else scale @ u), log_det

    def inverse(y):
        if scale.ndim == 1:
            return (y - loc) / scale, -log_det
        return jax.scipy.linalg.solve_triangular(scale, y - loc, lower=True), -log_det

    return Layer(forward, inverse)


def chain_layers(*layers) -> Layer | None:
    """Compose layers ``u -> (f(u), log|det|)`` left to right (``None`` entries skipped).

    The chain is invertible when every layer is (:class:`Layer` with an inverse).
    """
    layers = [f for f in layers if f is not None]
    if not layers:
        return None

    inverses = [_inverse_of(f) for f in reversed(layers)]
    if any(f is None for f in inverses):
        return Layer(_compose(layers))
    return Layer(_compose(layers), _compose(inverses))


def _elementwise_affine(params, u):
    return params["loc"] + params["scale"] * u, jnp.sum(jnp.log(jnp.abs(params["scale"])))


def _elementwise_affine_inverse(params, y):
    return (y - params["loc"]) / params["scale"], -jnp.sum(jnp.log(jnp.abs(params["scale"])))


elementwise_affine_block = Layer(_elementwise_affine, _elementwise_affine_inverse)
"""Block layer ``u -> loc + scale * u`` for ``params = {"loc": (d,), "scale": (d,)}``."""


def stack_bijection_blocks(bijection, num_blocks: int):
    """Split a flowjax ``Scan`` of ``num_blocks * C`` layers into ``num_blocks`` blocks of C.

    Returns ``(arrays, static)``: ``arrays`` the bijection's array leaves reshaped to a
    leading block axis (``(num_blocks, C, ...)``; trainable and integer leaves alike) and
    ``static`` the rest, so that :func:`bijection_block` ``((arrays[b], static), u)`` applies
    block ``b``. Blocks built this way share one structure and run in one ``lax.scan``.
    """
    arrays, static = eqx.partition(bijection, eqx.is_array)

    def split(a):
        if a.shape[0] % num_blocks:
            raise ValueError(
                f"the bijection's {a.shape[0]} stacked layers do not split into {num_blocks} blocks"
            )
        return a.reshape((num_blocks, a.shape[0] // num_blocks) + a.shape[1:])

    return jax.tree.map(split, arrays), static


def bijection_block(static) -> Layer:
    """Block layer ``(arrays_b, u) -> (f_b(u), log|det|)`` for :func:`stack_bijection_blocks`.

    Its inverse is the bijection's (analytic for RealNVP couplings).
    """

    def forward(arrays, u):
        return paramax.unwrap(eqx.combine(arrays, static)).transform_and_log_det(u)

    def inverse(arrays, y):
        return paramax.unwrap(eqx.combine(arrays, static)).inverse_and_log_det(y)

    return Layer(forward, inverse)


def linear_schedule(num_blocks: int):
    """``lambda_b = b / B`` for b = 1..B."""
    return jnp.arange(1, num_blocks + 1, dtype=jnp.result_type(float)) / num_blocks


def monotone_schedule(logits):
    """``lambda = cumsum(softmax(logits))``: increasing, positive, ending at 1 (linear at 0)."""
    return jnp.cumsum(jax.nn.softmax(logits))


# --------------------------------------------------------------------------- the family


class StochasticNormalizingFlow(PathSurrogate, Family, WhitenedCoordinates):
    """Stochastic normalizing flow over the flat latent (module docstring): a path-space bound.

    Parameters
    ----------
    log_density : ``z -> log p(x, z)`` on the flat unconstrained latent (a scalar for one
        (d,) vector; differentiable). The family calls it along every path.
    precond_loc, precond_scale : fixed preconditioner ``z = m0 + L0 u`` ((d,) and (d,) or
        (d, d) lower triangular); gradients are stopped.
    step_sizes : (B,) or (B, d) positive Langevin step sizes, per block (and coordinate),
        in whitened units.
    lambdas : (B,) interpolation weights of the blocks' energies, in [0, 1]; the last should
        be 1 for the path to end at the posterior (any values give a valid bound).
    initial_layer : ``u -> (f(u), log|det df/du|)`` applied to the start ``y_0`` (before the
        first block's other layers), or ``None``.
    block_layer, block_params : ``block_layer(params_b, u) -> (f_b(u), log|det df_b/du|)``,
        applied at the start of block b with ``params_b`` the b-th slice of the pytree
        ``block_params`` (leading axis B; see :func:`stack_bijection_blocks` and
        :func:`elementwise_affine_block`); ``None`` for no per-block layer. The blocks run
        in one ``lax.scan``, so compile time does not grow with B.
    final_layer : ``v -> (T(v), log|det dT/dv|)`` applied after the last block, or ``None``.
        The stochastic steps then run in its input coordinates on the target pulled back
        through it, ``-log p(x, z(T(v))) - log|det dT/dv|`` (module docstring).
        Layers are :class:`Layer` objects or plain callables; the backward path
        (:meth:`reference_log_ratio`) needs them all to be :class:`Layer` with an inverse.
    langevin_steps : K, stochastic steps per block (0 gives a plain flow, exact density).
    final_steps : F further steps on the posterior itself (``lambda = 1``, the last block's
        step size) after the last block. MALA steps there leave the path weight unchanged
        (their Delta S telescope against the target), so they improve the draws without
        changing the bound or its gradient.
    mala : Metropolis-adjust each Langevin step (MALA).
    score_clip : soft clip ``c tanh(g / c)`` of the whitened target score per coordinate,
        ``None`` for none (the weights stay exact either way).
    remat : recompute each stochastic step in the backward pass (memory O(1) in K).
    control : ``(u, g, t) -> (d,)``, a learned control added to the forward Langevin drift
        and subtracted from the backward one (controlled Monte Carlo diffusion,
        :mod:`bayesgen.families.cmcd`): ``u`` the state, ``g`` its (clipped) target score,
        ``t = b / B`` the block's time. Unadjusted Langevin only (``mala=False``); the
        weights stay exact for any control.
    """

    density: ClassVar[str] = "lower_bound"

    def __init__(
        self,
        log_density: Callable,
        precond_loc,
        precond_scale,
        *,
        step_sizes,
        lambdas,
        initial_layer: Callable | None = None,
        final_layer: Callable | None = None,
        block_layer: Callable | None = None,
        block_params=None,
        langevin_steps: int = 2,
        final_steps: int = 0,
        mala: bool = False,
        score_clip: float | None = 100.0,
        remat: bool = False,
        control: Callable | None = None,
        validate_args=None,
    ):
        if not callable(log_density):
            raise TypeError(f"log_density must be callable, got {type(log_density).__name__}")
        check_int("langevin_steps", langevin_steps, minimum=0)
        check_int("final_steps", final_steps, minimum=0)
        check_positive("score_clip", score_clip, allow_none=True)
        if control is not None and (mala or not callable(control)):
            raise ValueError(
                "control must be a callable (u, g, t) -> (d,) and needs mala=False: a "
                "Metropolis step with a controlled proposal would need the reverse proposal's "
                "density, not the controlled backward kernel"
            )
        d = jnp.shape(precond_loc)[-1]
        lambdas = jnp.asarray(lambdas)
        if lambdas.ndim != 1 or lambdas.shape[0] < 1:
            raise ValueError(
                f"lambdas must be a non-empty (num_blocks,) vector, got shape {lambdas.shape}"
            )
        num_blocks = lambdas.shape[0]
        step_sizes = jnp.asarray(step_sizes)
        if step_sizes.shape not in ((num_blocks,), (num_blocks, d)):
            raise ValueError(
                f"step_sizes must have shape ({num_blocks},) or ({num_blocks}, {d}) "
                f"(one per block, or per block and coordinate), got {step_sizes.shape}"
            )
        if (block_layer is None) != (block_params is None):
            raise ValueError("give both block_layer and block_params, or neither")
        if block_params is not None:
            leading = {jnp.shape(x)[0] if jnp.ndim(x) else None
                       for x in jax.tree.leaves(block_params)}
            if leading != {num_blocks}:
                raise ValueError(
                    f"block_params must have a leading axis of length num_blocks={num_blocks} "
                    f"on every leaf, got leading sizes {sorted(leading, key=str)}"
                )
        self.log_density = log_density
        self.precond_loc = jax.lax.stop_gradient(precond_loc)
        self.precond_scale = jax.lax.stop_gradient(precond_scale)
        self.step_sizes = jnp.broadcast_to(
            step_sizes if step_sizes.ndim == 2 else step_sizes[:, None], (num_blocks, d)
        )
        self.lambdas = lambdas
        self.initial_layer = initial_layer
        self.final_layer = final_layer
        self.block_layer = block_layer
        self.block_params = block_params
        self.num_blocks = num_blocks
        self.langevin_steps = langevin_steps
        self.final_steps = final_steps
        self.mala = bool(mala)
        self.score_clip = score_clip
        self.remat = bool(remat)
        self.control = control
        super().__init__(d, validate_args=validate_args)

    # --- the target in whitened coordinates ---------------------------------------------------
    def _log_target(self, v):
        """Log-density of the stochastic steps' target at ``v`` (up to ``log|det L0|``)."""
        if self.final_layer is None:
            return self.log_density(self.to_latent(v))
        w, ld = self.final_layer(v)  # the target pulled back through the final layer
        return self.log_density(self.to_latent(w)) + ld

    def _target(self, u):
        """``(log target(u), grad_u of it)``."""
        return jax.value_and_grad(self._log_target)(u)

    def _clip(self, g):
        if self.score_clip is None:
            return g
        return self.score_clip * jnp.tanh(g / self.score_clip)

    def _drift(self, u, g, lam):
        return -(1.0 - lam) * u + lam * self._clip(g)

    def _drifts(self, u, g, lam, t, reverse=False):
        """``(forward drift, backward drift)`` at ``u``: the energy's, plus / minus the control.

        ``reverse``: swapped, for a path run from its end (the backward kernel is then the
        one taken and the forward kernel its reversal).
        """
        drift = self._drift(u, g, lam)
        if self.control is None:
            return drift, drift
        c = self.control(u, self._clip(g), t)
        return (drift - c, drift + c) if reverse else (drift + c, drift - c)

    @staticmethod
    def _energy(u, lp, lam):
        return (1.0 - lam) * 0.5 * jnp.sum(u * u) - lam * lp

    def block_times(self):
        """``t_b = b / B`` for b = 1..B, the blocks' times (the control's input)."""
        return linear_schedule(self.num_blocks)

    # --- one path -------------------------------------------------------------------------------
    def _langevin_steps(self, carry, lam, eps, noises, log_uniforms, differentiated=True,
                        t=1.0, reverse=False):
        """K steps from ``carry = (u, log target, its score, log_q, accepted)``.

        Each step subtracts ``log k_back(y -> x) - log k_taken(x -> y)`` from ``log_q``, which
        is the path's Delta S for a forward run and minus it for a ``reverse`` run (the
        kernels swap roles; only the control's sign tells them apart). Also returns, per
        step, the noise with which the other kernel proposes the way back and whether the
        step was accepted (the randomness that retraces the step in the other direction).
        """
        sqrt_2eps = jnp.sqrt(2.0 * eps)

        def step(carry, inputs):
            x, lp_x, g_x, log_q, n_acc = carry
            eta, log_unif = inputs
            y = x + eps * self._drifts(x, g_x, lam, t, reverse)[0] + sqrt_2eps * eta
            ok = True
            if self.mala and differentiated:
                # A proposal where the target or its score overflows is rejected, but
                # differentiating the target there would still give 0 * inf = nan in the
                # backward pass: after a check without gradients, evaluate it (with gradients)
                # at the current state instead.
                lp_c, g_c = jax.lax.stop_gradient(self._target(jax.lax.stop_gradient(y)))
                ok = jnp.isfinite(lp_c) & jnp.all(jnp.abs(g_c) < _MAX_SCORE)
                y = jnp.where(ok, y, x)
            lp_y, g_y = self._target(y)
            eta_back = (x - y - eps * self._drifts(y, g_y, lam, t, reverse)[1]) / sqrt_2eps
            # log backward kernel - log forward kernel (the Gaussian normalisers cancel)
            delta_s = 0.5 * jnp.sum(eta * eta - eta_back * eta_back)
            accept = True
            if self.mala:
                e_x, e_y = self._energy(x, lp_x, lam), self._energy(y, lp_y, lam)
                log_alpha = e_x - e_y + delta_s
                accept = jax.lax.stop_gradient(
                    ok & jnp.isfinite(log_alpha) & (log_unif < log_alpha)
                )
                y = jnp.where(accept, y, x)
                lp_y = jnp.where(accept, lp_y, lp_x)
                g_y = jnp.where(accept, g_y, g_x)
                # detailed balance for exp(-u_lambda): backward / forward = e^{u(y) - u(x)}
                delta_s = jnp.where(accept, e_y - e_x, 0.0)
                n_acc = n_acc + accept
            return (y, lp_y, g_y, log_q - delta_s, n_acc), (eta_back, jnp.asarray(accept))

        if self.remat:
            step = jax.checkpoint(step)
        return jax.lax.scan(step, carry, (noises, log_uniforms))

    def _final_steps(self, carry, noises, log_uniforms, reverse=False):
        """Steps on the posterior (lambda = 1) after the last block (``reverse``: before it).

        MALA steps there change the path term by exactly ``log pi(y_F) - log pi(y_0)`` (their
        Delta S telescope), so the loss ``-log pi(y_F) + surrogate`` does not depend on them:
        they run without gradients (forward cost only) and the term is added back with
        ``y_F`` held fixed and ``log pi(y_0)`` live, which gives the same value and the exact
        gradient. Langevin steps do not telescope and are differentiated like the others.
        A MALA step is its own reversal, so a reverse run is the same code (from ``y_F`` to
        ``y_0``, adding ``log pi(y_0) - log pi(y_F)``, minus the forward term).
        """
        eps = self.step_sizes[-1]
        if not self.mala:
            return self._langevin_steps(carry, 1.0, eps, noises, log_uniforms, reverse=reverse)
        u0, lp0, g0, log_q, n_acc = carry
        frozen = jax.lax.stop_gradient((u0, lp0, g0, log_q, eps))
        (u, _, g, _, n_acc), retrace = self._langevin_steps(
            (*frozen[:4], n_acc), 1.0, frozen[4], noises, log_uniforms, differentiated=False)
        u, g = jax.lax.stop_gradient((u, g))
        lp = self._log_target(u)  # live in the parameters of a final layer, at a fixed point
        return (u, lp, g, log_q + lp - lp0, n_acc), retrace

    def path(self, u0, noises, log_uniforms, final_noises=None, final_log_uniforms=None):
        """Run one path from explicit randomness, in whitened coordinates.

        Parameters
        ----------
        u0 : (d,) start, a draw of N(0, I).
        noises : (B, K, d) Langevin noises ``eta``.
        log_uniforms : (B, K) logs of the MALA acceptance uniforms (unused for Langevin).
        final_noises, final_log_uniforms : (F, d) and (F,) for the ``final_steps``.

        Returns
        -------
        ``(u_T, log N(u_0; 0, I) - sum_t Delta S_t, number of accepted MALA proposals)``;
        the surrogate in z adds ``-log|det L0|``.
        """
        u = u0
        log_q = _log_std_normal(u0)
        if self.initial_layer is not None:
            u, ld = self.initial_layer(u)
            log_q = log_q - ld
        moves = self.langevin_steps or self.final_steps
        lp, g = self._target(u) if moves else (jnp.zeros(()), jnp.zeros_like(u))
        carry = (u, lp, g, log_q, jnp.zeros((), jnp.int32))

        def block(carry, inputs):
            params, lam, eps, t, eta, log_unif = inputs
            u, lp, g, log_q, n_acc = carry
            if self.block_layer is not None:
                u, ld = self.block_layer(params, u)
                log_q = log_q - ld
                if moves:
                    lp, g = self._target(u)
            carry = (u, lp, g, log_q, n_acc)
            if self.langevin_steps:
                carry, _ = self._langevin_steps(carry, lam, eps, eta, log_unif, t=t)
            return carry, None

        inputs = (self.block_params, self.lambdas, self.step_sizes, self.block_times(), noises,
                  log_uniforms)
        carry, _ = jax.lax.scan(block, carry, inputs)
        if self.final_steps:
            carry, _ = self._final_steps(carry, final_noises, final_log_uniforms)
        u, _, _, log_q, n_acc = carry
        if self.final_layer is not None:
            u, ld = self.final_layer(u)
            log_q = log_q - ld
        return u, log_q, n_acc

    def reverse_path(self, u_end, noises, log_uniforms, final_noises=None,
                     final_log_uniforms=None):
        """Run the backward kernels from ``u_end`` to a start, from explicit randomness.

        The path of :meth:`path` in reverse: the final layer's inverse, the final steps, then
        per block (last first) its K steps with the backward kernels and its layer's inverse,
        then the initial layer's inverse. The arguments are the backward kernels' noises and
        log-uniforms, shaped as :meth:`path`'s.

        Returns
        -------
        ``(u_0, log N(u_0; 0, I) - sum_t Delta S_t, retrace)``: the path term is the same
        function of the path as :meth:`path`'s, and ``path(u_0, *retrace)`` runs this path
        forward (``retrace``: the forward kernels' noises, and log-uniforms ``-inf`` /
        ``+inf`` where a MALA step moved / stayed).
        """
        self._check_invertible()
        d = self.latent_dim
        no_steps = (jnp.zeros((0, d)), jnp.zeros((0,), bool))
        u, sum_ds = u_end, jnp.zeros(())
        if self.final_layer is not None:
            u, ld = self.final_layer.inverse(u)
            sum_ds = sum_ds - ld  # the forward layer's log|det| is minus its inverse's
        moves = self.langevin_steps or self.final_steps
        lp, g = self._target(u) if moves else (jnp.zeros(()), jnp.zeros_like(u))
        # the carry's log_q slot sums the path's Delta S (a reverse run of steps adds theirs)
        carry = (u, lp, g, sum_ds, jnp.zeros((), jnp.int32))
        final_retrace = no_steps
        if self.final_steps:
            carry, final_retrace = self._final_steps(carry, final_noises, final_log_uniforms,
                                                     reverse=True)

        def block(carry, inputs):
            params, lam, eps, t, eta, log_unif = inputs
            retrace = no_steps
            if self.langevin_steps:
                carry, retrace = self._langevin_steps(carry, lam, eps, eta, log_unif, t=t,
                                                      reverse=True)
            u, lp, g, sum_ds, n_acc = carry
            if self.block_layer is not None:
                u, ld = self.block_layer.inverse(params, u)
                sum_ds = sum_ds - ld
                if moves:
                    lp, g = self._target(u)
            return (u, lp, g, sum_ds, n_acc), retrace

        inputs = (self.block_params, self.lambdas, self.step_sizes, self.block_times(), noises,
                  log_uniforms)
        carry, retrace = jax.lax.scan(block, carry, jax.tree.map(lambda a: a[::-1], inputs))
        u, _, _, sum_ds, _ = carry
        if self.initial_layer is not None:
            u, ld = self.initial_layer.inverse(u)
            sum_ds = sum_ds - ld

        def forward_randomness(etas, accepted):
            return etas, jnp.where(accepted, -jnp.inf, jnp.inf)

        # the steps ran last first: flip blocks and steps back into forward order
        retrace = forward_randomness(*jax.tree.map(lambda a: a[::-1, ::-1], retrace))
        final_retrace = forward_randomness(*jax.tree.map(lambda a: a[::-1], final_retrace))
        return u, _log_std_normal(u) - sum_ds, (*retrace, *final_retrace)

    def _check_invertible(self):
        for name in ("initial_layer", "block_layer", "final_layer"):
            layer = getattr(self, name)
            if layer is not None:
                require_inverse(layer, name)

    def _reverse_draw(self, key, u_end):
        nb, k, f = self.num_blocks, self.langevin_steps, self.final_steps
        k_noise, k_unif = jr.split(key)
        noises = jr.normal(k_noise, (nb * k + f, self.latent_dim))
        log_uniforms = jnp.log(jr.uniform(k_unif, (nb * k + f,)))
        _, term, _ = self.reverse_path(
            u_end, noises[: nb * k].reshape(nb, k, -1), log_uniforms[: nb * k].reshape(nb, k),
            noises[nb * k:], log_uniforms[nb * k:])
        return term

    def reference_log_ratio(self, key, value):
        """The path term on backward paths started at ``value`` (for the EUBO).

        For ``z`` from the posterior, ``E[log p(x, z) - reference_log_ratio(z)] = log p(x) +
        KL(B || F) >= log p(x)``, and ``E[exp(reference_log_ratio(z) - log p(x, z))] =
        1 / p(x)`` (module docstring). ``value``: (..., d) latents; returns (...,).
        """
        check_latent(value, self.latent_dim)
        self._check_invertible()
        shape = jnp.shape(value)[:-1]
        flat = jnp.reshape(self.to_whitened(value), (-1, self.latent_dim))
        keys = jr.split(key, max(flat.shape[0], 1))[: flat.shape[0]]
        term = jax.jit(jax.vmap(self._reverse_draw))(keys, flat)
        return term.reshape(shape) - self._log_det_precond()

    def _draw(self, key, sample_shape):
        d, nb, k = self.latent_dim, self.num_blocks, self.langevin_steps
        shape = tuple(sample_shape) + self.batch_shape
        size = math.prod(shape)
        k0, k_noise, k_unif = jr.split(key, 3)
        u0 = jr.normal(k0, (size, d))
        f = self.final_steps
        noises = jr.normal(k_noise, (size, nb * k + f, d))
        log_uniforms = jnp.log(jr.uniform(k_unif, (size, nb * k + f)))
        u, log_q, n_acc = jax.jit(jax.vmap(self.path))(
            u0, noises[:, : nb * k].reshape(size, nb, k, d),
            log_uniforms[:, : nb * k].reshape(size, nb, k), noises[:, nb * k:],
            log_uniforms[:, nb * k:])
        z = self.to_latent(u)
        log_q = log_q - self._log_det_precond()
        return z.reshape(shape + (d,)), log_q.reshape(shape), n_acc.reshape(shape)

    def sample_with_intermediates(self, key, sample_shape=()):
        """A draw and ``[its path term]`` (the surrogate ``log_prob`` returns)."""
        z, log_q, _ = self._draw(key, sample_shape)
        return z, [log_q]

    def sample_with_diagnostics(self, key, sample_shape=()):
        """``(z, path term, info)`` with ``info["acceptance"]``, each path's MALA acceptance rate.

        Langevin without adjustment reports an acceptance of 1.
        """
        z, log_q, n_acc = self._draw(key, sample_shape)
        total = self.num_blocks * self.langevin_steps + self.final_steps
        acc = n_acc / total if (self.mala and total) else jnp.ones_like(log_q)
        return z, log_q, {"acceptance": acc}

