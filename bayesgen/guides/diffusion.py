"""Diffusion guides: AutoDDVI and AutoDBVI (path-space lower-bound surrogates).

Both fit :class:`~bayesgen.families.diffusion.DenoisingDiffusion` in the preconditioner's
whitened coordinates: the posterior is the end of a reverse-time diffusion whose score is
``-u + f(u, t)``, ``f`` a flax MLP of the state and the time (zero at the start, so the
guide starts at the preconditioner's Gaussian). AutoDBVI adds a learnable start
``N(mu, diag s^2)`` and the Doob-bridged reference that ends in it.

For a model whose latent prior is N(0, I) (whitened inducing outputs of
:mod:`bayesgen.models.deep_gp`) and ``init_scale=None``, the reference process started at
the prior is the stationary Ornstein-Uhlenbeck process, which is DDVI's reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpyro
from flax import nnx
from numpyro.distributions import constraints
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int, check_positive
from bayesgen.families.diffusion import DenoisingDiffusion, log_snr_schedule
from bayesgen.families.stochastic_flow import bijection_block, chain_layers
from bayesgen.guides.base import PreconditionedGuide, default_width
from bayesgen.guides.stochastic_flow import (
    coupling_templates,
    learned_affine,
    registered_coupling_arrays,
)
from bayesgen.nn import MLP, ScoreNet, nnx_param, zero_last_layer

_VAR_BOUND = 5.0  # the learned log variance factor stays in [-5, 5]
DIFFUSION_FLOWS = ("none", "affine", "realnvp")


def _soft_bound(x, bound):
    """``bound * tanh(x / bound)``: ``x`` where ``|x| << bound``, never beyond ``bound``."""
    return bound * jnp.tanh(x / bound)


class AutoDDVI(PreconditionedGuide):
    """Denoising diffusion VI guide (Xu, Zeng & Paisley, ICML 2024): a learned reverse SDE.

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    num_steps : N, steps of the reverse process (each one score-network pass per particle;
        the bound's discretisation gap shrinks like 1/N).
    hidden, depth : score-network width (default ``clip(2 d, 64, 256)``) and hidden layers.
    log_snr_max, log_snr_min : the reference's grid, equal steps in log signal-to-noise
        ratio (:func:`~bayesgen.families.diffusion.log_snr_schedule`); the first step's
        noise, sd ``sigmoid(-log_snr_max)^(1/2)`` = 0.0067 whitened units by default, is the
        finest scale resolved.
    learn_variance : learn each reverse step's variance per coordinate (a factor in
        ``[e^-5, e^5]`` on the reference's, from the same network) instead of DDPM's fixed
        choice.
    stick_the_landing : differentiate the variational path density through the path only
        (its score at a fixed path has mean zero and is dropped; the gradient's variance
        then vanishes at the optimum). With it off the gradient is the plain
        reparameterised one. It costs a second network pass a step only with
        ``param_grad="per_step"``.
    remat : recompute the steps in the backward pass (memory O(1) in N).
    param_grad : ``"batched"`` (default) or ``"per_step"``: how the score network's parameter
        gradient is taken over the steps; the same gradient up to round-off, the first about
        1.6x faster a step on a 5-layer deep GP (:mod:`bayesgen.families.network_scan`).
    max_correction : bound the network's correction ``g`` softly, ``B tanh(g / B)`` with
        ``B = max_correction`` (``None``, the default: unbounded). The reverse step moves
        ``u`` by ``(1 - a_k^2) / a_k`` times the drift; an unbounded ``g`` that grows with
        ``|u|`` can make that map expansive, and over the steps a path then runs off to
        1e9 (AutoDDVI on naval's deep GP, docs/benchmarks.md). With a bound the drift is
        bounded and the path cannot grow geometrically; a bound well above the outputs a
        fit uses (they stayed below about 50 there) leaves the family as it was. At the
        bound tanh is flat, so a correction that reaches it loses its gradient and cannot come
        back: check a fit with :meth:`correction_saturation`.
    flow : ``"none"`` (default), ``"affine"`` or ``"realnvp"``: run the diffusion in the input
        coordinates of a learned invertible map ``T`` (a learned affine map, after
        ``flow_layers`` RealNVP couplings for ``"realnvp"``), ``z = m0 + L0 T(u_0)``; the
        bound stays a lower bound (:mod:`bayesgen.families.diffusion`). The flow starts at
        the identity.
    flow_layers : RealNVP couplings for ``flow="realnvp"`` (default 8; coupling networks of
        width ``clip(2 d, 32, 256)`` and ``depth`` hidden layers). The affine map is dense up
        to d = 256, diagonal above.
    init_scale, init_steps, init_options, prefix, init_loc_fn, seed :
        as :class:`~bayesgen.guides.base.PreconditionedGuide`.
    """

    def __init__(
        self,
        model,
        *,
        num_steps: int = 32,
        hidden: int | None = None,
        depth: int = 2,
        log_snr_max: float = 10.0,
        log_snr_min: float = -10.0,
        learn_variance: bool = True,
        stick_the_landing: bool = True,
        remat: bool = False,
        param_grad: str = "batched",
        max_correction: float | None = None,
        flow: str = "none",
        flow_layers: int = 8,
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        check_int("hidden", hidden, allow_none=True)
        check_int("depth", depth, minimum=0)
        if param_grad not in ("batched", "per_step"):
            raise ValueError(f"param_grad must be 'batched' or 'per_step', got {param_grad!r}")
        self.param_grad = param_grad
        if flow not in DIFFUSION_FLOWS:
            raise ValueError(f"flow must be one of {DIFFUSION_FLOWS}, got {flow!r}")
        check_int("flow_layers", flow_layers)
        if max_correction is not None:
            check_positive("max_correction", max_correction)
            max_correction = float(max_correction)
        self.max_correction = max_correction
        self.flow = flow
        self.flow_layers = flow_layers
        self._flow_templates = None
        self.schedule = log_snr_schedule(num_steps, log_snr_max, log_snr_min)  # validates
        self.learn_variance = bool(learn_variance)
        self.stick_the_landing = bool(stick_the_landing)
        self.num_steps = num_steps
        self.hidden = hidden
        self.depth = depth
        self.remat = bool(remat)
        self._score_template = None
        super().__init__(
            model, init_scale=init_scale, init_steps=init_steps, init_options=init_options,
            prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    def _build(self, key):
        d = self.latent_dim
        width = self.hidden or default_width(d)
        out = 2 * d if self.learn_variance else d
        self._score_template = ScoreNet(d, out, width=width, depth=self.depth,
                                        rngs=nnx.Rngs(params=key))
        if self.flow == "realnvp":
            self._flow_templates = coupling_templates(
                jax.random.fold_in(key, 7), d, self.flow_layers, 1,
                default_width(d, 32), self.depth)

    def _start(self):
        return None, None

    def _final_layer(self):
        """The learned map ``T`` for ``flow`` (``None`` for ``"none"``)."""
        if self.flow == "none":
            return None
        d, p = self.latent_dim, self.prefix
        affine = learned_affine(f"{p}_flow", d, dense=d <= 256)
        if self.flow == "affine":
            return affine
        arrays = registered_coupling_arrays(f"{p}_flow", self._flow_templates)
        coupling = bijection_block(self._flow_templates[2])
        return chain_layers(coupling.bind(jax.tree.map(lambda a: a[0], arrays)), affine)

    def _get_posterior(self):
        pre_loc, pre_scale = self.preconditioner
        net = nnx_param(f"{self.prefix}_score", self._score_template)
        start_loc, start_scale = self._start()
        return DenoisingDiffusion(
            self._split_outputs(net), pre_loc, pre_scale, self.schedule,
            start_loc=start_loc, start_scale=start_scale, remat=self.remat,
            stick_the_landing=self.stick_the_landing, param_grad=self.param_grad,
            final_layer=self._final_layer(),
        )

    def correction_saturation(self, params, num_paths: int = 8, level: float = 0.95,
                              seed: int = 0) -> float:
        """Fraction of the score correction at its bound: ``|g| >= level * max_correction``
        over the steps and coordinates of ``num_paths`` reverse paths of the fitted guide.

        tanh's slope there is at most ``1 - level^2``: a fit with most of its correction at
        the bound no longer moves it, and its path bound stays off by orders of magnitude
        (AutoDDVI at ``max_correction=50`` on a split of protein's 5-layer deep GP: 86%, every
        coordinate from the eighth of 32 steps on, and a loss of 2.5e7 where the other splits
        end near 6e4; docs/benchmarks.md). Near 0: the bound left the family as it was.
        """
        if self.max_correction is None:
            raise ValueError("correction_saturation needs a bounded correction: this guide "
                             "has max_correction=None")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        check_int("num_paths", num_paths)
        g = self.get_posterior(params).corrections(jax.random.key(seed), num_paths)
        return float(jnp.mean(jnp.abs(g) >= level * self.max_correction))

    def _split_outputs(self, net):
        d, bound = self.latent_dim, self.max_correction

        def correction(g):
            return g if bound is None else _soft_bound(g, bound)

        if not self.learn_variance:
            return lambda u, t: (correction(net(u, t)), 0.0)

        def network(u, t):
            out = net(u, t)
            return correction(out[..., :d]), _soft_bound(out[..., d:], _VAR_BOUND)

        return network


class AutoDBVI(AutoDDVI):
    """Diffusion-bridge VI guide (Xu, Zhao, Paisley & Zeng, 2025): learned start, bridged reference.

    The reverse process starts at ``N(mu, diag s^2)`` (``mu = 0``, ``s = 1`` at the start)
    and the reference is bridged to end there (see :mod:`bayesgen.families.diffusion`).
    With the score correction at zero the family is the Gaussian ``N(A mu, A^2 s^2 + 1 -
    A^2)`` (whitened units, ``A = sqrt(abar_N)``), so the default horizon is short enough
    to leave ``A = 0.71`` of the start's signal (``log_snr_min = 0``, ``abar_N = 1/2``): the
    start carries a Gaussian fit and the diffusion the rest.

    Parameters
    ----------
    context : amortise the start: ``{latent site: model param}``, e.g. a deep GP's
        ``{"v0": "Z0", "v1": "Z1"}`` (:attr:`bayesgen.models.deep_gp.DeepGP.start_context`).
        For a site of shape ``(M, D)`` and a param of shape ``(M, C)`` (one context row per
        latent row, as inducing inputs are for inducing outputs), ``mu`` and ``s`` of each
        row come from one MLP ``R^C -> R^2D`` shared by the rows (so the start moves with
        the inducing inputs and is equivariant to their order). The guide reads the
        param's current value (it is shared with the model, not a copy). Sites not named
        get a constant learned start.
    start_whitening : ``{latent site: f}`` for sites in ``context`` whose value ``v`` (M, D)
        is a whitened version ``v = L^-1 U`` of the quantity the context describes row by
        row, ``f(param)`` returning the (M, M) lower-triangular ``L`` from the model's
        current parameters (``param(name)`` gives one): a deep GP's inducing outputs,
        ``L = chol(K_ZZ)`` (:attr:`bayesgen.models.deep_gp.DeepGP.start_whitening`). The
        network's mean output is then the start's mean of ``U`` (row ``m`` a function of
        inducing input ``m``, as in DBVI's amortisation of the unwhitened inducing outputs),
        and the start's mean of ``v`` is the preconditioner's plus ``L^-1`` of it. Without
        it, the network gives the mean of ``v`` row by row, though row ``m`` of ``v`` mixes
        rows ``1..m`` of ``U``. The scales stay per coordinate of ``v``.
    min_start_scale : floor of ``s`` (whitened units): ``s = min_start_scale +
        softplus(raw)``, 1 at the start. Without it the fit is free to shrink ``s`` towards
        0 (AutoDBVI deep-GP fits on yacht drove output-layer start scales to 1e-19 in 1400
        steps), and the stick-the-landing term's derivative ``(u - mu)^2 / s^3`` then
        underflows to 0/0 in float32: a NaN gradient with a finite loss. 1e-3 is far below
        any scale the reference process resolves (its finest step has sd 0.0067 by
        default) and far above float32 trouble. It must be a normal float (at least 1.2e-38
        in float32): XLA flushes subnormals to 0.
    Other parameters as :class:`AutoDDVI`.
    """

    def __init__(self, model, *, log_snr_min: float = 0.0, context: dict | None = None,
                 start_whitening: dict | None = None, min_start_scale: float = 1e-3,
                 **kwargs):
        check_positive("min_start_scale", min_start_scale, below=1.0)
        tiny = float(jnp.finfo(jnp.result_type(float)).tiny)
        if min_start_scale < tiny:  # subnormal: XLA flushes it to 0, so no floor at all
            raise ValueError(f"min_start_scale must be at least {tiny:.3g}, the smallest normal "
                             f"number of the default float type (a subnormal floor is flushed "
                             f"to 0 and keeps nothing finite), got {min_start_scale!r}")
        self.min_start_scale = float(min_start_scale)
        if context is not None and (
            not isinstance(context, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
        ):
            raise ValueError(
                "context must be a dict {latent site name: model param name}, "
                f"got {context!r}"
            )
        self.context = dict(context or {})
        if start_whitening is not None and not (
            isinstance(start_whitening, dict)
            and all(isinstance(k, str) and callable(f) for k, f in start_whitening.items())
        ):
            raise ValueError("start_whitening must be a dict {latent site name: callable}, "
                             f"got {start_whitening!r}")
        self.start_whitening = dict(start_whitening or {})
        outside = sorted(set(self.start_whitening) - set(self.context))
        if outside:
            raise ValueError(f"start_whitening names sites {outside} that context does not "
                             "amortise; give them a context too")
        self._context_templates = {}
        super().__init__(model, log_snr_min=log_snr_min, **kwargs)

    def _build(self, key):
        super()._build(key)
        for i, (site, pname) in enumerate(self.context.items()):
            if site not in self._init_locs:
                raise ValueError(
                    f"context names latent site {site!r}, which the model does not have; its "
                    f"latent sites are {list(self._init_locs)}"
                )
            proto = self.prototype_trace.get(pname)
            if proto is None or proto["type"] != "param":
                raise ValueError(
                    f"context maps {site!r} to {pname!r}, which is not a numpyro.param of the "
                    "model"
                )
            shape, cshape = jnp.shape(self._init_locs[site]), jnp.shape(proto["value"])
            if len(shape) != 2 or len(cshape) != 2 or shape[0] != cshape[0]:
                raise ValueError(
                    f"context {pname!r} of shape {cshape} must have one row per row of latent "
                    f"site {site!r} of shape {shape} (both two-dimensional)"
                )
            width = self.hidden or 64
            net = MLP(cshape[1], 2 * shape[1], width=width, depth=self.depth,
                      rngs=nnx.Rngs(params=jax.random.fold_in(key, 100 + i)))
            zero_last_layer(net)
            self._context_templates[site] = net

    def _start(self):
        floor = self.min_start_scale
        offset = math.log(math.expm1(1.0 - floor))  # floor + softplus(offset) = 1
        values = {}

        def param(name):  # the model's parameter, read once a call
            if name not in values:
                proto = self.prototype_trace.get(name)
                if proto is None or proto["type"] != "param":
                    raise ValueError(f"the start needs {name!r} (context or start_whitening), "
                                     "which is not a numpyro.param of the model")
                values[name] = numpyro.param(
                    name, proto["value"],
                    constraint=proto["kwargs"].get("constraint", constraints.real))
            return values[name]

        locs, scales, latent_offsets = [], [], []
        for site, value in self._init_locs.items():
            shape = jnp.shape(value)
            size = int(math.prod(shape))
            latent_offset = jnp.zeros(size)
            if site in self.context:
                net = nnx_param(f"{self.prefix}_start_{site}", self._context_templates[site])
                out = net(param(self.context[site]))
                loc, raw = out[:, : shape[1]], out[:, shape[1]:]
                if site in self.start_whitening:  # loc is the mean of U = L v
                    factor = self.start_whitening[site](param)
                    latent_offset = jnp.reshape(jsl.solve_triangular(factor, loc, lower=True), -1)
                    loc = jnp.zeros(size)
            else:
                loc = numpyro.param(f"{self.prefix}_start_loc_{site}", jnp.zeros(size))
                raw = numpyro.param(f"{self.prefix}_start_raw_scale_{site}", jnp.zeros(size))
            locs.append(jnp.reshape(loc, -1))
            latent_offsets.append(latent_offset)
            scales.append(jnp.reshape(floor + jax.nn.softplus(raw + offset), -1))
        loc = jnp.concatenate(locs)
        if self.start_whitening:  # offsets of the latent z = m0 + L0 u, into u's coordinates
            pre_scale = self.preconditioner[1]
            shift = jnp.concatenate(latent_offsets)
            if jnp.ndim(pre_scale) == 2:
                loc = loc + jsl.solve_triangular(pre_scale, shift, lower=True)
            else:
                loc = loc + shift / pre_scale
        return loc, jnp.concatenate(scales)
