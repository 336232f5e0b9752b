"""Stochastic normalizing flow guide: AutoSNF (a path-space lower-bound surrogate).

Fits :class:`~bayesgen.families.stochastic_flow.StochasticNormalizingFlow` in the
preconditioner's whitened coordinates: an invertible flow (RealNVP couplings and a learned
affine map, started at the identity) and ``B`` blocks of ``K`` Metropolis-adjusted Langevin
(MALA) or Langevin steps on energies that move from the start's ``|u|^2 / 2`` to the
posterior, then ``final_steps`` MALA steps on the posterior itself.

Where the steps run (``langevin_space``)
    ``"latent"`` (default): all steps run in the flow's input coordinates, on the posterior
    pulled back through the flow, and the flow maps their end to the latent (the family's
    ``final_layer``). Where the flow is good the pulled-back target is close to N(0, I), so
    one step size suits the whole space; the steps correct what the flow gets wrong.
    ``"interleaved"``: the paper's layout, the flow's layers between the blocks and the
    steps on the whitened latent itself. On targets whose scale varies strongly (Neal's
    funnel) fixed step sizes there are too large in some regions and too small in others:
    on funnel-10 (3000 steps, 8 particles) the interleaved layout ended at an ELBO 2 nats
    below the latent one, sd(v) 1.6 against 2.7.

The stochastic steps need the model's log-density and its gradient inside the guide. The
guide evaluates the model at the arguments of the current call (``SVI`` passes the model's
arguments to the guide), under ``numpyro.handlers.block`` so the model's sites stay out of
the guide's trace. Where a call's arguments do not have the structure of the ones the guide
was set up with (``Predictive(model, guide=guide, ...)()`` without the data, for instance),
it uses the set-up arguments: the draws are then from the posterior the guide was fitted to.
For the same reason the model may have no ``numpyro.param`` sites (the guide cannot reach
their values) and no subsampled plate (a minibatch potential would make the Langevin target
random): AutoSNF refuses both at set-up.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int, check_positive
from bayesgen.families.flows import build_flow
from bayesgen.families.stochastic_flow import (
    StochasticNormalizingFlow,
    affine_layer,
    bijection_block,
    chain_layers,
    elementwise_affine_block,
    linear_schedule,
    monotone_schedule,
    stack_bijection_blocks,
)
from bayesgen.guides.base import ModelDensityGuide

SNF_FLOWS = ("realnvp", "affine", "none")


def coupling_templates(key, dim: int, num_layers: int, num_blocks: int, hidden: int,
                       depth: int):
    """RealNVP couplings for a flow family: ``(trainable, fixed, static)`` of ``num_blocks``
    blocks of ``num_layers // num_blocks`` couplings that share a structure (one lax.scan).

    Built eagerly: flowjax modules close over arrays, so they cannot be built under jit.
    """
    template = build_flow("realnvp", key, dim, num_layers=num_layers, hidden=hidden, depth=depth)
    arrays, static = stack_bijection_blocks(template, num_blocks)
    trainable, fixed = eqx.partition(arrays, eqx.is_inexact_array)
    return trainable, fixed, static


def registered_coupling_arrays(name: str, templates):
    """The couplings' arrays with the trainable ones registered as the numpyro param ``name``."""
    trainable, fixed, _ = templates
    if callable(trainable):  # numpyro treats a callable init value as a lazy initialiser
        trainable = numpyro.param(name, lambda _: trainable)
    else:
        trainable = numpyro.param(name, trainable)
    return eqx.combine(trainable, fixed)


def learned_affine(prefix: str, dim: int, dense: bool):
    """The learned affine map ``u -> loc + scale u`` (identity at the start) as a layer:
    params ``{prefix}_loc`` and ``{prefix}_scale_tril`` (dense) or ``{prefix}_scale``."""
    loc = numpyro.param(f"{prefix}_loc", jnp.zeros(dim))
    if dense:
        scale = numpyro.param(f"{prefix}_scale_tril", jnp.eye(dim),
                              constraint=constraints.softplus_lower_cholesky)
    else:
        scale = numpyro.param(f"{prefix}_scale", jnp.ones(dim),
                              constraint=constraints.softplus_positive)
    return affine_layer(loc, scale)


class AutoSNF(ModelDensityGuide):
    """Stochastic normalizing flow guide (Wu, Koehler & Noe, NeurIPS 2020).

    The family's ``log_prob`` is the path term ``log q(path) - log r(path | z)``: the loss of
    stock ``Trace_ELBO`` is then minus a lower bound on log p(x), and ``exp(log p - it)`` an
    exact importance weight (``bayesgen.diagnose`` uses it). Cost per particle and step:
    ``B K`` model gradients (twice that with MALA: a proposal is checked for overflow
    first), each differentiated again in the backward pass (a Hessian-vector product), plus
    ``final_steps`` model gradients without a backward pass; in the latent layout each also
    runs the flow forward and backward.

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites, no ``numpyro.param`` sites
        and no subsampled plate (the steps need the full, fixed model density; use AutoDDVI
        or AutoDBVI, which need no model gradient inside the guide, otherwise).
    num_blocks : B, blocks of stochastic steps (each with its own step sizes and energy).
    langevin_steps : K, steps per block; 0 gives a plain flow (exact density).
    final_steps : MALA steps on the posterior after the last block (default 25 with MALA, 0
        without: unadjusted final steps are just more trained steps). They leave the path
        weight, the loss and its gradient unchanged (their Delta S telescope) and run
        without a backward pass; they only improve the draws (funnel-10: sd(v) 2.60 -> 2.70
        -> 2.78 with 0, 10, 25). Their step size is the last block's, which the loss does not
        train for MALA: it stays at ``step_size``. Unadjusted Langevin final steps are
        trained like the others.
    mala : Metropolis-adjust each step (default). The accept decision carries no gradient;
        proposals where the model overflows are rejected without breaking the gradient.
        ``False`` gives unadjusted Langevin steps, whose estimator is unbiased but which can
        diverge where the target is steep (it did on funnel-10).
    flow : the invertible layers: ``"realnvp"`` (default: ``B * coupling_layers`` affine
        couplings and a learned affine map), ``"affine"`` (the learned affine map only; in
        the interleaved layout elementwise affine maps in the blocks too) or ``"none"``.
    coupling_layers : RealNVP coupling layers per block (2: each coordinate moves once).
    hidden, depth : coupling-network width (default ``clip(2 d, 32, 256)``) and hidden layers.
    affine : the learned affine map: ``"tril"``, ``"diag"`` or ``"auto"`` (tril up to 256
        latent dimensions).
    step_size : initial step size (default 0.3 for MALA in the latent layout, else 0.05),
        learned per block and coordinate (kept positive by a softplus).
    schedule : the blocks' interpolation weights ``lambda_b``: ``"linear"`` (fixed
        ``b / B``, default), ``"learned"`` (monotone increments ending at 1, linear at the
        start) or a sequence of B fixed values in [0, 1] (e.g. all ones: every block
        targets the posterior).
    langevin_space : ``"latent"`` (default) or ``"interleaved"`` (module docstring).
    score_clip : soft clip ``c tanh(g / c)`` of the target's score per coordinate in the
        drift, or ``None`` (the path weight stays exact either way).
    remat : recompute the stochastic steps in the backward pass (memory O(1) in K).
    init_scale, init_steps, init_options, prefix, init_loc_fn, seed :
        as :class:`~bayesgen.guides.base.PreconditionedGuide`.

    References
    ----------
    Wu, Koehler & Noe, "Stochastic normalizing flows", NeurIPS 2020.
    Hoffman et al., "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural
    transport", 2019 (MCMC in a flow's input coordinates, as in the latent layout).
    """

    def __init__(
        self,
        model,
        *,
        num_blocks: int = 4,
        langevin_steps: int = 2,
        final_steps: int | None = None,
        mala: bool = True,
        flow: str = "realnvp",
        coupling_layers: int = 2,
        hidden: int | None = None,
        depth: int = 2,
        affine: str = "auto",
        step_size: float | None = None,
        schedule="linear",
        langevin_space: str = "latent",
        score_clip: float | None = 100.0,
        remat: bool = False,
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        check_int("num_blocks", num_blocks)
        check_int("langevin_steps", langevin_steps, minimum=0)
        if final_steps is None:
            final_steps = 25 if mala else 0
        check_int("final_steps", final_steps, minimum=0)
        check_int("coupling_layers", coupling_layers)
        check_int("depth", depth, minimum=0)
        check_int("hidden", hidden, allow_none=True)
        if flow not in SNF_FLOWS:
            raise ValueError(f"flow must be one of {SNF_FLOWS}, got {flow!r}")
        if affine not in ("auto", "tril", "diag"):
            raise ValueError(f"affine must be 'auto', 'tril' or 'diag', got {affine!r}")
        check_positive("step_size", step_size, allow_none=True)
        check_positive("score_clip", score_clip, allow_none=True)
        if langevin_space not in ("interleaved", "latent"):
            raise ValueError(
                f"langevin_space must be 'interleaved' or 'latent', got {langevin_space!r}"
            )
        fixed_lambdas = None
        if isinstance(schedule, str):
            if schedule not in ("linear", "learned"):
                raise ValueError(
                    f"schedule must be 'linear', 'learned' or a sequence of num_blocks values "
                    f"in [0, 1], got {schedule!r}"
                )
        else:
            lam = jnp.asarray(schedule, dtype=jnp.result_type(float))
            if lam.shape != (num_blocks,) or not bool(jnp.all((lam >= 0) & (lam <= 1))):
                raise ValueError(
                    f"schedule must be 'linear', 'learned' or a sequence of num_blocks="
                    f"{num_blocks} values in [0, 1], got {schedule!r}"
                )
            fixed_lambdas = lam
        if flow == "none" and langevin_steps == 0:
            raise ValueError(
                "flow='none' with langevin_steps=0 leaves nothing to fit; give langevin_steps "
                ">= 1 or a flow"
            )
        self.num_blocks = num_blocks
        self.langevin_steps = langevin_steps
        self.final_steps = final_steps
        self.mala = bool(mala)
        self.flow = flow
        self.coupling_layers = coupling_layers
        self.hidden = hidden
        self.depth = depth
        self.affine = affine
        if step_size is None:
            step_size = 0.3 if (langevin_space == "latent" and mala) else 0.05
        self.step_size = float(step_size)
        self.schedule = schedule
        self.langevin_space = langevin_space
        self._fixed_lambdas = fixed_lambdas
        self.score_clip = score_clip
        self.remat = bool(remat)
        self._flow_templates = None
        super().__init__(
            model, init_scale=init_scale, init_steps=init_steps, init_options=init_options,
            prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    # --- set-up ---------------------------------------------------------------------------------
    def _dense_affine(self):
        return self.affine == "tril" or (self.affine == "auto" and self.latent_dim <= 256)

    def _build(self, key):
        if self.flow != "realnvp":
            return
        d = self.latent_dim
        hidden = self.hidden or int(min(256, max(32, 2 * d)))
        # one stack of B * C couplings, split into B blocks of C (one block in the latent layout)
        nb = self.num_blocks if self.langevin_space == "interleaved" else 1
        self._flow_templates = coupling_templates(
            key, d, self.num_blocks * self.coupling_layers, nb, hidden, self.depth)

    # --- the family -------------------------------------------------------------------------------
    def _layers(self):
        """``dict(initial_layer, block_layer, block_params, final_layer)`` of the family."""
        d, nb, p = self.latent_dim, self.num_blocks, self.prefix
        if self.flow == "none":
            return {}
        affine = learned_affine(p, d, self._dense_affine())
        if self.langevin_space == "latent":
            if self.flow == "affine":
                return {"final_layer": affine}
            coupling = bijection_block(self._flow_templates[2])
            arrays = jax.tree.map(lambda a: a[0], self._flow_arrays())
            return {"final_layer": chain_layers(coupling.bind(arrays), affine)}
        if self.flow == "affine":
            params = {
                "loc": numpyro.param(f"{p}_block_loc", jnp.zeros((nb, d))),
                "scale": numpyro.param(f"{p}_block_scale", jnp.ones((nb, d)),
                                       constraint=constraints.softplus_positive),
            }
            return {"initial_layer": affine, "block_layer": elementwise_affine_block,
                    "block_params": params}
        return {"initial_layer": affine, "block_layer": bijection_block(self._flow_templates[2]),
                "block_params": self._flow_arrays()}

    def _flow_arrays(self):
        """The couplings' arrays with the trainable ones registered as ``{prefix}_flow``."""
        return registered_coupling_arrays(f"{self.prefix}_flow", self._flow_templates)

    def _get_posterior(self):
        d, nb = self.latent_dim, self.num_blocks
        layers = self._layers()
        step_sizes = numpyro.param(f"{self.prefix}_step_size",
                                   jnp.full((nb, d), self.step_size),
                                   constraint=constraints.softplus_positive)
        if self._fixed_lambdas is not None:
            lambdas = self._fixed_lambdas
        elif self.schedule == "learned":
            lambdas = monotone_schedule(numpyro.param(f"{self.prefix}_schedule_logits",
                                                      jnp.zeros(nb)))
        else:
            lambdas = linear_schedule(nb)
        pre_loc, pre_scale = self.preconditioner
        return StochasticNormalizingFlow(
            self.model_log_density(), pre_loc, pre_scale, step_sizes=step_sizes, lambdas=lambdas,
            **layers, langevin_steps=self.langevin_steps, final_steps=self.final_steps,
            mala=self.mala, score_clip=self.score_clip, remat=self.remat,
        )
