"""LIVI guide: an implicit generator with a linearised entropy (Uppal et al., NeurIPS 2023).

:class:`AutoLIVI` fits the family of :mod:`bayesgen.families.implicit` in the
preconditioner's whitened coordinates, ``z = m0 + L0 (g(eps) + sigma xi)``, with stock
``Trace_ELBO``: the family hands the linearised surrogate of log q to numpyro through the
guide site's intermediates. The surrogate is exact in expectation for a linear generator
and approximate otherwise (``density = "approximate"``); ``bayesgen.diagnose`` weighs
draws with the extended-space density instead.

Two generators:

``"mlp"`` (default up to d = 4096)
    ``g(eps) = P eps + MLP(eps)`` with ``m = d`` up to 64 dimensions (``m = 64`` above), the
    MLP's output layer starting at zero: the untrained family is the preconditioner's
    Gaussian (``m = d``). With ``m = d`` the family is full rank, which is what a small
    posterior needs; the entropy is exact (forward-mode Jacobian) up to ``m = 64``.
``"matrix"`` (default above)
    the paper's matrix-multiplication layers from a ``32 x 32`` noise matrix through ``64 x
    64`` hidden matrices to a near-square output (O(64 sqrt(d)) weights per layer plus a d
    bias), with the matrix-free entropy (smallest singular value by 3 Rayleigh-Ritz
    iterations). The output is standardised at set-up so every coordinate starts with mean
    ~0 and sd ~1.

The output noise ``sigma`` is fixed at 1e-3 (the paper's default, relative to the unit
whitened scale). With ``m < d`` and a small fixed sigma the family lives near an
m-dimensional manifold, which is LIVI's premise for BNN weights but cannot cover a
full-rank posterior: on small models keep ``m = d`` (the default), or pass
``learn_output_noise=True`` with a large start (``output_noise=0.5``) so sigma can fill the
missing directions (with a linear generator the family is then a factor-analysis Gaussian
``N(b, A A^T + sigma^2 I)`` in whitened coordinates, and the surrogate stays exact in
expectation). Measured on the 5-d conjugate Gaussian of the tests with ``m = 2`` (2000
steps, 8 particles): fixed sigma = 1e-3 gives sds 39-49% too small; learned sigma (from
0.5, ending at 0.82) gives every sd within 9% and every mean within 0.05 sd. Sigma is not
learned by default because the default ``m = d`` does not need it, and with a nonlinear
generator a large sigma takes the linearisation outside its regime.

Sigma and honest diagnostics: ``bayesgen.diagnose`` weighs draws with the extended-space
density ``1/(K+1) sum_k N(w; g(eps_k), sigma^2 I) p(eps_k) / r(eps_k | w)`` (the generating
draw ``eps_0`` and K fresh ones), which keeps the weights exact for any proposal ``r`` that
depends on ``w`` alone. With fresh draws from the prior (``importance_proposal="prior"``)
and a tiny sigma the generating draw's spike dominates: on the 5-d conjugate Gaussian
(2000 steps, every mean within 0.035 sd and sd within 1.5% of the truth; 1000 draws, K =
1000) the PSIS k-hat was 1.21 with sigma = 1e-3, 1.16 with 0.1 and 0.57 with 0.3, so a fine
fit with the paper's sigma was reported as unreliable. The default on models with ``d m <=
2^16`` is a Laplace reverse model (``importance_proposal="laplace"``,
:func:`bayesgen.families.implicit.laplace_reverse`): Gauss-Newton from ``eps = 0`` to the
mode of ``q(eps | w)`` and its Gaussian approximation there, exact for a linear generator
and nearly so for a one-to-one one. On the conjugate fit above it gives k-hat 0.05 and the
log-evidence within 0.02 nats (prior draws: 1.2 and 25 nats off). On Haario's banana (32
particles, 10k steps) the log-evidence errors of three seeds went from about -6 nats to
-0.003 to -0.004; the k-hats are 0.28, 0.86 and 0.99, and K = 10 and K = 1000 agree, so the
high ones are the fits' own light tails in the banana's arms, not the estimator
(docs/benchmarks.md).

Particles on small posteriors: a step is cheap on a small model (0.13 ms with 32 particles
on the 2-d banana), and more draws per step buy accuracy where the tails matter. On
Haario's banana (10k steps) sd(x2) is 14-15% short with 8 particles and within 3-9% with 32
and 3-7% with 64 (three seeds; docs/benchmarks.md): pass ``num_particles=32`` or more to
:func:`bayesgen.fit` for small, curved posteriors.

The preconditioner (``init_scale="auto"``): the pathfinder start of
:class:`~bayesgen.guides.base.PreconditionedGuide` (L-BFGS plus a dense or Hutchinson
diagonal Hessian at every iterate, on the full data) up to 20,000 latent dimensions; above,
``"prior"``: the model's initial point (``init_loc_fn``) with each coordinate's prior sd in
the unconstrained space (exact for real-valued sites whose prior has a closed-form
variance, from 64 prior draws otherwise). Pathfinder scores each of its 101 iterates with
16 Hessian-vector products and 32 potential evaluations on the full data. Measured on the
1M-weight BNN of :mod:`bayesgen.bench.livi` on kin8nm (7,373 rows, two CPU cores): a
full-data potential 0.31 s, its gradient 0.78 s, a Hessian-vector product 1.7 s, so about
101 x (16 x 1.7 + 32 x 0.31) s ~ 63 minutes before the first step. Scaled linearly in d the
same data give about a minute at 20,000 dimensions, hence the threshold. The prior scale
costs nothing and puts the untrained generator's draws at the scale of a standard network
initialisation (for ``W ~ N(0, 1/fan_in)`` priors), which is where the paper starts.

The matrix generator's smallest singular value is computed in its feature space (the last
layer is linear: ``J = H J_features``, with ``H^T H`` applied through the layer's two small
factors), so the three Rayleigh-Ritz iterations never form a d-sized tangent. Measured
with :func:`bayesgen.bench.livi.livi_bnn_benchmark` (1 particle, minibatch 256, kin8nm):
LIVI's step takes 1.5x AutoNormal's on a 1M-weight BNN on two CPU cores, and 2.4x on a
17M-weight BNN on an H100 (3.9x at 1M weights there, where both are launch-bound).

References
----------
Uppal, Stensbo-Smidt, Boomsma & Frellsen, "Implicit variational inference for
high-dimensional posteriors", NeurIPS 2023.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import jax.random as jr
import numpyro
from flax import nnx
from jax.flatten_util import ravel_pytree
from numpyro.distributions import biject_to, constraints
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int, check_positive, is_int
from bayesgen.families.implicit import (
    ENTROPY_METHODS,
    IMPORTANCE_PROPOSALS,
    LinearisedImplicit,
    MatrixGenerator,
    MLPGenerator,
    check_matrix_shapes,
)
from bayesgen.guides.base import PreconditionedGuide
from bayesgen.nn import nnx_param

__all__ = ["AutoLIVI"]

GENERATORS = ("auto", "mlp", "matrix")
#: ``generator="auto"`` uses the MLP generator up to this latent dimension.
MLP_MAX_DIM = 4096
#: ``init_scale="auto"`` runs the pathfinder start up to this latent dimension.
PATHFINDER_MAX_DIM = 20_000
#: noise dimension of the MLP generator above this latent dimension (``m = d`` below).
MLP_MAX_NOISE_DIM = 64
#: default sides of the matrix generator's noise and hidden matrices.
MATRIX_NOISE_SIDE = 32
MATRIX_HIDDEN_SIDE = 64
#: prior draws for the per-coordinate prior scale of sites without a closed-form variance.
PRIOR_SCALE_DRAWS = 64


def _is_real(constraint) -> bool:
    while isinstance(constraint, constraints._IndependentConstraint):
        constraint = constraint.base_constraint
    return constraint is constraints.real


def _is_pos_int(value) -> bool:
    return is_int(value) and value >= 1


class AutoLIVI(PreconditionedGuide):
    """LIVI guide over all latent sites of a model (linearised-entropy surrogate density).

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    noise_dim : the generator's noise. For ``"mlp"`` an int m <= d (default ``d`` up to 64
        latent dimensions, else 64); for ``"matrix"`` an ``(a, b)`` pair or a square int
        ``a * a`` (default ``(32, 32)``, capped by the output shape).
    generator : ``"auto"`` (``"mlp"`` up to d = 4096, ``"matrix"`` above), ``"mlp"`` or
        ``"matrix"``.
    hidden : MLP width (default ``clip(2 d, 32, 256)``), or the side (int) or ``(rows,
        cols)`` of the matrix generator's hidden matrices (default 64, at least the noise).
    depth : hidden layers (default 2 for the MLP, 1 for the matrix generator).
    output_noise : sigma, relative to the whitened unit scale (default 1e-3, the paper's).
    learn_output_noise : learn sigma (initialised at ``output_noise``) instead of fixing it.
    entropy : ``"auto"``, ``"exact"`` or ``"matrix_free"`` (see
        :mod:`bayesgen.families.implicit`).
    num_iterations : Rayleigh-Ritz iterations for the matrix-free smallest singular value.
    importance_proposal : ``"auto"`` (default: ``"laplace"`` up to ``d m <= 2^16``),
        ``"laplace"`` or ``"prior"``: where ``bayesgen.diagnose``'s fresh noise draws come
        from (module docstring).
    init_scale : ``"auto"`` (default: ``"pathfinder"`` up to 20,000 latent dimensions,
        ``"prior"`` above), ``"pathfinder"``, ``"prior"`` (initial point with the prior sd of
        each coordinate), a positive float (initial point with that constant scale, numpyro's
        convention), ``None`` (unit scale) or a ``(loc, scale)`` pair.
    init_steps, init_options, prefix, init_loc_fn, seed :
        as :class:`~bayesgen.guides.base.PreconditionedGuide`.
    """

    def __init__(
        self,
        model,
        *,
        noise_dim=None,
        generator: str = "auto",
        hidden=None,
        depth: int | None = None,
        output_noise: float = 1e-3,
        learn_output_noise: bool = False,
        entropy: str = "auto",
        num_iterations: int = 3,
        importance_proposal: str = "auto",
        init_scale="auto",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        if noise_dim is not None and not (
            _is_pos_int(noise_dim)
            or (isinstance(noise_dim, tuple | list) and len(noise_dim) == 2
                and all(_is_pos_int(s) for s in noise_dim))
        ):
            raise ValueError(
                f"noise_dim must be a positive int or a (rows, cols) pair of positive ints, "
                f"got {noise_dim!r}"
            )
        if generator == "mlp" and noise_dim is not None and not _is_pos_int(noise_dim):
            raise ValueError(
                f"noise_dim must be a positive int for generator='mlp', got {noise_dim!r}"
            )
        if hidden is not None and not (
            _is_pos_int(hidden)
            or (isinstance(hidden, tuple | list) and len(hidden) == 2
                and all(_is_pos_int(s) for s in hidden))
        ):
            raise ValueError(
                f"hidden must be a positive int (or a (rows, cols) pair for the matrix "
                f"generator), got {hidden!r}"
            )
        check_int("depth", depth, minimum=0, allow_none=True)
        check_positive("output_noise", output_noise)
        if entropy not in ENTROPY_METHODS:
            raise ValueError(f"entropy must be one of {ENTROPY_METHODS}, got {entropy!r}")
        check_int("num_iterations", num_iterations)
        if importance_proposal not in IMPORTANCE_PROPOSALS:
            raise ValueError(
                f"importance_proposal must be one of {IMPORTANCE_PROPOSALS}, got "
                f"{importance_proposal!r}"
            )
        self.importance_proposal = importance_proposal
        self._init_scale_request = init_scale
        if isinstance(init_scale, str):
            if init_scale not in ("auto", "pathfinder", "prior"):
                raise ValueError(
                    "init_scale must be 'auto', 'pathfinder', 'prior', a positive float, None "
                    f"or a (loc, scale) pair, got {init_scale!r}"
                )
            base_init_scale = "pathfinder" if init_scale == "pathfinder" else None
        elif isinstance(init_scale, int | float) and not isinstance(init_scale, bool):
            check_positive("init_scale", init_scale)
            base_init_scale = None
        else:
            base_init_scale = init_scale  # None or a pair: validated by the base class
        self.noise_dim = noise_dim
        self.generator = generator
        self.hidden = hidden
        self.depth = depth
        self.output_noise = float(output_noise)
        self.learn_output_noise = bool(learn_output_noise)
        self.entropy = entropy
        self.num_iterations = num_iterations
        self._generator_template = None
        self._noise_dim = None
        self._generator_kind = None
        super().__init__(
            model, init_scale=base_init_scale, init_steps=init_steps,
            init_options=init_options, prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    # --- set-up ---------------------------------------------------------------------------
    def _resolved_generator(self) -> str:
        if self.generator != "auto":
            return self.generator
        return "mlp" if self.latent_dim <= MLP_MAX_DIM else "matrix"

    def _dense(self):
        return self.latent_dim <= 256 and self._resolved_generator() == "mlp"

    def _find_preconditioner(self, key):
        request = self._init_scale_request
        d = self.latent_dim
        if request == "auto":
            request = "pathfinder" if d <= PATHFINDER_MAX_DIM else "prior"
        if request == "pathfinder":
            self.init_scale = "pathfinder"
            return super()._find_preconditioner(key)
        if request == "prior":
            scale = self._prior_scale(key)
        elif isinstance(request, int | float) and not isinstance(request, bool):
            scale = jnp.full(d, float(request))
        else:
            return super()._find_preconditioner(key)
        if self._dense():
            scale = jnp.diag(scale)
        return self._init_latent, scale

    def _prior_scale(self, key):
        """Prior sd of each flat coordinate in the unconstrained space.

        From each latent site's prior in the prototype trace (conditional on the prototype's
        values of its parents): ``sqrt(variance)`` for real-valued sites whose prior has one,
        else the sd of ``PRIOR_SCALE_DRAWS`` prior draws mapped to the unconstrained space.
        """
        init = self._unpack_latent(self._init_latent)
        keys = jr.split(key, max(len(init), 1))
        scales = {}
        for k, (name, unconstrained) in zip(keys, sorted(init.items()), strict=False):
            fn = self.prototype_trace[name]["fn"]
            shape = jnp.shape(unconstrained)
            sd = None
            if _is_real(fn.support):
                try:
                    sd = jnp.sqrt(jnp.broadcast_to(fn.variance, shape))
                except (NotImplementedError, AttributeError, ValueError, TypeError):
                    sd = None
            if sd is None or not bool(jnp.all(jnp.isfinite(sd))):
                draws = biject_to(fn.support).inv(fn.sample(k, (PRIOR_SCALE_DRAWS,)))
                sd = jnp.std(draws, axis=0)
            sd = jnp.broadcast_to(sd, shape)
            scales[name] = jnp.where(jnp.isfinite(sd) & (sd > 0), sd, 1.0)
        flat, _ = ravel_pytree(scales)
        return flat.astype(self._init_latent.dtype)

    def _build(self, key):
        d = self.latent_dim
        kind = self._resolved_generator()
        self._generator_kind = kind
        k_net, k_std = jr.split(key)
        if kind == "mlp":
            m = self.noise_dim if self.noise_dim is not None else min(d, MLP_MAX_NOISE_DIM)
            if m > d:
                raise ValueError(
                    f"noise_dim={m} exceeds this model's latent dimension {d}: LIVI needs "
                    f"noise_dim <= {d}"
                )
            width = self.hidden if self.hidden is not None else int(min(256, max(32, 2 * d)))
            if not _is_pos_int(width):
                raise ValueError(f"hidden must be an int for generator='mlp', got {width!r}")
            depth = 2 if self.depth is None else self.depth
            self._generator_template = MLPGenerator(
                m, d, width=width, depth=depth, rngs=nnx.Rngs(params=k_net)
            )
            self._noise_dim = m
            return
        shapes = self._matrix_shapes(d)
        self._generator_template = MatrixGenerator(
            shapes, d, rngs=nnx.Rngs(params=k_net)
        ).standardise_output(k_std)
        self._noise_dim = shapes[0][0] * shapes[0][1]

    def _matrix_shapes(self, d):
        rows = math.isqrt(d - 1) + 1 if d > 1 else 1
        cols = -(-d // rows)
        if self.noise_dim is None:
            side = min(MATRIX_NOISE_SIDE, rows, cols)
            noise = (side, side)
        elif isinstance(self.noise_dim, int):
            side = math.isqrt(self.noise_dim)
            if side * side != self.noise_dim:
                raise ValueError(
                    f"noise_dim={self.noise_dim} for the matrix generator must be a square "
                    "int or a (rows, cols) pair"
                )
            noise = (side, side)
        else:
            noise = tuple(self.noise_dim)
        if self.hidden is None:
            hidden = (max(noise[0], min(MATRIX_HIDDEN_SIDE, rows)),
                      max(noise[1], min(MATRIX_HIDDEN_SIDE, cols)))
        elif isinstance(self.hidden, int):
            hidden = (self.hidden, self.hidden)
        else:
            hidden = tuple(self.hidden)
        depth = 1 if self.depth is None else self.depth
        out = (max(rows, hidden[0], noise[0]) if depth else max(rows, noise[0]),
               max(cols, hidden[1], noise[1]) if depth else max(cols, noise[1]))
        shapes = [noise] + [hidden] * depth + [out]
        if noise[0] * noise[1] > d:
            raise ValueError(
                f"noise_dim={noise} has {noise[0] * noise[1]} entries, more than this model's "
                f"latent dimension {d}: LIVI needs noise_dim <= {d}"
            )
        try:
            check_matrix_shapes(shapes)
        except ValueError as err:
            raise ValueError(f"hidden/noise_dim: {err}") from None
        return shapes

    # --- the family -------------------------------------------------------------------------
    def _get_posterior(self):
        generator = nnx_param(f"{self.prefix}_generator", self._generator_template)
        if self.learn_output_noise:
            sigma = numpyro.param(
                f"{self.prefix}_output_noise", jnp.asarray(self.output_noise),
                constraint=constraints.positive,
            )
        else:
            sigma = jnp.asarray(self.output_noise)
        linear_head = None
        if self._generator_kind == "matrix":  # the s_min iteration runs in feature space
            linear_head = (
                lambda eps: generator(eps, part="features"),
                lambda features: generator(features, part="head"),
                lambda u: generator(u, part="head_gram"),
            )
        pre_loc, pre_scale = self.preconditioner
        return LinearisedImplicit(
            generator, self._noise_dim, sigma, pre_loc, pre_scale,
            entropy=self.entropy, num_iterations=self.num_iterations, linear_head=linear_head,
            importance_proposal=self.importance_proposal,
        )

    def median(self, params):
        """Constrained values at the image of the noise's median (eps = 0, no output noise)."""
        latent = self.get_posterior(params).transform(jnp.zeros(self._noise_dim))
        return self._unpack_and_constrain(latent, params)
