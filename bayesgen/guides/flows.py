"""Normalizing-flow guides (exact density): AutoFlow and one class per flow kind."""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
from flowjax.experimental.numpyro import register_params
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int
from bayesgen.families.flows import FLOW_KINDS, FlowFamily, build_flow
from bayesgen.guides.base import PreconditionedGuide, default_width

_DEFAULT_LAYERS = {"realnvp": 8, "nsf": 6, "maf": 5, "bnaf": 1, "planar": 32, "radial": 32}


def _default_hidden(kind: str, dim: int) -> int:
    if kind == "bnaf":
        return 8  # block size: hidden width = dim * 8
    return default_width(dim, 32)


class AutoFlow(PreconditionedGuide):
    """Normalizing-flow guide over all latent sites of a model (exact density).

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    flow : ``"nsf"`` (rational-quadratic spline coupling, default), ``"realnvp"``,
        ``"maf"`` (masked autoregressive, sampled in its fast IAF direction), ``"bnaf"``,
        ``"planar"`` or ``"radial"``. ``None`` gives the Gaussian of the two affine layers.
    num_layers : flow layers (default per flow: nsf 6, realnvp 8, maf 5, bnaf 1,
        planar/radial 32).
    hidden : conditioner width (default ``clip(2 d, 32, 256)``; for bnaf the block size, 8).
    depth : conditioner hidden layers (default 2; bnaf 1).
    affine : the learned affine (whitening) layer and the preconditioner's form: ``"tril"``
        (full lower triangular), ``"diag"``, ``"auto"`` (tril up to 256 latent dimensions),
        or ``"none"`` (no learned affine layer: the flow alone, after the preconditioner,
        which is then diagonal).
    init_scale : ``"pathfinder"`` (default) finds the preconditioner by an L-BFGS path with
        Gaussian ELBOs; ``None`` uses the model's initial point with unit scale; or a
        ``(loc, scale)`` pair given by the user.
    init_steps : L-BFGS iterations for the pathfinder start.
    init_options : further keyword arguments of :func:`bayesgen.init.find_preconditioner`.
    knots, interval : spline settings for ``flow="nsf"``.
    prefix, init_loc_fn : as for numpyro autoguides (the init point starts the L-BFGS path).
    seed : seed for the initial weights and the pathfinder draws when the guide is not run
        under a numpyro seed handler.
    """

    def __init__(
        self,
        model,
        *,
        flow: str | None = "nsf",
        num_layers: int | None = None,
        hidden: int | None = None,
        depth: int | None = None,
        affine: str = "auto",
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        knots: int = 8,
        interval: float = 5.0,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        if flow is not None and flow not in FLOW_KINDS:
            raise ValueError(f"flow must be one of {FLOW_KINDS} or None, got {flow!r}")
        if affine not in ("auto", "tril", "diag", "none"):
            raise ValueError(
                f"affine must be 'auto', 'tril', 'diag' or 'none', got {affine!r}"
            )
        if affine == "none" and flow is None:
            raise ValueError("affine='none' with flow=None leaves nothing to fit; pick one")
        for name, val in (("num_layers", num_layers), ("hidden", hidden), ("depth", depth)):
            check_int(name, val, allow_none=True)
        self.flow = flow
        self.num_layers = num_layers if num_layers is not None else _DEFAULT_LAYERS.get(flow, 0)
        self.hidden = hidden
        self.depth = depth if depth is not None else (1 if flow == "bnaf" else 2)
        self.affine = affine
        self.knots = knots
        self.interval = interval
        self._flow_template = None
        super().__init__(
            model, init_scale=init_scale, init_steps=init_steps, init_options=init_options,
            prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    # --- set-up ---------------------------------------------------------------------------
    def _dense(self):
        return self.affine == "tril" or (self.affine == "auto" and self.latent_dim <= 256)

    def _build(self, key):
        if self.flow is not None:
            d = self.latent_dim
            hidden = self.hidden or _default_hidden(self.flow, d)
            # Built eagerly: flowjax modules close over arrays, so they cannot be built under jit.
            self._flow_template = build_flow(
                self.flow, key, d, num_layers=self.num_layers, hidden=hidden,
                depth=self.depth, knots=self.knots, interval=self.interval,
            )

    # --- the family -------------------------------------------------------------------------
    def _get_posterior(self):
        d = self.latent_dim
        bij = None
        if self._flow_template is not None:
            bij = register_params(f"{self.prefix}_flow", self._flow_template)
        if self.affine == "none":
            loc, scale = jnp.zeros(d), jnp.ones(d)  # identity: no learned affine layer
        else:
            loc = numpyro.param(f"{self.prefix}_loc", jnp.zeros(d))
            if self._dense():
                scale = numpyro.param(
                    f"{self.prefix}_scale_tril", jnp.eye(d),
                    constraint=constraints.softplus_lower_cholesky,
                )
            else:
                scale = numpyro.param(
                    f"{self.prefix}_scale", jnp.ones(d), constraint=constraints.softplus_positive
                )
        pre_loc, pre_scale = self.preconditioner
        return FlowFamily(bij, loc, scale, pre_loc, pre_scale)

    def median(self, params):
        """Constrained values at the image of the base distribution's median (eps = 0)."""
        latent = self.get_posterior(params).transform(jnp.zeros(self.latent_dim))
        return self._unpack_and_constrain(latent, params)


class _FixedFlow(AutoFlow):
    _flow_name: str = ""

    def __init__(self, model, **kwargs):
        if "flow" in kwargs:
            raise TypeError(
                f"{type(self).__name__} fixes flow={self._flow_name!r}; use AutoFlow to choose"
            )
        super().__init__(model, flow=self._flow_name, **kwargs)


class AutoRealNVP(_FixedFlow):
    """Affine-coupling (RealNVP) flow guide (Dinh et al., ICLR 2017); kwargs as AutoFlow."""

    _flow_name = "realnvp"


class AutoNeuralSpline(_FixedFlow):
    """Rational-quadratic spline coupling guide (Durkan et al., NeurIPS 2019); kwargs as AutoFlow."""

    _flow_name = "nsf"


class AutoMAF(_FixedFlow):
    """Masked autoregressive flow guide sampled in its fast (IAF) direction; kwargs as AutoFlow.

    Kingma et al., NeurIPS 2016; Papamakarios et al., NeurIPS 2017.
    """

    _flow_name = "maf"


class AutoBNAF(_FixedFlow):
    """Block neural autoregressive flow guide (De Cao et al., UAI 2019); kwargs as AutoFlow."""

    _flow_name = "bnaf"


class AutoPlanarFlow(_FixedFlow):
    """Planar flow guide (Rezende & Mohamed, ICML 2015); kwargs as AutoFlow."""

    _flow_name = "planar"


class AutoRadialFlow(_FixedFlow):
    """Radial flow guide (Rezende & Mohamed, ICML 2015); kwargs as AutoFlow."""

    _flow_name = "radial"
