"""Auto* guides: numpyro ``AutoContinuous`` guides whose posterior is a bayesgen family.

A guide here is thin: it flattens the model's latent sites into one unconstrained vector
(numpyro's ``AutoContinuous`` machinery), registers the family's parameters with
``numpyro.param`` and returns the family from ``_get_posterior()``. Everything numpyro
offers for autoguides works unchanged: ``SVI`` with ``Trace_ELBO``, ``Predictive``,
``sample_posterior``, ``median``, ``quantiles``.

Before the first step the guide finds the scale of each coordinate (a pathfinder-style
search, :mod:`bayesgen.init`) and uses it as a fixed preconditioner, so that the defaults
work on badly conditioned models. Pass ``init_scale=None`` to start from the unit scale at
the model's initial point (numpyro's behaviour).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpyro
from flowjax.experimental.numpyro import register_params
from numpyro.distributions import constraints
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median

from bayesgen.families.flows import FLOW_KINDS, FlowFamily, build_flow
from bayesgen.init import find_preconditioner

_DEFAULT_LAYERS = {"realnvp": 8, "nsf": 6, "maf": 5, "bnaf": 1, "planar": 32, "radial": 32}


def _default_hidden(kind: str, dim: int) -> int:
    if kind == "bnaf":
        return 8  # block size: hidden width = dim * 8
    return int(min(256, max(32, 2 * dim)))


class AutoFlow(AutoContinuous):
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
        if not (init_scale is None or init_scale == "pathfinder" or isinstance(init_scale, tuple | list)):
            raise ValueError(
                "init_scale must be 'pathfinder', None or a (loc, scale) pair, "
                f"got {init_scale!r}"
            )
        for name, val in (("num_layers", num_layers), ("hidden", hidden), ("depth", depth)):
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.flow = flow
        self.num_layers = num_layers if num_layers is not None else _DEFAULT_LAYERS.get(flow, 0)
        self.hidden = hidden
        self.depth = depth if depth is not None else (1 if flow == "bnaf" else 2)
        self.affine = affine
        self.init_scale = init_scale
        self.init_steps = init_steps
        self.init_options = dict(init_options or {})
        self.knots = knots
        self.interval = interval
        self.seed = seed
        self.preconditioner = None
        self._flow_template = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    # --- set-up ---------------------------------------------------------------------------
    def _dense(self):
        return self.affine == "tril" or (self.affine == "auto" and self.latent_dim <= 256)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        key = numpyro.prng_key()
        if key is None:
            key = jr.key(self.seed)
        k_flow, k_init = jr.split(key)
        d = self.latent_dim
        dense = self._dense()
        if self.init_scale == "pathfinder":
            unpack = self._unpack_latent
            potential_fn = self._potential_fn

            def potential(z):
                return potential_fn(unpack(z))

            with numpyro.handlers.block():  # keep the model's sites out of the guide's trace
                pre = jax.jit(
                    lambda x0, k: find_preconditioner(
                        potential, x0, k, num_steps=self.init_steps, dense=dense,
                        **self.init_options,
                    )
                )(self._init_latent, k_init)
            loc, scale = pre.loc, pre.scale
        elif self.init_scale is None:
            loc = self._init_latent
            scale = jnp.eye(d) if dense else jnp.ones(d)
        else:
            loc, scale = (jnp.asarray(a, dtype=jnp.result_type(float)) for a in self.init_scale)
            if loc.shape != (d,) or scale.shape not in ((d,), (d, d)):
                raise ValueError(
                    f"init_scale=(loc, scale) must have shapes ({d},) and ({d},) or ({d}, {d}) "
                    f"for this model's {d}-dimensional latent, got {loc.shape} and {scale.shape}"
                )
            if scale.ndim == 2 and not dense:
                scale = jnp.sqrt(jnp.diagonal(scale @ scale.T))
            elif scale.ndim == 1 and dense:
                scale = jnp.diag(scale)
        self.preconditioner = (loc, scale)
        if self.flow is not None:
            hidden = self.hidden or _default_hidden(self.flow, d)
            # Built eagerly: flowjax modules close over arrays, so they cannot be built under jit.
            self._flow_template = build_flow(
                self.flow, k_flow, d, num_layers=self.num_layers, hidden=hidden,
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

    def get_posterior(self, params):
        """The fitted family (a :class:`~bayesgen.families.flows.FlowFamily`) at ``params``."""
        return numpyro.handlers.substitute(self._get_posterior, params)()

    def get_base_dist(self):
        import numpyro.distributions as dist

        return dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1)

    def get_transform(self, params):
        raise NotImplementedError(
            f"{type(self).__name__} is not a numpyro TransformedDistribution; use "
            "get_posterior(params).transform(eps) to map base draws"
        )

    def median(self, params):
        """Constrained values at the image of the base distribution's median (eps = 0)."""
        latent = self.get_posterior(params).transform(jnp.zeros(self.latent_dim))
        return self._unpack_and_constrain(latent, params)

    def quantiles(self, params, quantiles, num_samples: int = 4000, seed: int = 0):
        """Per-site quantiles estimated from ``num_samples`` posterior draws (constrained)."""
        samples = self.sample_posterior(jr.key(seed), params, sample_shape=(num_samples,))
        q = jnp.asarray(quantiles)
        return {k: jnp.quantile(v, q, axis=0) for k, v in samples.items()}


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
