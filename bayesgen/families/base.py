"""The family contract: a variational family is a numpyro distribution over the flat latent.

Every family in bayesgen is a :class:`numpyro.distributions.Distribution` whose event is the
flat, unconstrained latent vector ``z`` of a model (shape ``(latent_dim,)``, support the real
vectors). It implements two methods:

``sample_with_intermediates(key, sample_shape=()) -> (z, intermediates)``
    A reparameterised draw ``z`` and whatever the density needs that the draw already
    computed (the flow's log-density, the SIVI mixing draws, a diffusion path ...).
    ``intermediates`` is a list (numpyro's convention); it may be empty.

``log_prob(value, intermediates=None)``
    The family's score of ``value``. numpyro's ``log_density`` hands the guide site's
    intermediates back to ``log_prob``, so stock ``Trace_ELBO``, ``SVI`` and ``Predictive``
    work unchanged. What the score *is* is declared by the class attribute ``density``:

    ``"exact"``
        ``log_prob`` is log q(z). With intermediates it returns the log-density computed
        along the draw (same value and same pathwise gradient as evaluating log q at
        ``z(eps, phi)``); without intermediates it evaluates log q(value) directly, through
        an inverse where the family has one.
    ``"lower_bound"``
        ``E[log p - log_prob]`` is a lower bound on the ELBO and hence on log p(x)
        (SIVI's K-draw surrogate, diffusion path terms). ``log_prob`` needs the
        intermediates of the draw.
    ``"unbiased_gradient"``
        ``log_prob`` is a surrogate whose pathwise gradient is an unbiased estimate of the
        gradient of E[log q] (UIVI); its value is not log q.
    ``"approximate"``
        ``log_prob`` approximates log q with no bound or unbiasedness guarantee in general
        (LIVI's linearised entropy); the family documents the special case where it is
        exact (for LIVI: a linear generator).

Anything that needs log q itself (PSIS k-hat, importance-weighted evidence) must not use a
surrogate. A family whose draws come from a tractable joint q(z, eps) (semi-implicit and
implicit families: ``z ~ q(z | eps)``, ``eps ~ q(eps)``) provides
``log_importance_density(key, value, intermediates, num_mixing)``: the log-density of an
extended-space proposal whose importance weights ``p(x, z) / exp(...)`` have expectation
exactly ``p(x)`` (see :mod:`bayesgen.families.semi_implicit`). :mod:`bayesgen.diagnostics`
uses ``log_prob`` for exact families, that method otherwise, and refuses a family with
neither.

Families carry their parameters as ordinary jax arrays/pytrees; the guides in
:mod:`bayesgen.guides` register those with ``numpyro.param``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints

DENSITY_KINDS = ("exact", "lower_bound", "unbiased_gradient", "approximate")


class Family(Distribution):
    """Base class of variational families over the flat unconstrained latent.

    Subclasses set ``density`` and implement :meth:`sample_with_intermediates` and
    :meth:`log_prob`. ``sample`` is derived from ``sample_with_intermediates``.
    """

    support = constraints.real_vector
    arg_constraints: ClassVar[dict] = {}
    reparametrized_params: ClassVar[list] = []
    has_rsample = True
    density: ClassVar[str] = "exact"

    def __init__(self, latent_dim: int, *, batch_shape=(), validate_args=None):
        self.latent_dim = int(latent_dim)
        super().__init__(
            batch_shape=batch_shape,
            event_shape=(self.latent_dim,),
            validate_args=validate_args,
        )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.density not in DENSITY_KINDS:
            raise TypeError(
                f"{cls.__name__}.density must be one of {DENSITY_KINDS}, got {cls.density!r}"
            )

    def sample_with_intermediates(self, key, sample_shape=()):
        raise NotImplementedError

    def sample(self, key, sample_shape=()):
        return self.sample_with_intermediates(key, sample_shape)[0]

    def rsample(self, key, sample_shape=()):
        return self.sample(key, sample_shape)

    def log_prob(self, value, intermediates=None):
        raise NotImplementedError

    def tree_flatten(self):  # families are rebuilt inside the guide, never vmapped over
        raise NotImplementedError(
            f"{type(self).__name__} is not a pytree; build it inside the guide instead"
        )


class PathSurrogate:
    """Mixin of path-space families (diffusions, stochastic flows): the draw's path term.

    ``sample_with_intermediates`` returns ``[log q(path) - log r(path | z)]``; ``log_prob``
    hands it back (a lower-bound surrogate, ``density = "lower_bound"``) and
    ``log_importance_density`` returns the same term, since ``exp(log p(x, z) - it)`` is an
    exact importance weight on path space (its expectation is p(x)).
    """

    def log_prob(self, value, intermediates=None):
        if intermediates:
            return intermediates[0]
        raise ValueError(
            f"{type(self).__name__}.log_prob is a path-space surrogate of a draw and needs that "
            "draw's intermediates (numpyro passes them from the guide's sample site); it has no "
            "closed-form density at an arbitrary value"
        )

    def log_importance_density(self, key, value, intermediates, num_mixing: int = 0):
        """Path-space proposal log-density: ``exp(log p(x, z) - it)`` has expectation p(x).

        ``key`` and ``num_mixing`` are unused (the path is the extended variable).
        """
        del key, num_mixing
        check_latent(value, self.latent_dim)
        return self.log_prob(value, intermediates)


class WhitenedCoordinates:
    """Mixin for families that work in a fixed preconditioner's coordinates, ``z = m0 + L0 w``.

    The family sets ``precond_loc`` (m0, (d,)) and ``precond_scale`` (L0: a (d,) vector or a
    (d, d) lower triangular matrix).
    """

    def to_latent(self, w):
        """``z = m0 + L0 w``."""
        if self.precond_scale.ndim == 1:
            return self.precond_loc + self.precond_scale * w
        return self.precond_loc + w @ self.precond_scale.T

    def to_whitened(self, z):
        """``w = L0^{-1} (z - m0)``."""
        if self.precond_scale.ndim == 1:
            return (z - self.precond_loc) / self.precond_scale
        r = z - self.precond_loc  # (..., d): solve for all leading dims as columns at once
        w = jax.scipy.linalg.solve_triangular(
            self.precond_scale, jnp.reshape(r, (-1, r.shape[-1])).T, lower=True)
        return jnp.reshape(w.T, r.shape)

    def whiten_score(self, score_z):
        """Score in z coordinates -> score in w coordinates (``L0^T s``)."""
        if self.precond_scale.ndim == 1:
            return score_z * self.precond_scale
        return score_z @ self.precond_scale

    def _log_det_precond(self):
        scale = self.precond_scale
        diag = scale if scale.ndim == 1 else jnp.diagonal(scale)
        return jnp.sum(jnp.log(jnp.abs(diag)))


def check_latent(value, latent_dim: int, name: str = "value"):
    """Raise a clear error when ``value`` is not a (batch of) flat latent vector(s)."""
    shape = jnp.shape(value)
    if len(shape) == 0 or shape[-1] != latent_dim:
        raise ValueError(
            f"{name} must have trailing dimension {latent_dim} (the flat latent), got shape {shape}"
        )
