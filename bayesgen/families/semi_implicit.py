"""Semi-implicit families: a Gaussian conditional mixed over the output of a network.

The family, in the whitened coordinates ``w`` of a fixed preconditioner (``z = m0 + L0 w``),

    eps ~ N(0, I_m),   w | eps ~ N(mu(eps), diag sigma(eps)^2),

is a continuous mixture with no closed-form density: ``q(w) = E_eps N(w; mu(eps), sigma(eps)^2)``
(Yin & Zhou, 2018). ``mu`` and ``sigma`` come from one network of the noise (the "mixing
network"); ``sigma`` may also be a global vector. Two surrogates of log q are provided:

``SemiImplicit`` (``density = "lower_bound"``, SIVI)
    With ``eps_0`` the draw that generated ``w`` and ``eps_1..K`` fresh draws,

        log q_K(w) = log (1/(K+1)) sum_{k=0..K} N(w; mu(eps_k), sigma(eps_k)^2),

    and ``E[log p - log q_K] <= ELBO``, increasing in K to the ELBO (Yin & Zhou, Thm. 1).
    Leaving ``eps_0`` out turns it into an upper bound that the optimiser exploits by
    shrinking sigma, so it is always in.

    With a *reverse model* ``tau(eps | w)`` (a Gaussian from a network of ``w``) the fresh
    draws come from tau instead of the prior and are importance-weighted (IWHVI; Sobolev &
    Vetrov, 2019):

        log q_K(w) = log (1/(K+1)) sum_{k=0..K} N(w; mu(eps_k), sigma(eps_k)^2) p(eps_k) / tau(eps_k | w),

    ``eps_0`` the generating draw, ``eps_1..K ~ tau(. | w)``. For every tau this is still an
    upper bound on log q(w) in expectation (so the surrogate ELBO stays a lower bound), tau
    = prior gives SIVI back, and tau is trained on the same objective, which tightens the
    bound: in the tails of q, where fresh prior draws rarely land near a noise that
    generates ``w``, SIVI's estimate is dominated by the generating term and over-states
    log q (its finite-K bias under-disperses q); tau proposes where that noise is.

``UnbiasedSemiImplicit`` (``density = "unbiased_gradient"``, UIVI)
    The gradient of E[log q(z)] is E[score_q(z) . dz/dtheta] (the score-function term has
    mean zero), and the marginal score is a posterior mean over the noise,

        grad_w log q(w) = E_{q(eps | w)} [ -(w - mu(eps)) / sigma(eps)^2 ],

    estimated by a short HMC chain on ``q(eps | w)`` started at the generating ``eps_0``
    (an exact draw from it, so no burn-in is needed for stationarity; the steps decorrelate
    the average from ``eps_0``) (Titsias & Ruiz, 2019). ``log_prob`` returns
    ``sg(log q_K) + score . w - sg(score . w)``: its value is the SIVI estimate (for the loss
    trace), its pathwise gradient the UIVI estimate. The chain runs in coordinates whitened
    by the Gauss-Newton precision ``I + J^T diag(sigma^-2) J`` of ``q(eps | w)`` at ``eps_0``
    (``J = dmu/deps``), so one step size fits every site and every stage of training; the
    paper adapts a global step size instead.

Honest diagnostics (``log_importance_density``)
    On the extended space of ``(w, eps_0, eps_1..K)`` with proposal
    ``q(eps_0) q(w | eps_0) prod_k q(eps_k)``, the weight ``p(x, z) / q_K(w)`` is an exact
    importance weight: the target ``p(x, z) q(w | eps_0) prod_k q(eps_k) / q_K(w)`` integrates
    over the eps's to ``p(x, z)`` (by symmetry each of the K+1 terms of ``q_K`` contributes
    1/(K+1)), so ``E[p / q_K] = p(x)`` for every K. PSIS k-hat on these weights diagnoses the
    extended proposal, which approaches the marginal as K grows, and the evidence estimate
    is unbiased. This is the importance-weighted form of the SIVI bound (Sobolev & Vetrov,
    2019; Molchanov et al., 2019).

References
----------
Yin & Zhou, "Semi-implicit variational inference", ICML 2018.
Titsias & Ruiz, "Unbiased implicit variational inference", AISTATS 2019.
Sobolev & Vetrov, "Importance weighted hierarchical variational inference", NeurIPS 2019
(the reverse model).
Molchanov, Kharitonov, Sobolev & Vetrov, "Doubly semi-implicit variational inference",
AISTATS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr

from bayesgen.errors import check_int, check_positive
from bayesgen.families.base import Family, WhitenedCoordinates, check_latent

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_logpdf(w, mu, sigma):
    """``sum_i log N(w_i; mu_i, sigma_i^2)`` over the last axis (broadcasting)."""
    r = (w - mu) / sigma
    return -0.5 * jnp.sum(r * r + _LOG_2PI, axis=-1) - jnp.sum(jnp.log(sigma), axis=-1)


def mixture_log_density(
    key,
    w,
    log_conditional: Callable,
    eps0,
    noise_dim: int,
    num_mixing: int,
    *,
    chunk_size: int = 256,
):
    """``log (1/(K+1)) [q(w | eps0) + sum_k q(w | eps_k)]`` with ``eps_k ~ N(0, I)``, K = num_mixing.

    ``w`` (..., d) and ``eps0`` (..., m) are draws and their generating noise; the K fresh
    draws are shared by every ``w`` in the batch (each ``w``'s estimate stays valid: the
    fresh draws are independent of it) and processed in chunks with a running logsumexp,
    so memory is O(batch * chunk_size) whatever K. ``log_conditional(w, eps)`` returns
    log q(w | eps) for ``w`` (..., 1, d) and ``eps`` (..., n, m) as (..., n).
    """
    if num_mixing < 0:
        raise ValueError(f"num_mixing must be >= 0, got {num_mixing}")
    own = log_conditional(w[..., None, :], eps0[..., None, :])[..., 0]

    def chunk_terms(k, n):  # one set of fresh draws shared by the batch
        return log_conditional(w[..., None, :], jr.normal(k, (n, noise_dim)))

    return _log_mean_with_own(key, own, chunk_terms, num_mixing, chunk_size)


def _log_mean_with_own(key, own, chunk_terms, num_mixing, chunk_size):
    """``log (1/(K+1)) [exp(own) + sum_k exp(term_k)]``, the K terms made in chunks.

    ``chunk_terms(key, n)`` returns n log terms (..., n); a running logsumexp keeps memory
    at one chunk whatever K, and the padding of the last chunk is dropped.
    """
    if num_mixing == 0:
        return own
    chunk = min(chunk_size, num_mixing)
    num_chunks = -(-num_mixing // chunk)
    keys = jr.split(key, num_chunks)
    idx = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)

    def body(acc, inputs):
        k, ids = inputs
        lp = jnp.where(ids < num_mixing, chunk_terms(k, chunk), -jnp.inf)
        return jnp.logaddexp(acc, jax.nn.logsumexp(lp, axis=-1)), None

    acc, _ = jax.lax.scan(body, own, (keys, idx))
    return acc - math.log(num_mixing + 1)


def proposal_mixture_log_density(
    key,
    w,
    log_conditional: Callable,
    eps0,
    draw: Callable,
    log_proposal: Callable,
    num_mixing: int,
    *,
    chunk_size: int = 256,
):
    """IWHVI's ``log (1/(K+1)) sum_k q(w | eps_k) p(eps_k) / r(eps_k | w)`` for any reverse model.

    ``eps_0 = eps0`` (the generating noise, (..., m)), ``eps_1..K`` from ``draw(key, n) ->
    (..., n, m)``, a sampler of ``r(. | w)``; ``log_proposal(eps)`` is ``log r(eps | w)``
    for eps (..., n, m), as (..., n); ``p = N(0, I)``. The weights ``p(x, z) / q^_K`` have
    expectation ``p(x)`` for any ``r`` that depends on ``w`` alone. ``log_conditional`` as
    in :func:`mixture_log_density`. Chunked with a running logsumexp.
    """
    if num_mixing < 0:
        raise ValueError(f"num_mixing must be >= 0, got {num_mixing}")

    def log_weight(eps):  # eps (..., n, m) -> log p(eps) - log r(eps | w), (..., n)
        return -0.5 * jnp.sum(eps * eps + _LOG_2PI, axis=-1) - log_proposal(eps)

    e0 = eps0[..., None, :]
    own = (log_conditional(w[..., None, :], e0) + log_weight(e0))[..., 0]

    def chunk_terms(k, n):
        eps = draw(k, n)
        return log_conditional(w[..., None, :], eps) + log_weight(eps)

    return _log_mean_with_own(key, own, chunk_terms, num_mixing, chunk_size)


def reverse_mixture_log_density(
    key,
    w,
    log_conditional: Callable,
    eps0,
    reverse: Callable,
    num_mixing: int,
    *,
    chunk_size: int = 256,
):
    """IWHVI's estimate (:func:`proposal_mixture_log_density`) with a diagonal Gaussian ``tau``.

    ``reverse(w) -> (loc, scale)``, each (..., m), is the reverse model; the K fresh draws
    are made for each ``w`` separately (tau depends on it) and reparameterised.
    """
    loc, scale = reverse(w)  # (..., m)
    loc, scale = loc[..., None, :], scale[..., None, :]

    def draw(k, n):
        return loc + scale * jr.normal(k, loc.shape[:-2] + (n, loc.shape[-1]))

    return proposal_mixture_log_density(
        key, w, log_conditional, eps0, draw, lambda eps: gaussian_logpdf(eps, loc, scale),
        num_mixing, chunk_size=chunk_size,
    )


class SemiImplicit(WhitenedCoordinates, Family):
    """Semi-implicit family with the SIVI lower-bound surrogate (see module docstring).

    Parameters
    ----------
    conditional : ``eps (..., m) -> (mu, sigma)``, each ``(..., d)``, in whitened coordinates;
        sigma positive.
    noise_dim : m, the dimension of the mixing noise.
    precond_loc, precond_scale : the fixed preconditioner ``z = m0 + L0 w`` (``L0`` a (d,)
        vector or (d, d) lower triangular; gradients stopped).
    num_mixing : K, fresh mixing draws in the surrogate (the generating draw is added).
    reverse : optional reverse model ``w (..., d) -> (loc, scale)`` over the noise, each
        (..., m); the fresh draws then come from it, importance-weighted (IWHVI).
    """

    density: ClassVar[str] = "lower_bound"

    def __init__(
        self,
        conditional: Callable,
        noise_dim: int,
        precond_loc,
        precond_scale,
        *,
        num_mixing: int = 100,
        reverse: Callable | None = None,
        validate_args=None,
    ):
        check_int("num_mixing", num_mixing, minimum=0)
        check_int("noise_dim", noise_dim)
        self.conditional = conditional
        self.noise_dim = noise_dim
        self.num_mixing = num_mixing
        self.reverse = reverse
        self.precond_loc = jax.lax.stop_gradient(precond_loc)
        self.precond_scale = jax.lax.stop_gradient(precond_scale)
        super().__init__(jnp.shape(precond_loc)[-1], validate_args=validate_args)

    # --- the conditional ----------------------------------------------------------------------
    def log_conditional(self, w, eps):
        """log q(w | eps) in whitened coordinates (``w`` (..., d) broadcast against ``eps`` (..., m))."""
        mu, sigma = self.conditional(eps)
        return gaussian_logpdf(w, mu, sigma)

    def _draw(self, key, sample_shape):
        k_eps, k_u = jr.split(key)
        shape = tuple(sample_shape) + self.batch_shape
        eps = jr.normal(k_eps, shape + (self.noise_dim,))
        mu, sigma = self.conditional(eps)
        u = jr.normal(k_u, mu.shape)
        return eps, mu, sigma, u

    def sample_with_conditional_score(self, key, sample_shape=()):
        """Draws and the conditional score, for score-based objectives (KSIVI, SIVI-SM).

        Returns ``(z, w, score_w, eps)`` with ``score_w = grad_w log q(w | eps) =
        -(w - mu(eps)) / sigma(eps)^2`` at the generating ``eps`` (whitened coordinates),
        all reparameterised.
        """
        eps, mu, sigma, u = self._draw(key, sample_shape)
        w = mu + sigma * u
        return self.to_latent(w), w, -u / sigma, eps

    # --- sampling and the surrogate -------------------------------------------------------------
    def sample(self, key, sample_shape=()):
        """Draws only (no surrogate): what ``sample_posterior`` and ``Predictive`` need."""
        eps, mu, sigma, u = self._draw(key, sample_shape)
        return self.to_latent(mu + sigma * u)

    def _sivi_log_density(self, key, w, eps0, num_mixing):
        if self.reverse is not None:  # fresh draws from tau(. | w), per w
            out = reverse_mixture_log_density(
                key, w, self.log_conditional, eps0, self.reverse, num_mixing
            )
        else:  # one set of K fresh draws for the whole batch (as in the authors' code)
            out = mixture_log_density(key, w, self.log_conditional, eps0, self.noise_dim, num_mixing)
        return out - self._log_det_precond()

    def sample_with_intermediates(self, key, sample_shape=()):
        k_draw, k_mix = jr.split(key)
        eps, mu, sigma, u = self._draw(k_draw, sample_shape)
        w = mu + sigma * u
        log_q = self._sivi_log_density(k_mix, w, eps, self.num_mixing)
        return self.to_latent(w), [log_q, eps]

    def log_prob(self, value, intermediates=None):
        if intermediates:
            return intermediates[0]
        raise ValueError(
            f"{type(self).__name__} has no closed-form log q(z): its log_prob is the SIVI "
            "surrogate of a draw and needs that draw's intermediates (numpyro passes them "
            "from the guide's sample site). For diagnostics use bayesgen.diagnose, which "
            "weights draws on the extended space (log_importance_density)."
        )

    def log_importance_density(self, key, value, intermediates, num_mixing: int = 1000):
        """Extended-space proposal log-density ``log q_K(z)`` with the generating draw included.

        ``exp(log p(x, z) - log_importance_density)`` has expectation exactly ``p(x)`` for
        any K (module docstring); larger K brings the extended proposal closer to q(z).
        """
        check_latent(value, self.latent_dim)
        w = self.to_whitened(value)
        eps0 = intermediates[1]
        # fresh draws independent across z (a shared set would correlate the weights)
        flat_w = w.reshape((-1, self.latent_dim))
        flat_e = eps0.reshape((-1, self.noise_dim))
        keys = jr.split(key, flat_w.shape[0])
        out = jax.vmap(lambda k, wi, ei: self._sivi_log_density(k, wi, ei, num_mixing))(
            keys, flat_w, flat_e
        )
        return out.reshape(w.shape[:-1])


class UnbiasedSemiImplicit(SemiImplicit):
    """Semi-implicit family with UIVI's unbiased entropy gradient (see module docstring).

    Parameters
    ----------
    conditional, noise_dim, precond_loc, precond_scale : as :class:`SemiImplicit`.
    num_mixing : K for the value of the surrogate (the loss trace; no gradient flows).
    num_burn, num_kept : HMC iterations on q(eps | w) before and during the average.
    num_leapfrog : leapfrog steps per iteration.
    step_size : leapfrog step in the Gauss-Newton-whitened eps coordinates (jittered
        uniformly in [0.7, 1.3] x step_size per iteration to avoid periodic orbits).
    """

    density: ClassVar[str] = "unbiased_gradient"

    def __init__(
        self,
        conditional: Callable,
        noise_dim: int,
        precond_loc,
        precond_scale,
        *,
        num_mixing: int = 32,
        num_burn: int = 5,
        num_kept: int = 5,
        num_leapfrog: int = 5,
        step_size: float = 0.3,
        validate_args=None,
    ):
        for name, val in (("num_burn", num_burn), ("num_kept", num_kept),
                          ("num_leapfrog", num_leapfrog)):
            check_int(name, val, minimum=0 if name == "num_burn" else 1)
        check_positive("step_size", step_size)
        self.num_burn, self.num_kept = num_burn, num_kept
        self.num_leapfrog, self.step_size = num_leapfrog, float(step_size)
        super().__init__(
            conditional, noise_dim, precond_loc, precond_scale, num_mixing=num_mixing,
            validate_args=validate_args,
        )

    def marginal_score(self, key, w, eps0):
        """HMC estimate of ``grad_w log q(w)`` for one ``w`` (d,), chain started at ``eps0``.

        Returns ``(score, acceptance_rate)``. Gradients are stopped: the chain is a sampler.
        """
        w = jax.lax.stop_gradient(w)
        eps0 = jax.lax.stop_gradient(eps0)
        m = self.noise_dim

        def mean_fn(e):
            return self.conditional(e)[0]

        def log_target(e):
            mu, sigma = self.conditional(e)
            return gaussian_logpdf(w, mu, sigma) - 0.5 * jnp.sum(e * e)

        # Gauss-Newton precision of q(eps | w) at eps0, for a whitened chain
        _, sigma0 = self.conditional(eps0)
        jac = jax.jacfwd(mean_fn)(eps0) / sigma0[:, None]  # (d, m)
        prec = jnp.eye(m) + jac.T @ jac
        chol = jnp.linalg.cholesky(prec)  # prec = C C^T; eps = C^{-T} eta

        def to_eps(eta):
            return jax.scipy.linalg.solve_triangular(chol.T, eta, lower=False)

        def log_eta(eta):
            return log_target(to_eps(eta))

        grad_eta = jax.grad(log_eta)

        def hmc_step(eta, k):
            k_mom, k_h, k_acc = jr.split(k, 3)
            p0 = jr.normal(k_mom, (m,))
            h = self.step_size * jr.uniform(k_h, minval=0.7, maxval=1.3)

            def leapfrog(carry, _):
                x, p, g = carry
                p = p + 0.5 * h * g
                x = x + h * p
                g = grad_eta(x)
                p = p + 0.5 * h * g
                return (x, p, g), None

            (x1, p1, _), _ = jax.lax.scan(
                leapfrog, (eta, p0, grad_eta(eta)), None, length=self.num_leapfrog
            )
            log_ratio = log_eta(x1) - 0.5 * p1 @ p1 - log_eta(eta) + 0.5 * p0 @ p0
            log_ratio = jnp.where(jnp.isfinite(log_ratio), log_ratio, -jnp.inf)
            accept = jnp.log(jr.uniform(k_acc)) < log_ratio
            return jnp.where(accept, x1, eta), jnp.minimum(1.0, jnp.exp(log_ratio))

        def body(eta, k):
            eta, acc = hmc_step(eta, k)
            e = to_eps(eta)
            mu, sigma = self.conditional(e)
            return eta, (-(w - mu) / sigma**2, acc)

        keys = jr.split(key, self.num_burn + self.num_kept)
        _, (scores, acc) = jax.lax.scan(body, chol.T @ eps0, keys)
        score = jnp.mean(scores[self.num_burn :], axis=0)
        return jax.lax.stop_gradient(score), jnp.mean(acc)

    def sample_with_intermediates(self, key, sample_shape=()):
        k_draw, k_mix, k_hmc = jr.split(key, 3)
        eps, mu, sigma, u = self._draw(k_draw, sample_shape)
        w = mu + sigma * u
        value = jax.lax.stop_gradient(self._sivi_log_density(k_mix, w, eps, self.num_mixing))
        flat_w = w.reshape((-1, self.latent_dim))
        flat_e = eps.reshape((-1, self.noise_dim))
        keys = jr.split(k_hmc, flat_w.shape[0])
        score, acc = jax.vmap(self.marginal_score)(keys, flat_w, flat_e)
        score = score.reshape(w.shape)
        inner = jnp.sum(score * w, axis=-1)
        surrogate = value + inner - jax.lax.stop_gradient(inner)
        return self.to_latent(w), [surrogate, eps, acc.reshape(w.shape[:-1])]
