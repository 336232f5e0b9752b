"""What every bayesgen guide shares: numpyro ``AutoContinuous`` plus a fixed preconditioner.

A guide flattens the model's latent sites into one unconstrained vector (numpyro's
``AutoContinuous`` machinery), registers its family's parameters with ``numpyro.param`` and
returns the family from ``_get_posterior()``. Everything numpyro offers for autoguides works
unchanged: ``SVI`` with ``Trace_ELBO``, ``Predictive``, ``sample_posterior``, ``quantiles``.

Before the first step the guide finds the location and scale of each coordinate (a
pathfinder-style search, :mod:`bayesgen.init`) and keeps it as a fixed preconditioner
``(m0, L0)``: the family works in whitened coordinates ``w`` with ``z = m0 + L0 w``. Pass
``init_scale=None`` to start from the model's initial point with unit scale (numpyro's
behaviour), or a ``(loc, scale)`` pair. With a full preconditioner (up to 256 latent
dimensions) the search runs several L-BFGS paths, and where they end in two or more
distinct, competitive modes the preconditioner spans them (see :mod:`bayesgen.init`);
``init_options={"num_paths": 1}`` keeps one path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median
from numpyro.infer.util import potential_energy

from bayesgen.errors import check_int, subsampled_plates
from bayesgen.init import find_preconditioner


class PreconditionedGuide(AutoContinuous):
    """Base class of bayesgen guides: ``AutoContinuous`` with a fixed preconditioner.

    Subclasses set ``self._dense()`` (full or diagonal preconditioner), build their networks
    eagerly in ``_build(key)`` (flax/flowjax modules cannot be built under jit) and return
    their family from ``_get_posterior()``.

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    init_scale : ``"pathfinder"`` (default) finds the preconditioner by an L-BFGS path with
        Gaussian ELBOs; ``None`` uses the model's initial point with unit scale; or a
        ``(loc, scale)`` pair given by the user (scale a (d,) vector or (d, d) lower
        triangular matrix).
    init_steps : L-BFGS iterations for the pathfinder start.
    init_options : further keyword arguments of :func:`bayesgen.init.find_preconditioner`,
        e.g. ``{"num_paths": 1}`` for the single-path start (no multi-mode search).
    prefix, init_loc_fn : as for numpyro autoguides (the init point starts the L-BFGS path).
    seed : seed for the initial weights and the pathfinder draws when the guide is not run
        under a numpyro seed handler.
    """

    def __init__(
        self,
        model,
        *,
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        if not (
            init_scale is None
            or (isinstance(init_scale, str) and init_scale == "pathfinder")
            or isinstance(init_scale, tuple | list)
        ):
            raise ValueError(
                "init_scale must be 'pathfinder', None or a (loc, scale) pair, "
                f"got {init_scale!r}"
            )
        check_int("init_steps", init_steps)
        self.init_scale = init_scale
        self.init_steps = init_steps
        self.init_options = dict(init_options or {})
        self.seed = seed
        self.preconditioner = None
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    # --- hooks ------------------------------------------------------------------------------
    def _dense(self) -> bool:
        return self.latent_dim <= 256

    def _build(self, key):
        """Build the family's networks eagerly (called once, after the latent is known)."""

    # --- set-up ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        key = numpyro.prng_key()
        if key is None:
            key = jr.key(self.seed)
        k_build, k_init = jr.split(key)
        self._preconditioner_key = k_init  # kept: a search run elsewhere can use the same key
        self.preconditioner = self._find_preconditioner(k_init)
        self._build(k_build)

    def _find_preconditioner(self, key):
        d = self.latent_dim
        dense = self._dense()
        if isinstance(self.init_scale, str):  # "pathfinder"
            potential = self.flat_potential()
            with numpyro.handlers.block():  # keep the model's sites out of the guide's trace
                pre = jax.jit(
                    lambda x0, k: find_preconditioner(
                        potential, x0, k, num_steps=self.init_steps, dense=dense,
                        **self.init_options,
                    )
                )(self._init_latent, key)
            return pre.loc, pre.scale
        if self.init_scale is None:
            return self._init_latent, (jnp.eye(d) if dense else jnp.ones(d))
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
        return loc, scale

    # --- the model's density on the flat latent ---------------------------------------------
    def flat_potential(self):
        """``U(z) = -log p(x, z)`` on the flat unconstrained latent, at the set-up data.

        Jacobians of the constraining transforms are included. Uses the arguments the guide
        was set up with; for the current arguments use :meth:`flat_log_joint`.
        """
        unpack = self._unpack_latent
        potential_fn = self._potential_fn

        def potential(z):
            return potential_fn(unpack(z))

        return potential

    def flat_log_joint(self, params, args=(), kwargs=None):
        """``z -> log p(x, z)`` on the flat unconstrained latent for the given model arguments.

        ``params`` are the (constrained) parameter values, as a numpyro loss receives them;
        the model's own ``numpyro.param`` sites are substituted from them.
        """
        kwargs = kwargs or {}
        model = numpyro.handlers.substitute(self.model, data=params)
        unpack = self._unpack_latent

        def log_joint(z):
            return -potential_energy(model, args, kwargs, unpack(z))

        return log_joint

    # --- the family -------------------------------------------------------------------------
    def get_posterior(self, params):
        """The fitted family at ``params`` (a :class:`bayesgen.families.base.Family`)."""
        return numpyro.handlers.substitute(self._get_posterior, params)()

    def get_base_dist(self):
        import numpyro.distributions as dist

        return dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1)

    def get_transform(self, params):
        raise NotImplementedError(
            f"{type(self).__name__} is not a numpyro TransformedDistribution; draw from "
            "get_posterior(params) instead"
        )

    def median(self, params, num_samples: int = 4000, seed: int = 0):
        """Per-site medians (constrained), estimated from ``num_samples`` posterior draws."""
        q = self.quantiles(params, [0.5], num_samples=num_samples, seed=seed)
        return {k: v[0] for k, v in q.items()}

    def quantiles(self, params, quantiles, num_samples: int = 4000, seed: int = 0):
        """Per-site quantiles estimated from ``num_samples`` posterior draws (constrained)."""
        samples = self.sample_posterior(jr.key(seed), params, sample_shape=(num_samples,))
        q = jnp.asarray(quantiles)
        return {k: jnp.quantile(v, q, axis=0) for k, v in samples.items()}


def default_width(latent_dim: int, minimum: int = 64) -> int:
    """Hidden width of a guide's network when the user gives none: ``clip(2 d, minimum, 256)``."""
    return int(min(256, max(minimum, 2 * latent_dim)))


def _signature(args, kwargs):
    """Tree structure and leaf shapes of a call's arguments (is it the set-up's data layout?)."""
    leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
    return treedef, tuple(np.shape(x) for x in leaves)


class ModelDensityGuide(PreconditionedGuide):
    """A guide whose family evaluates the model's log-density (AutoSNF, AutoCMCD).

    ``SVI`` calls the guide with the model's arguments; the guide keeps them for the call and
    :meth:`model_log_density` evaluates the model at them, under ``numpyro.handlers.block``
    so the model's sites stay out of the guide's trace. Where a call's arguments do not have
    the set-up's structure (``Predictive(model, guide=guide, ...)()`` without the data) it
    uses the set-up arguments: the draws are then from the posterior the guide was fitted to.
    :meth:`check_model_density`, run at set-up before the (costly) pathfinder search, refuses
    models whose density the guide cannot evaluate:
    ``numpyro.param`` sites (their values are not reachable from the guide) and subsampled
    plates (a minibatch density would make the target random).
    """

    _call_args = None
    _setup_signature = None

    def __call__(self, *args, **kwargs):
        previous = self._call_args
        self._call_args = (args, kwargs)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._call_args = previous

    def _setup_prototype(self, *args, **kwargs):
        self._setup_signature = _signature(args, kwargs)
        super()._setup_prototype(*args, **kwargs)

    def _find_preconditioner(self, key):
        self.check_model_density()  # before the (costly) pathfinder search
        return super()._find_preconditioner(key)

    def check_model_density(self):
        """Raise if the model has ``numpyro.param`` sites or a subsampled plate."""
        name = type(self).__name__
        trace = self.prototype_trace
        params = [n for n, site in trace.items() if site["type"] == "param"]
        if params:
            raise ValueError(
                f"{name} cannot fit a model with numpyro.param sites ({', '.join(params)}): "
                "it evaluates the model's density inside the guide, where the model's "
                "parameters are not reachable. Make them latent (numpyro.sample with a prior) "
                "or fixed constants, or use AutoDDVI/AutoDBVI, which need no model gradient "
                "inside the guide."
            )
        plates = subsampled_plates(trace)
        if plates:
            desc = ", ".join(f"'{n}' (size={size}, subsample_size={sub})"
                             for n, (size, sub) in plates.items())
            raise ValueError(
                f"{name} cannot fit a model with a subsampled plate ({desc}): its steps target "
                "the model's density, and a minibatch estimate would make that target random. "
                "Drop subsample_size (fit the full data), or use AutoDDVI/AutoDBVI, which need "
                "no model gradient inside the guide."
            )

    def model_log_density(self):
        """``z -> log p(x, z)`` at the current call's arguments (set-up ones as a fallback)."""
        call = self._call_args
        if call is not None and _signature(*call) == self._setup_signature:
            log_joint = self.flat_log_joint({}, *call)
        else:
            potential = self.flat_potential()

            def log_joint(z):
                return -potential(z)

        def log_density(z):
            with numpyro.handlers.block():  # the model's sites must not enter the guide's trace
                return log_joint(z)

        return log_density
