"""Controlled Monte Carlo diffusion guide: AutoCMCD (a path-space lower-bound surrogate).

Fits :class:`~bayesgen.families.cmcd.ControlledMonteCarloDiffusion` in the preconditioner's
whitened coordinates: ``num_steps`` Langevin steps that anneal from the preconditioner's
Gaussian to the posterior, with a learned control (a flax :class:`~bayesgen.nn.ControlNet`,
zero at the start), learned per-step, per-coordinate step sizes and a learned monotone
annealing schedule. Like AutoSNF it evaluates the model's density inside the guide (see
:class:`~bayesgen.guides.base.ModelDensityGuide`): no ``numpyro.param`` sites and no
subsampled plates.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
from flax import nnx
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int, check_positive
from bayesgen.families.cmcd import ControlledMonteCarloDiffusion
from bayesgen.families.stochastic_flow import linear_schedule, monotone_schedule
from bayesgen.guides.base import ModelDensityGuide, default_width
from bayesgen.nn import ControlNet, nnx_param


class AutoCMCD(ModelDensityGuide):
    """Controlled Monte Carlo diffusion guide (Vargas, Padhy, Blessing & Nuesken, ICLR 2024).

    The family's ``log_prob`` is the path term ``log q(path) - log r(path | z)``: stock
    ``Trace_ELBO`` then minimises minus a lower bound on log p(x), and ``exp(log p - it)`` is an
    exact importance weight (``bayesgen.diagnose`` uses it). Cost per particle and step:
    ``num_steps`` model gradients and control-network passes, each differentiated again in
    the backward pass.

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites, no ``numpyro.param`` sites
        and no subsampled plate.
    num_steps : B, annealing steps (the bound's discretisation gap shrinks as B grows).
    step_size : initial step size in whitened units (learned per step and coordinate, kept
        positive by a softplus). The total time ``B * step_size`` is what lets plain Langevin
        annealing mix; the control makes up for a short one.
    control : learn the control network (default); ``False`` gives uncontrolled Langevin
        annealing (the unadjusted Langevin AIS of Thin et al. 2021 / Geffner & Domke 2021).
    schedule : ``"learned"`` (default; monotone increments ending at 1, linear at the start)
        or ``"linear"`` (fixed ``b / B``).
    hidden, depth : control-network width (default ``clip(2 d, 64, 256)``) and hidden layers.
    score_clip : soft clip ``c tanh(g / c)`` of the whitened target score per coordinate in
        the drift and the control's input, or ``None`` (the weights stay exact either way).
    remat : recompute the steps in the backward pass (memory O(1) in B).
    init_scale, init_steps, init_options, prefix, init_loc_fn, seed :
        as :class:`~bayesgen.guides.base.PreconditionedGuide`.
    """

    def __init__(
        self,
        model,
        *,
        num_steps: int = 32,
        step_size: float = 0.05,
        control: bool = True,
        schedule: str = "learned",
        hidden: int | None = None,
        depth: int = 2,
        score_clip: float | None = 100.0,
        remat: bool = False,
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        check_int("num_steps", num_steps)
        check_int("depth", depth, minimum=0)
        check_int("hidden", hidden, allow_none=True)
        check_positive("step_size", step_size)
        if schedule not in ("learned", "linear"):
            raise ValueError(f"schedule must be 'learned' or 'linear', got {schedule!r}")
        check_positive("score_clip", score_clip, allow_none=True)
        self.num_steps = num_steps
        self.step_size = float(step_size)
        self.use_control = bool(control)
        self.schedule = schedule
        self.hidden = hidden
        self.depth = depth
        self.score_clip = score_clip
        self.remat = bool(remat)
        self._control_template = None
        super().__init__(
            model, init_scale=init_scale, init_steps=init_steps, init_options=init_options,
            prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    def _build(self, key):
        if not self.use_control:
            return
        d = self.latent_dim
        width = self.hidden or default_width(d)
        self._control_template = ControlNet(d, width=width, depth=self.depth,
                                            rngs=nnx.Rngs(params=key))

    def _get_posterior(self):
        d, nb, p = self.latent_dim, self.num_steps, self.prefix
        step_sizes = numpyro.param(f"{p}_step_size", jnp.full((nb, d), self.step_size),
                                   constraint=constraints.softplus_positive)
        if self.schedule == "learned":
            lambdas = monotone_schedule(numpyro.param(f"{p}_schedule_logits", jnp.zeros(nb)))
        else:
            lambdas = linear_schedule(nb)
        control = None
        if self.use_control:
            control = nnx_param(f"{p}_control", self._control_template)
        pre_loc, pre_scale = self.preconditioner
        return ControlledMonteCarloDiffusion(
            self.model_log_density(), pre_loc, pre_scale, step_sizes=step_sizes,
            lambdas=lambdas, control=control, score_clip=self.score_clip, remat=self.remat,
        )
