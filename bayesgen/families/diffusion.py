"""Diffusion families: the posterior is the end of a learned reverse-time diffusion.

In the whitened coordinates ``u`` of a fixed preconditioner (``z = m0 + L0 u``) the
*reference* process is the variance-preserving Ornstein-Uhlenbeck process

    du = -1/2 beta(t) u dt + sqrt(beta(t)) dB,    0 <= t <= T,

whose stationary law is N(0, I). Started at the posterior, it noises it towards N(0, I);
over a step from t_{k-1} to t_k its transition is exact and Gaussian,

    B_k(u_k | u_{k-1}) = N(u_k; a_k u_{k-1}, (1 - a_k^2) I),   a_k^2 = exp(-int_{t_{k-1}}^{t_k} beta),

and after the whole horizon the signal left is ``sqrt(abar_N)``, ``abar_k = prod_{j<=k} a_j^2``.

``DenoisingDiffusion`` (DDVI; Xu, Zeng & Paisley, ICML 2024)
    The variational process runs the reverse direction with a learned score: ``u_N ~ N(0, I)``
    and, for k = N, ..., 1, the DDPM-type step (Ho et al., 2020)

        u_{k-1} = (u_k + (1 - a_k^2) s(u_k, t_k)) / a_k + sqrt(c_k (1 - a_k^2)) xi_k,
        s(u, t) = -u + f(u, t),

    with ``f`` from a network (the correction to the score of the reference's stationary
    law; by default through a denoiser, see ``parameterization``) and ``c_k`` a learned
    per-coordinate factor on the step's variance (1 is DDPM's choice, the reference's own
    variance; the exact reverse step of a target narrower than a step has less, and a fixed
    ``c = 1`` then over-disperses it: Nichol & Dhariwal, 2021, learn it too).
    ``q(u_0)`` has no closed form; on path space the ratio of the variational path to the
    reference path conditioned on its start,

        log q(u_{0:N}) - log r(u_{1:N} | u_0) = log N(u_N; 0, I) + sum_k [log F_k - log B_k],

    ``F_k`` the Gaussian step above, is a *lower-bound surrogate*: ``E[log p(x, u_0) - it]``
    equals ``log p(x) - KL(Q || R)`` over paths, with R the reference started at the
    posterior, so it lower-bounds log p(x) for every network and step count, and reaches it
    when Q is R's time reversal. That is the discrete form of the Girsanov ELBO (the score
    error integrated along the path) and needs no approximation beyond Monte Carlo. With
    the shared ``1 - a_k^2`` the normalising constants mostly cancel:
    ``log F_k - log B_k = -(|xi_k|^2 + sum log c_k) / 2 + |u_k - a_k u_{k-1}|^2 / (2 (1 - a_k^2))``.

    With ``f = 0`` and ``c = 1`` the step is the exact reversal of the reference kernel at
    stationarity, so the surrogate telescopes to ``log N(u_0; 0, I)`` on every path: the
    family starts exactly at the preconditioner's Gaussian, with no path noise in its loss.
    With the exact score of a Gaussian target and ``c = 1`` the bound tends to log Z as the
    steps grow (tested).

``DenoisingDiffusion`` with a start ``rho = N(mu, diag s^2)`` (DBVI; Xu, Zhao, Paisley &
Zeng, 2025)
    The variational process starts at the learnable ``rho`` instead of N(0, I), and the
    reference becomes its Doob h-transform that ends in ``rho``:

        h(u, t) = E[rho(U_T) / N(U_T; 0, I) | U_t = u]   (a Gaussian integral, closed form),
        r_h(u_{1:N} | u_0) = r(u_{1:N} | u_0) h(u_N, T) / h(u_0, 0),

    a proper Markov process for every start (the ratio telescopes because the reference
    kernels are exact), which, started at the reference's stationary law, ends exactly in
    ``rho``. The surrogate is

        log q - log r_h = log N(u_N; 0, I) + sum_k [log F_k - log B_k] + log h(u_0, 0)

    (``log rho(u_N)`` cancels), again a lower bound for every ``rho`` and network, and
    ``rho = N(0, I)`` gives h = 1 and DDVI back. The step ``F_k`` is the same DDPM step:
    the time reversal of an h-transformed process runs the *unconditioned* dynamics from
    the conditioned end (the h-terms of the forward drift and of the marginal score cancel),
    so the network models the score of the noised ``pi / h(., 0)`` (the "conditional score"
    ``s - grad log h``) and no bridge term enters the drift. With ``f = 0``, q is ``rho``
    noised by the reference over [0, T], ``N(A mu, A^2 s^2 + 1 - A^2)`` with
    ``A = sqrt(abar_N)``, and the surrogate equals its log-density on every path: the
    learned start is a Gaussian base that the diffusion corrects, and the horizon need not
    wash it out. With the optimal network the bound's gap is ``KL(rho || p^h_T)``, the
    mismatch between the start and the bridged reference's end when it starts at the
    posterior; it vanishes when the posterior is ``rho`` noised over [0, T] (tested against
    the closed form on a Gaussian target). The papers' exact equations were not available
    to us (../shared/METHODS.md s. 6c); this is our construction from the method's
    description (learned start, Doob-bridged reference, conditional score).

A learned invertible map at the end (``final_layer``)
    Optionally the diffusion runs in the input coordinates of an invertible map ``T`` (an
    affine map and RealNVP couplings, trained with the rest): ``z = m0 + L0 T(u_0)``. The
    surrogate becomes the path term minus ``log|det dT/du_0|``, still a lower bound for
    every ``T`` (a deterministic bijection of the path's end), and the reference process now
    noises the posterior pulled back through ``T``. Where ``T`` is a good flow that pull-back
    is close to N(0, I), which is what the OU reference and a score network of unit scale
    handle well; where the posterior's scale varies over orders of magnitude (a funnel's
    neck) the flow carries the scale and the diffusion the rest (the NeuTra idea, Hoffman et
    al., 2019, as :mod:`bayesgen.families.stochastic_flow` uses it). Sticking-the-landing
    applies to the network only: on path space the density of ``u_{N:0}`` does not depend
    on ``T``'s parameters, so the log-determinant keeps its full (reparameterised) gradient;
    freezing it too would drop a term whose mean is not zero.

Honest diagnostics
    On path space the weight ``p(x, z) r(path | u_0) / q(path) = exp(log p(x, z) - surrogate)``
    is an exact importance weight (its expectation is p(x)), so ``log_importance_density``
    returns the same path term; PSIS k-hat then diagnoses the path proposal.

Why by hand: no JAX library has diffusion posteriors over a model's latent as a
distribution; the DDVI/DBVI authors' code is not usable (../shared/NOTES.md).

References
----------
Xu, Zeng & Paisley, "Sparse inducing points in deep Gaussian processes: enhancing modeling
with denoising diffusion variational inference", ICML 2024 (DDVI).
Xu, Zhao, Paisley & Zeng, "Diffusion bridge variational inference for deep Gaussian
processes", 2025 (DBVI).
Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020 (the step).
Nichol & Dhariwal, "Improved denoising diffusion probabilistic models", ICML 2021 (learned
reverse variances).
Kingma, Salimans, Poole & Ho, "Variational diffusion models", NeurIPS 2021, and Karras,
Aittala, Aila & Laine, "Elucidating the design space of diffusion-based generative models",
NeurIPS 2022 (log-SNR grid, denoiser parameterisation).
Vargas, Grathwohl & Doucet, "Denoising diffusion samplers", ICLR 2023 (the path bound with
an Ornstein-Uhlenbeck reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr

from bayesgen.errors import check_int
from bayesgen.families.base import Family, PathSurrogate, WhitenedCoordinates, check_latent
from bayesgen.families.network_scan import scan_with_network, stop_parameter_gradient
from bayesgen.families.stochastic_flow import require_inverse

_LOG_2PI = math.log(2.0 * math.pi)


class DiffusionSchedule(NamedTuple):
    """Time grid ``0 = t_0 < ... < t_N = T`` and the reference's signal ``abar_k`` at each.

    ``abar[0] = 1``; the per-step factor is ``a_k = sqrt(abar_k / abar_{k-1})``.
    """

    times: jax.Array  # (N + 1,)
    alpha_bar: jax.Array  # (N + 1,)

    @property
    def num_steps(self) -> int:
        return int(self.times.shape[0]) - 1

    @property
    def step_factor(self):
        """``a_k`` for k = 1..N, shape (N,)."""
        return jnp.sqrt(self.alpha_bar[1:] / self.alpha_bar[:-1])

    @property
    def signal_to_end(self):
        """``A_k = sqrt(abar_N / abar_k)``: how much of ``u_k`` is left in ``u_N``, (N + 1,)."""
        return jnp.sqrt(self.alpha_bar[-1] / self.alpha_bar)


def linear_beta_schedule(
    num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0
) -> DiffusionSchedule:
    """Uniform steps on [0, 1] with ``beta(t) = beta_min + (beta_max - beta_min) t``.

    ``abar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)``: the variance-preserving
    schedule of Song et al. (2021); the defaults leave ``abar(1) = 4.3e-5`` of the signal.
    """
    check_int("num_steps", num_steps)
    if not 0 <= beta_min <= beta_max or beta_max <= 0:
        raise ValueError(
            f"need 0 <= beta_min <= beta_max and beta_max > 0, got {beta_min!r}, {beta_max!r}"
        )
    t = jnp.linspace(0.0, 1.0, num_steps + 1)
    return DiffusionSchedule(t, jnp.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t**2))


def log_snr_schedule(
    num_steps: int, log_snr_max: float = 10.0, log_snr_min: float = -10.0
) -> DiffusionSchedule:
    """Steps uniform in the log signal-to-noise ratio ``lambda = log(abar / (1 - abar))``.

    ``t_0 = 0`` is the clean end (``abar = 1``); ``t_1 .. t_N`` (times ``k / N``) have
    ``lambda`` falling linearly from ``log_snr_max`` to ``log_snr_min``. The first step's
    noise, sd ``sigmoid(-log_snr_max)^(1/2)`` (0.0067 for the default 10), is the finest
    scale the family resolves in whitened units: the reverse step adds that much noise last,
    so a posterior narrower than it cannot be represented (a uniform grid in t puts the
    last step at sd 0.11 for 32 steps of the linear schedule). The default end leaves
    ``abar_N = 4.5e-5`` of the signal. Equal steps in log-SNR are the discretisation of
    Kingma et al. (2021) and Karras et al. (2022).
    """
    check_int("num_steps", num_steps)
    if not log_snr_max > log_snr_min:
        raise ValueError(
            f"need log_snr_max > log_snr_min, got {log_snr_max!r} and {log_snr_min!r}"
        )
    lam = jnp.linspace(log_snr_max, log_snr_min, num_steps)
    abar = jnp.concatenate([jnp.ones(1), jax.nn.sigmoid(lam)])
    return DiffusionSchedule(jnp.linspace(0.0, 1.0, num_steps + 1), abar)


def _log_std_normal(u):
    return -0.5 * jnp.sum(u * u + _LOG_2PI, axis=-1)


def bridge_log_h(u, signal, start_loc, start_scale):
    """``log h(u, t)`` for the Doob transform that ends the reference in N(mu, diag s^2).

    ``h(u, t) = E[rho(U_T) / N(U_T; 0, I) | U_t = u]`` with ``U_T | U_t ~ N(A u, (1 - A^2) I)``,
    ``A = signal``. Per coordinate, with ``V = 1 - A^2`` and ``D = 1 + V (1/s^2 - 1) > 0``,

        log h = -log s - log(D) / 2 + (2 A u mu / s^2 + V mu^2 / s^4 - (1/s^2 - 1) A^2 u^2) / (2 D)
                - mu^2 / (2 s^2),

    which is finite at t = T (V = 0, where it is log rho - log N(0, 1)) and zero for rho =
    N(0, I).
    """
    const, lin, quad = bridge_coefficients(signal, start_loc, start_scale)
    return jnp.sum(const + lin * u - 0.5 * quad * u * u, axis=-1)


def bridge_coefficients(signal, start_loc, start_scale):
    """``(c, b, P)`` with ``log h(u, t) = sum_i c_i + b_i u_i - P_i u_i^2 / 2`` (bridge_log_h).

    With ``q = s^2 D = V + A^2 s^2``: ``c = -log(q) / 2 - A^2 mu^2 / (2 q)``, ``b = A mu / q``,
    ``P = (1 - s^2) A^2 / q``, the same coefficients as :func:`bridge_log_h`'s with ``1/s^2``
    cancelled by hand. Written with ``1/s^2`` the constant had two ~ ``mu^2 / s^2`` terms
    that cancel, and in float32 a start scale of 1.6e-6 (an AutoDBVI deep-GP fit on yacht
    drove one there) left ~1e6 nats of round-off in the loss.
    """
    a2 = signal * signal
    s2 = start_scale * start_scale
    q = (1.0 - a2) + a2 * s2
    mu = start_loc
    const = -0.5 * jnp.log(q) - 0.5 * a2 * mu * mu / q
    return const, signal * mu / q, (1.0 - s2) * a2 / q


class DenoisingDiffusion(PathSurrogate, Family, WhitenedCoordinates):
    """Reverse-time diffusion family with a path-space lower-bound surrogate (module docstring).

    Parameters
    ----------
    network : ``(u, t) -> (correction, log_var_scale)`` for ``u`` (d,) and a time ``t`` in
        [0, 1]: the learned correction (see ``parameterization``) and the log of the reverse
        step's variance relative to the reference's, per coordinate (0 keeps DDPM's choice).
    parameterization : ``"denoiser"`` (default): the correction ``g`` is to the denoiser
        with Karras et al.'s (2022) output scaling, ``E[u_0 | u_t] = sqrt(abar_t) u +
        sqrt(1 - abar_t) g``, so the score is ``-u + sqrt(abar_t / (1 - abar_t)) g``: an
        output of unit scale moves a step by about its own noise at every noise level, and
        covers the large scores of narrow posteriors at low noise. ``"score"``: the
        correction ``f`` is to the score, ``s = -u + f``.
    precond_loc, precond_scale : fixed preconditioner ``z = m0 + L0 u`` ((d,) and (d,) or
        (d, d) lower triangular).
    schedule : :class:`DiffusionSchedule` of the reference process.
    start_loc, start_scale : the start ``rho = N(mu, diag s^2)`` of the reverse process and
        the end of the bridged reference (DBVI); ``None`` for N(0, I) (DDVI).
    stick_the_landing : differentiate the variational path density through the path only,
        at frozen parameters (the sticking-the-landing estimator, Roeder, Wu & Duvenaud,
        2017; Vargas et al., 2023 use it for diffusion samplers): the dropped term, the
        score of q at a fixed path, has mean zero, and without it the gradient's variance
        vanishes at the optimum. The loss value is unchanged. The frozen network is the
        same evaluation with the parameters' gradient stopped, so it costs no second pass
        (:func:`~bayesgen.families.network_scan.scan_with_network`).
    param_grad : how the network's parameter gradient is taken over the steps:
        ``"batched"`` (default), one VJP of the network batched over all steps after the
        reverse pass; ``"per_step"``, plain autodiff through the scan (accumulated step by
        step). The same gradient up to round-off; with the first a 5-layer deep GP's fit
        takes a step in about 1/1.6 of the time (:mod:`bayesgen.families.network_scan`),
        the second is kept to check it against.
    remat : recompute each step in the backward pass (memory O(1) in the steps instead of
        O(N), about a third more compute).
    final_layer : an invertible map ``u_0 -> (T(u_0), log|det dT/du_0|)`` applied at the end
        of the path (module docstring), a
        :class:`~bayesgen.families.stochastic_flow.Layer` (its inverse is needed for
        :meth:`reference_log_ratio`); ``None`` for none.
    """

    density: ClassVar[str] = "lower_bound"

    def __init__(
        self,
        network: Callable,
        precond_loc,
        precond_scale,
        schedule: DiffusionSchedule,
        *,
        start_loc=None,
        start_scale=None,
        remat: bool = False,
        parameterization: str = "denoiser",
        stick_the_landing: bool = False,
        param_grad: str = "batched",
        final_layer: Callable | None = None,
        validate_args=None,
    ):
        self.stick_the_landing = bool(stick_the_landing)
        if param_grad not in ("batched", "per_step"):
            raise ValueError(f"param_grad must be 'batched' or 'per_step', got {param_grad!r}")
        self.param_grad = param_grad
        self.final_layer = final_layer
        if parameterization not in ("denoiser", "score"):
            raise ValueError(
                f"parameterization must be 'denoiser' or 'score', got {parameterization!r}"
            )
        self.parameterization = parameterization
        if not isinstance(schedule, DiffusionSchedule):
            raise TypeError(f"schedule must be a DiffusionSchedule, got {type(schedule).__name__}")
        self.network = network
        self.precond_loc = jax.lax.stop_gradient(precond_loc)
        self.precond_scale = jax.lax.stop_gradient(precond_scale)
        self.schedule = schedule
        d = jnp.shape(precond_loc)[-1]
        if (start_loc is None) != (start_scale is None):
            raise ValueError("give both start_loc and start_scale, or neither")
        self.bridged = start_loc is not None
        if self.bridged:
            start_loc = jnp.broadcast_to(jnp.asarray(start_loc), (d,))
            start_scale = jnp.broadcast_to(jnp.asarray(start_scale), (d,))
        self.start_loc = start_loc
        self.start_scale = start_scale
        self.remat = bool(remat)
        super().__init__(d, validate_args=validate_args)

    # --- one path -------------------------------------------------------------------------
    def _step_moments(self, network_output, u, a_k, var_k, abar_k):
        correction, log_var_scale = network_output
        if self.parameterization == "denoiser":
            drift = jnp.sqrt(abar_k / (1.0 - abar_k)) * correction
        else:
            drift = correction
        log_var_scale = jnp.broadcast_to(log_var_scale, u.shape)
        return a_k * u + var_k * drift / a_k, log_var_scale

    def _reverse_step(self, network_output, u, a_k, var_k, abar_k, xi):
        """One reverse step from ``u_k`` with standard normal ``xi``: ``(u_{k-1}, log c_k)``."""
        mean, log_c = self._step_moments(network_output, u, a_k, var_k, abar_k)
        return mean + jnp.sqrt(var_k) * jnp.exp(0.5 * log_c) * xi, log_c

    def _reverse_inputs(self):
        """Per step in the order the reverse path runs (k = N, ..., 1, the step from t_k down
        to t_{k-1}): ``(a_k, 1 - a_k^2, t_k, abar_k)``."""
        sched = self.schedule
        a = sched.step_factor  # (N,)
        return a[::-1], (1.0 - a * a)[::-1], sched.times[1:][::-1], sched.alpha_bar[1:][::-1]

    def _path_start(self, noise_start):
        """``u_N`` from a standard normal draw: N(0, I), or the learned start when bridged."""
        if self.bridged:
            return self.start_loc + self.start_scale * noise_start
        return noise_start

    def _path_noises(self, key, size):
        """Start and step noises of ``size`` paths: (size, d) and (size, N, d)."""
        d, n = self.latent_dim, self.schedule.num_steps
        k_start, k_path = jr.split(key)
        return jr.normal(k_start, (size, d)), jr.normal(k_path, (size, n, d))

    def _path(self, noise_start, noises):
        """Run the reverse process from one start noise; return ``(u_0, path term)``."""
        sched = self.schedule
        stl = self.stick_the_landing
        u_end = self._path_start(noise_start)
        log_w0 = _log_std_normal(u_end)
        if self.bridged and stl:
            # log rho(u_N) of q at frozen parameters, of r_h at live ones: the values cancel,
            # the gradients do not
            loc, scale = (jax.lax.stop_gradient(x) for x in (self.start_loc, self.start_scale))
            log_rho = lambda p_loc, p_scale: -0.5 * jnp.sum(  # noqa: E731
                ((u_end - p_loc) / p_scale) ** 2 + 2.0 * jnp.log(p_scale) + _LOG_2PI)
            log_w0 = log_w0 + log_rho(loc, scale) - log_rho(self.start_loc, self.start_scale)

        def step(apply, carry, inputs):
            u, acc = carry
            a_k, var_k, t_k, abar_k, xi = inputs
            live, frozen = apply(u, t_k)
            u_prev, log_c = self._reverse_step(live, u, a_k, var_k, abar_k, xi)
            if stl:  # log F_k at frozen parameters, differentiated through the path only
                mean, log_c = self._step_moments(frozen, u, a_k, var_k, abar_k)
                res = (u_prev - mean) * jnp.exp(-0.5 * log_c) / jnp.sqrt(var_k)
            else:
                res = xi
            r = u - a_k * u_prev
            acc = acc - 0.5 * jnp.sum(res * res + log_c) + 0.5 * jnp.sum(r * r) / var_k
            return (u_prev, acc), None

        inputs = (*self._reverse_inputs(), noises)
        (u0, acc), _ = scan_with_network(
            step, self.network, (u_end, log_w0), inputs, (u_end, sched.times[-1]),
            batched_param_grad=self.param_grad == "batched", remat=self.remat)
        if self.bridged:
            signal = sched.signal_to_end[0]
            acc = acc + bridge_log_h(u0, signal, self.start_loc, self.start_scale)
        if self.final_layer is not None:
            v, log_det = self.final_layer(u0)
            return v, acc - log_det
        return u0, acc

    def corrections(self, key, num_paths: int = 1):
        """The network's correction at every step of ``num_paths`` reverse paths.

        Returns ``(num_paths, N, d)``, the step from ``t_N`` first (the order the path runs),
        without gradient: a diagnostic, e.g. how much of it sits at a guide's
        ``max_correction`` (:meth:`bayesgen.guides.AutoDDVI.correction_saturation`).
        """
        starts, noises = self._path_noises(key, num_paths)
        steps = self._reverse_inputs()

        def one(noise_start, xis):
            def step(u, inputs):
                (a_k, var_k, t_k, abar_k), xi = inputs
                output = self.network(u, t_k)
                u_prev, _ = self._reverse_step(output, u, a_k, var_k, abar_k, xi)
                return u_prev, jnp.broadcast_to(output[0], u.shape)

            return jax.lax.scan(step, self._path_start(noise_start), (steps, xis))[1]

        return jax.lax.stop_gradient(jax.vmap(one)(starts, noises))

    # --- the reference direction (EUBO) -----------------------------------------------------
    def _reference_path(self, key, u0):
        """Draw ``u_{1:N}`` from the (bridged) reference started at ``u0``; (N + 1, d) path."""
        sched = self.schedule
        a = sched.step_factor
        var = 1.0 - a * a
        signal = sched.signal_to_end[1:]
        noises = jr.normal(key, (sched.num_steps,) + u0.shape)

        def step(u, inputs):
            a_k, var_k, sig_k, xi = inputs
            if self.bridged:  # B_k(u' | u) h_k(u') is Gaussian in u'
                _, lin, quad = bridge_coefficients(sig_k, self.start_loc, self.start_scale)
                prec = 1.0 / var_k + quad
                mean = (a_k * u / var_k + lin) / prec
                nxt = mean + xi / jnp.sqrt(prec)
            else:
                nxt = a_k * u + jnp.sqrt(var_k) * xi
            return nxt, nxt

        _, rest = jax.lax.scan(step, u0, (a, var, signal, noises))
        return jnp.concatenate([u0[None], rest], axis=0)

    def _path_log_ratio(self, path):
        """``log q(path) - log r(path | u_0)`` for a given path (N + 1, d) in whitened units."""
        sched = self.schedule
        a = sched.step_factor
        var = 1.0 - a * a
        network = self.network
        if self.stick_the_landing:  # as on the variational path: parameters frozen
            network = stop_parameter_gradient(network, (path[0], sched.times[0]))
        u_prev, u = path[:-1], path[1:]

        def one(u_k, u_km1, a_k, var_k, t_k, abar_k):
            mean, log_c = self._step_moments(network(u_k, t_k), u_k, a_k, var_k, abar_k)
            res = (u_km1 - mean) * jnp.exp(-0.5 * log_c) / jnp.sqrt(var_k)
            r = u_k - a_k * u_km1
            return -0.5 * jnp.sum(res * res + log_c) + 0.5 * jnp.sum(r * r) / var_k

        terms = jax.vmap(one)(u, u_prev, a, var, sched.times[1:], sched.alpha_bar[1:])
        out = _log_std_normal(path[-1]) + jnp.sum(terms)
        if self.bridged:
            out = out + bridge_log_h(path[0], sched.signal_to_end[0], self.start_loc,
                                     self.start_scale)
        return out

    def reference_log_ratio(self, key, value):
        """The path term on reference paths started at ``value`` (for the EUBO).

        For ``z`` drawn from the posterior and ``u_{1:N}`` from the (bridged) reference
        started at it, ``E[log p(x, z) - reference_log_ratio] = log p(x) + KL(R || Q) >=
        log p(x)``: the evidence upper bound (EUBO), the mass-covering counterpart of the
        ELBO, which needs exact posterior draws (benchmarks with known answers).
        """
        check_latent(value, self.latent_dim)
        flat = jnp.reshape(self.to_whitened(value), (-1, self.latent_dim))
        keys = jr.split(key, flat.shape[0])
        inverse = None
        if self.final_layer is not None:
            inverse = require_inverse(self.final_layer, "final_layer")

        def one(k, v):
            log_det_inv = 0.0
            u0 = v
            if inverse is not None:  # log q(v) = log q(u_0) + log|det dT^-1/dv|
                u0, log_det_inv = inverse(v)
            return self._path_log_ratio(self._reference_path(k, u0)) + log_det_inv

        out = jax.vmap(one)(keys, flat)
        return out.reshape(jnp.shape(value)[:-1]) - self._log_det_precond()

    def sample_with_intermediates(self, key, sample_shape=()):
        d = self.latent_dim
        shape = tuple(sample_shape) + self.batch_shape
        size = math.prod(shape)
        noise_start, noises = self._path_noises(key, size)
        if size == 1:
            # one path unbatched: a vmap over one path leaves XLA's CPU backend transposed
            # layouts for the network's parameter gradient, and a 5-layer deep GP's step
            # took 1.4x as long (docs/benchmarks.md)
            u0, log_q = jax.tree.map(lambda a: a[None], self._path(noise_start[0], noises[0]))
        else:
            u0, log_q = jax.vmap(self._path)(noise_start, noises)
        z = self.to_latent(u0)
        log_q = log_q - self._log_det_precond()
        return z.reshape(shape + (d,)), [log_q.reshape(shape)]

