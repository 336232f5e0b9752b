"""Score-based semi-implicit guides: AutoKSIVI (kernel Stein) and AutoSIVISM (score matching).

Both are :class:`~bayesgen.guides.semi_implicit.AutoSIVI` -- the same semi-implicit family
in the preconditioner's whitened coordinates, so ``Predictive``, ``sample_posterior``,
:func:`bayesgen.diagnose` and ``Trace_ELBO`` work with them unchanged (for a guide with
mutable state -- AutoSIVISM, or AutoKSIVI with annealing -- ``Trace_ELBO`` with one particle
only: numpyro drops mutable state when ``num_particles > 1``, and the changed state
structure then breaks ``SVI.run``) -- plus the objective they are meant to be trained
with, returned by ``default_loss`` (which :func:`bayesgen.fit` uses):

* :class:`AutoKSIVI` -> :class:`~bayesgen.objectives.KernelSteinLoss` (KSIVI);
* :class:`AutoSIVISM` -> :class:`~bayesgen.objectives.ScoreMatchingLoss` (SIVI-SM), with the
  critic network ``f: R^d -> R^d`` (whitened coordinates), its optax state and a step
  counter held in numpyro mutable state, so that stock ``SVI`` carries, jits and
  checkpoints the inner problem.

Conditional scale: both guides default to ``conditional_scale="global"`` (one learned sigma
vector, as in the authors' code) rather than AutoSIVI's per-noise sigma. The objectives use
the conditional score ``-u / sigma(eps)``; a per-noise sigma can shrink in one region of
the noise at no cost to the marginal, and the estimators' variance then grows like
``1 / sigma^2`` (KSIVI on the 5-d conjugate Gaussian with ``"mixing"`` reached the
``min_scale`` floor and diverged after ~600 steps; with ``"global"`` it converged). Pass
``conditional_scale="mixing"`` (with a ``min_scale`` well above 0) where the posterior's
scale varies a lot.

Batch size: score-based losses are estimated from a batch of B particles that interact
(KSIVI's pairs, SIVI-SM's critic fit), and a few particles give too noisy an estimate to
train on, so ``default_loss(num_particles)`` uses ``B = max(num_particles, min_particles)``
(default ``min_particles = 128``).

References
----------
Cheng, Yu, Xie, Zhang & Zhang, "Kernel semi-implicit variational inference", ICML 2024.
Yu & Zhang, "Semi-implicit variational inference via score matching", ICLR 2023.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.random as jr
import optax
from flax import nnx
from numpyro.primitives import mutable

from bayesgen.errors import check_int, check_positive
from bayesgen.guides.base import default_width
from bayesgen.guides.semi_implicit import AutoSIVI
from bayesgen.nn import MLP, restore_keys, split_params, stringify_keys, zero_last_layer
from bayesgen.objectives import (
    KERNELS,
    STATISTICS,
    CriticState,
    KernelSteinLoss,
    ScoreMatchingLoss,
    _check_anneal,
)

__all__ = ["AutoKSIVI", "AutoSIVISM"]


class AutoKSIVI(AutoSIVI):
    """Semi-implicit guide trained by kernel Stein discrepancy (KSIVI; Cheng et al., ICML 2024).

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    kernel : ``"imq"`` (default) or ``"gaussian"``.
    statistic : ``"u"`` (default) or ``"v"`` (see
        :class:`~bayesgen.objectives.KernelSteinLoss`).
    bandwidth : fixed kernel bandwidth (whitened squared units); default the median heuristic.
    min_particles : smallest batch ``default_loss`` uses (default 128).
    anneal_steps : target-score annealing over this many steps (default 0: off). When on,
        the guide keeps a step counter in numpyro mutable state (``{prefix}_step``).
    anneal_start : beta_0 of the annealing (default 0.1).
    conditional_scale : default ``"global"`` here (see the module docstring).
    **kwargs : as :class:`~bayesgen.guides.semi_implicit.AutoSIVI` (``noise_dim``,
        ``hidden``, ``depth``, ``init_scale``, ...).
    """

    def __init__(
        self,
        model,
        *,
        kernel: str = "imq",
        statistic: str = "u",
        bandwidth: float | None = None,
        min_particles: int = 128,
        anneal_steps: int = 0,
        anneal_start: float = 0.1,
        **kwargs,
    ):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        check_positive("bandwidth", bandwidth, allow_none=True)
        check_int("min_particles", min_particles, minimum=2)
        _check_anneal(anneal_steps, anneal_start)
        self.kernel, self.statistic, self.bandwidth = kernel, statistic, bandwidth
        self.min_particles = min_particles
        self.anneal_steps, self.anneal_start = anneal_steps, float(anneal_start)
        kwargs.setdefault("conditional_scale", "global")
        super().__init__(model, **kwargs)

    @property
    def step_site(self) -> str | None:
        """Name of the mutable step counter (``None`` when annealing is off)."""
        return f"{self.prefix}_step" if self.anneal_steps else None

    def default_loss(self, num_particles: int = 1) -> KernelSteinLoss:
        """``KernelSteinLoss`` with ``B = max(num_particles, min_particles)`` and this guide's settings."""
        return KernelSteinLoss(
            max(int(num_particles), self.min_particles), self.kernel, self.statistic,
            bandwidth=self.bandwidth, anneal_steps=self.anneal_steps,
            anneal_start=self.anneal_start,
        )

    def _get_posterior(self):
        if self.anneal_steps:
            mutable(self.step_site, jnp.zeros((), jnp.int32))
        return super()._get_posterior()


class AutoSIVISM(AutoSIVI):
    """Semi-implicit guide trained by score matching (SIVI-SM; Yu & Zhang, ICLR 2023).

    The critic ``f_psi: R^d -> R^d`` (an MLP in the whitened coordinates, last layer zero at
    the start so the first losses are 0) is trained inside each SVI step by its own Adam
    (``b2 = 0.99`` as in the paper) at ``critic_learning_rate``; keep that at least the
    family's learning rate, or a stale critic biases the family's gradient.

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    critic_hidden, critic_depth : critic width (default ``clip(2 d, 64, 256)``) and hidden
        layers (default 2).
    critic_learning_rate : the critic's Adam learning rate (default 1e-2; ``fit``'s default
        for the family peaks at 5e-3).
    critic_steps : critic updates per SVI step (default 1).
    min_particles : smallest batch ``default_loss`` uses (default 128).
    anneal_steps, anneal_start : target-score annealing (default off), counted by the
        critic's step counter.
    conditional_scale : default ``"global"`` here (see the module docstring).
    **kwargs : as :class:`~bayesgen.guides.semi_implicit.AutoSIVI`.

    Notes
    -----
    The critic state is the numpyro mutable site ``{prefix}_critic`` (a
    :class:`~bayesgen.objectives.CriticState`). ``Trace_ELBO(num_particles=1)`` carries it
    through unchanged; numpyro's ``Trace_ELBO`` with more particles drops mutable state
    (with a warning), which changes the SVI state's structure between steps, so train this
    guide with its ``default_loss`` (or a one-particle ELBO).
    """

    def __init__(
        self,
        model,
        *,
        critic_hidden: int | None = None,
        critic_depth: int = 2,
        critic_learning_rate: float = 1e-2,
        critic_steps: int = 1,
        min_particles: int = 128,
        anneal_steps: int = 0,
        anneal_start: float = 0.1,
        **kwargs,
    ):
        check_int("critic_hidden", critic_hidden, allow_none=True)
        check_int("critic_depth", critic_depth, minimum=0)
        check_positive("critic_learning_rate", critic_learning_rate)
        check_int("critic_steps", critic_steps, minimum=0)
        check_int("min_particles", min_particles)
        _check_anneal(anneal_steps, anneal_start)
        self.critic_hidden, self.critic_depth = critic_hidden, critic_depth
        self.critic_learning_rate = float(critic_learning_rate)
        self.critic_steps = critic_steps
        self.min_particles = min_particles
        self.anneal_steps, self.anneal_start = anneal_steps, float(anneal_start)
        self.critic_optimizer = optax.adam(self.critic_learning_rate, b1=0.9, b2=0.99)
        self._critic_apply = None
        self._critic_template = None
        self._critic_init = None
        kwargs.setdefault("conditional_scale", "global")
        super().__init__(model, **kwargs)

    @property
    def critic_site(self) -> str:
        """Name of the mutable site holding the critic's :class:`CriticState`."""
        return f"{self.prefix}_critic"

    def _build(self, key):
        k_family, k_critic = jr.split(key)
        super()._build(k_family)
        d = self.latent_dim
        width = self.critic_hidden or default_width(d)
        net = MLP(d, d, width=width, depth=self.critic_depth, rngs=nnx.Rngs(params=k_critic))
        zero_last_layer(net)
        apply, template = split_params(net)
        params = stringify_keys(template)
        self._critic_apply, self._critic_template = apply, template
        self._critic_init = CriticState(
            params, self.critic_optimizer.init(params), jnp.zeros((), jnp.int32)
        )

    def critic_apply(self, params, w):
        """The critic ``f_psi(w)`` at parameters ``params`` (as stored in the critic state)."""
        return self._critic_apply(restore_keys(params, self._critic_template), w)

    def default_loss(self, num_particles: int = 1) -> ScoreMatchingLoss:
        """``ScoreMatchingLoss`` with ``B = max(num_particles, min_particles)`` and this guide's settings."""
        return ScoreMatchingLoss(
            max(int(num_particles), self.min_particles), self.critic_steps,
            anneal_steps=self.anneal_steps, anneal_start=self.anneal_start,
        )

    def _get_posterior(self):
        mutable(self.critic_site, self._critic_init)
        return super()._get_posterior()

