"""Benchmark targets with known answers.

Each target is a :class:`Target`: a numpyro model with its data, the dimension of its
flat latent, and a way to get reference draws -- exact i.i.d. draws for the analytic
targets, stored long-NUTS draws for the hierarchical and regression targets. Where
the answer is known in closed form the target also carries ``log_Z`` (the log
normalising constant of the model's unnormalised density over its latent sites,
``0.0`` for the normalised analytic targets) and the true marginal means and
standard deviations.

Targets (see :data:`TARGETS`, :func:`get_target`):

==========================  ===================================================  =========
name                        what it tests                                        reference
==========================  ===================================================  =========
``gaussian``                correlated Gaussian, condition number ~50            exact
``conjugate_gaussian``      posterior of a conjugate linear-Gaussian regression  exact
``banana``                  Haario et al. twisted Gaussian (curved, 2-d)         exact
``funnel``                  Neal's funnel (scale varies by e^4.5 across v)       exact
``ring``                    8 separated Gaussian modes on a circle (2-d)         exact
``eight_schools_centered``  hierarchical, centred (funnel geometry)               NUTS
``eight_schools_noncentered``  the same posterior, non-centred                   NUTS
``logistic_regression``     breast-cancer logistic regression, 31-d              NUTS
==========================  ===================================================  =========

Site conventions: the vector targets use one site ``z``; the funnel uses ``v`` (scalar)
and ``x`` (vector); eight schools uses ``mu``, ``tau`` and ``theta`` (non-centred:
``theta_tilde`` latent and ``theta`` deterministic); logistic regression uses
``intercept`` and ``beta``. Reference draws are dictionaries ``site -> (n, *shape)``
numpy arrays.

The stored references are made by :mod:`bayesgen.models.make_references`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = [
    "Target",
    "TARGETS",
    "get_target",
    "reference_moments",
    "modes_covered",
    "Banana",
    "ConjugateGaussian",
    "conjugate_gaussian_model",
    "gaussian_model",
    "banana_model",
    "funnel_model",
    "ring_model",
    "ring_centers",
    "eight_schools_centered_model",
    "eight_schools_noncentered_model",
    "logistic_regression_model",
    "EIGHT_SCHOOLS_Y",
    "EIGHT_SCHOOLS_SIGMA",
    "load_reference",
]

# --------------------------------------------------------------------------------------
# The Target record
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Target:
    """A numpyro model with known answers.

    Attributes
    ----------
    name : str
        Registry name.
    model : callable
        numpyro model; call as ``model(*args, **kwargs)``.
    args, kwargs : tuple, dict
        The data (and static settings) the model is called with.
    latent_dim : int
        Size of the flat unconstrained latent vector.
    reference : callable
        ``reference(key, n) -> dict site -> np.ndarray of shape (n, *site_shape)``.
        Exact i.i.d. draws for analytic targets (``exact=True``); a random subset of the
        stored NUTS draws otherwise (``n=None`` returns all of them).
    exact : bool
        Whether ``reference`` gives exact independent draws.
    log_Z : float or None
        Log normalising constant of the model's density over its latent sites (the
        log evidence for a conditioned model); ``None`` where unknown.
    true_mean, true_sd : dict or None
        Closed-form marginal means and standard deviations, site -> array.
    log_prob : callable or None
        Analytic log density of the latent sites, ``log_prob(params) -> array``
        (batched over leading dimensions), normalised so that
        ``log_prob = model log density - log_Z``.
    description : str
        One line of what the target is.
    extra : dict
        Target-specific facts (covariance matrix, mode centres, feature names, ...).
    """

    name: str
    model: Callable
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    latent_dim: int = 0
    reference: Optional[Callable] = None
    exact: bool = False
    log_Z: Optional[float] = None
    true_mean: Optional[Mapping[str, np.ndarray]] = None
    true_sd: Optional[Mapping[str, np.ndarray]] = None
    log_prob: Optional[Callable] = None
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def log_joint(self, params):
        """The model's log density at ``params`` (dict site -> value, constrained)."""
        from numpyro.infer.util import log_density

        return log_density(self.model, self.args, dict(self.kwargs), params)[0]

    def __repr__(self):
        return f"Target(name={self.name!r}, latent_dim={self.latent_dim}, exact={self.exact})"


def _mvn_log_prob(x, mean, cov):
    """log N(x; mean, cov), batched over leading dims of x (jax)."""
    chol = jnp.linalg.cholesky(jnp.asarray(cov))
    diff = jnp.asarray(x) - jnp.asarray(mean)
    sol = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    d = chol.shape[-1]
    return (
        -0.5 * jnp.sum(sol**2, -1)
        - jnp.sum(jnp.log(jnp.diag(chol)))
        - 0.5 * d * math.log(2 * math.pi)
    )


def _mvn_reference(site, mean, cov):
    mean = np.asarray(mean)
    chol = np.linalg.cholesky(np.asarray(cov))

    def reference(key, n):
        eps = np.asarray(jax.random.normal(key, (n, mean.shape[0])), dtype=np.float64)
        return {site: (mean + eps @ chol.T).astype(np.float32)}

    return reference


# --------------------------------------------------------------------------------------
# Correlated Gaussian
# --------------------------------------------------------------------------------------


def gaussian_model(mean, cov):
    """``z ~ MultivariateNormal(mean, cov)`` as one site ``z``."""
    numpyro.sample(
        "z", dist.MultivariateNormal(jnp.asarray(mean), covariance_matrix=jnp.asarray(cov))
    )


def _random_covariance(rng, dim, condition_number):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))
    eig = np.geomspace(0.2, 0.2 * condition_number, dim) if dim > 1 else np.ones(1)
    cov = (q * eig) @ q.T
    return 0.5 * (cov + cov.T)


def make_gaussian(dim: int = 5, condition_number: float = 50.0, seed: int = 0) -> Target:
    """Correlated Gaussian target ``N(mean, cov)`` in ``dim`` dimensions.

    The covariance is ``Q diag(lambda) Q^T`` with a seeded Haar-random rotation ``Q`` and
    eigenvalues geometrically spaced on ``[0.2, 0.2 * condition_number]``; the mean is
    drawn uniformly on ``[-3, 3]^dim``. Normalised: ``log_Z = 0``.

    Parameters
    ----------
    dim : int
        Dimension.
    condition_number : float
        Ratio of the largest to smallest covariance eigenvalue (default 50).
    seed : int
        Seed of the mean and covariance.
    """
    rng = np.random.default_rng(seed)
    cov = _random_covariance(rng, dim, condition_number)
    mean = rng.uniform(-3.0, 3.0, size=dim)
    return Target(
        name="gaussian",
        model=gaussian_model,
        args=(mean.astype(np.float32), cov.astype(np.float32)),
        latent_dim=dim,
        reference=_mvn_reference("z", mean, cov),
        exact=True,
        log_Z=0.0,
        true_mean={"z": mean},
        true_sd={"z": np.sqrt(np.diag(cov))},
        log_prob=lambda p: _mvn_log_prob(p["z"], mean, cov),
        description=f"{dim}-d correlated Gaussian, condition number {condition_number:g}",
        extra={"mean": mean, "cov": cov},
    )


# --------------------------------------------------------------------------------------
# Conjugate linear-Gaussian regression
# --------------------------------------------------------------------------------------


class ConjugateGaussian(NamedTuple):
    """A conjugate linear-Gaussian model and its exact posterior.

    Unpacks as ``model, data, post_mean, post_cov``; call the model as ``model(**data)``.
    """

    model: Callable
    data: dict
    post_mean: np.ndarray
    post_cov: np.ndarray

    @property
    def log_evidence(self) -> float:
        """``log p(y) = log N(y; A m0, A S0 A^T + s^2 I)`` in closed form."""
        A = np.asarray(self.data["A"], np.float64)
        m0 = np.asarray(self.data["prior_mean"], np.float64)
        S0 = np.asarray(self.data["prior_cov"], np.float64)
        s = float(self.data["noise_scale"])
        y = np.asarray(self.data["y"], np.float64)
        C = A @ S0 @ A.T + s**2 * np.eye(len(y))
        L = np.linalg.cholesky(C)
        r = np.linalg.solve(L, y - A @ m0)
        return float(
            -0.5 * r @ r - np.log(np.diag(L)).sum() - 0.5 * len(y) * np.log(2 * np.pi)
        )


def _conjugate_model(A, prior_mean, prior_cov, noise_scale, y=None):
    """``z ~ N(m0, S0)``, ``y | z ~ N(A z, noise_scale^2 I)``."""
    z = numpyro.sample(
        "z",
        dist.MultivariateNormal(
            jnp.asarray(prior_mean), covariance_matrix=jnp.asarray(prior_cov)
        ),
    )
    mu = jnp.asarray(A) @ z
    with numpyro.plate("N", mu.shape[0]):
        numpyro.sample("y", dist.Normal(mu, noise_scale), obs=y)


def conjugate_gaussian_model(
    dim: int = 5, num_obs: int = 20, noise_scale: float = 1.0, seed: int = 0
) -> ConjugateGaussian:
    """A conjugate linear-Gaussian regression with a correlated closed-form posterior.

    Model: ``z ~ N(m0, S0)`` (``S0`` a seeded correlated covariance, ``m0`` nonzero),
    ``y | z ~ N(A z, s^2 I)`` with a seeded design ``A`` whose columns are correlated,
    and ``y`` simulated from the model at a seeded ``z*``. The posterior is Gaussian
    with

    .. math::
        \\Sigma_n = (S_0^{-1} + A^T A / s^2)^{-1}, \\qquad
        m_n = \\Sigma_n (S_0^{-1} m_0 + A^T y / s^2).

    Parameters
    ----------
    dim : int
        Dimension of ``z``.
    num_obs : int
        Number of observations.
    noise_scale : float
        Observation noise sd ``s``.
    seed : int
        Seed of the prior, design and data.

    Returns
    -------
    ConjugateGaussian
        ``(model, data, post_mean, post_cov)``; ``model(**data)`` conditions on ``y``.
        ``.log_evidence`` gives ``log p(y)``.

    References
    ----------
    Bishop, C. M. (2006). *Pattern Recognition and Machine Learning*, section 3.3.
    """
    rng = np.random.default_rng(1000 + seed)
    S0 = _random_covariance(rng, dim, 10.0) * 2.0
    m0 = rng.uniform(-1.0, 1.0, size=dim)
    mix = np.eye(dim) + 0.8 * np.tril(np.ones((dim, dim)), -1) / np.sqrt(dim)
    A = rng.normal(size=(num_obs, dim)) @ mix.T
    z_true = m0 + np.linalg.cholesky(S0) @ rng.normal(size=dim)
    y = A @ z_true + noise_scale * rng.normal(size=num_obs)
    P = np.linalg.inv(S0) + A.T @ A / noise_scale**2
    post_cov = np.linalg.inv(P)
    post_cov = 0.5 * (post_cov + post_cov.T)
    post_mean = post_cov @ (np.linalg.solve(S0, m0) + A.T @ y / noise_scale**2)
    data = {
        "A": A.astype(np.float32),
        "prior_mean": m0.astype(np.float32),
        "prior_cov": S0.astype(np.float32),
        "noise_scale": float(noise_scale),
        "y": y.astype(np.float32),
    }
    return ConjugateGaussian(_conjugate_model, data, post_mean, post_cov)


def make_conjugate_gaussian(
    dim: int = 5, num_obs: int = 20, noise_scale: float = 1.0, seed: int = 0
) -> Target:
    """The posterior of :func:`conjugate_gaussian_model` as a target (``log_Z`` = log evidence)."""
    cg = conjugate_gaussian_model(dim, num_obs, noise_scale, seed)
    return Target(
        name="conjugate_gaussian",
        model=cg.model,
        kwargs=dict(cg.data),
        latent_dim=dim,
        reference=_mvn_reference("z", cg.post_mean, cg.post_cov),
        exact=True,
        log_Z=cg.log_evidence,
        true_mean={"z": cg.post_mean},
        true_sd={"z": np.sqrt(np.diag(cg.post_cov))},
        log_prob=lambda p: _mvn_log_prob(p["z"], cg.post_mean, cg.post_cov),
        description=f"posterior of a conjugate {dim}-d linear-Gaussian regression",
        extra={"post_mean": cg.post_mean, "post_cov": cg.post_cov},
    )


# --------------------------------------------------------------------------------------
# Banana
# --------------------------------------------------------------------------------------


class Banana(dist.Distribution):
    """Haario et al.'s twisted Gaussian ("banana") on R^2.

    If ``x ~ N(0, diag(scale1^2, 1))`` then ``y = (x1, x2 + b x1^2 - b scale1^2)``. The
    map has unit Jacobian, so

    .. math::
        \\log p(y) = \\log N(y_1; 0, s_1^2) + \\log N(y_2 - b y_1^2 + b s_1^2; 0, 1).

    ``E[y] = 0``, ``sd(y1) = s1`` and ``var(y2) = 1 + 2 b^2 s1^4`` (19 for the default
    ``b = 0.03``, ``s1 = 10``).

    References
    ----------
    Haario, H., Saksman, E. and Tamminen, J. (1999). Adaptive proposal distribution for
    random walk Metropolis algorithm. *Computational Statistics* 14, 375-395.
    Haario, H., Saksman, E. and Tamminen, J. (2001). An adaptive Metropolis algorithm.
    *Bernoulli* 7(2), 223-242.
    """

    arg_constraints = {"b": constraints.real, "scale1": constraints.positive}
    reparametrized_params = ["b", "scale1"]
    support = constraints.real_vector
    pytree_data_fields = ("b", "scale1")

    def __init__(self, b=0.03, scale1=10.0, *, validate_args=None):
        self.b = b
        self.scale1 = scale1
        super().__init__(batch_shape=(), event_shape=(2,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        x = jax.random.normal(key, tuple(sample_shape) + (2,))
        x1 = x[..., 0] * self.scale1
        y2 = x[..., 1] + self.b * (x1**2 - self.scale1**2)
        return jnp.stack([x1, y2], axis=-1)

    def log_prob(self, value):
        y1, y2 = value[..., 0], value[..., 1]
        x2 = y2 - self.b * (y1**2 - self.scale1**2)
        return dist.Normal(0.0, self.scale1).log_prob(y1) + dist.Normal(0.0, 1.0).log_prob(x2)


def banana_model(b=0.03, scale1=10.0):
    """One 2-d site ``z ~ Banana(b, scale1)``; see :class:`Banana`."""
    numpyro.sample("z", Banana(b, scale1))


def make_banana(b: float = 0.03, scale1: float = 10.0) -> Target:
    """Haario et al.'s banana with curvature ``b`` (default 0.03) and ``sd(x1) = scale1``.

    References
    ----------
    Haario, H., Saksman, E. and Tamminen, J. (2001). An adaptive Metropolis algorithm.
    *Bernoulli* 7(2), 223-242.
    """
    d = Banana(b, scale1)

    def reference(key, n):
        return {"z": np.asarray(d.sample(key, (n,)), np.float32)}

    sd2 = math.sqrt(1.0 + 2.0 * b**2 * scale1**4)
    return Target(
        name="banana",
        model=banana_model,
        kwargs={"b": b, "scale1": scale1},
        latent_dim=2,
        reference=reference,
        exact=True,
        log_Z=0.0,
        true_mean={"z": np.zeros(2)},
        true_sd={"z": np.array([scale1, sd2])},
        log_prob=lambda p: d.log_prob(p["z"]),
        description=f"Haario banana, b={b:g}",
        extra={"b": b, "scale1": scale1},
    )


# --------------------------------------------------------------------------------------
# Neal's funnel
# --------------------------------------------------------------------------------------


def funnel_model(dim=10, v_scale=3.0):
    """Neal's funnel: ``v ~ N(0, v_scale)``, ``x_i | v ~ N(0, exp(v/2))``, i < dim."""
    v = numpyro.sample("v", dist.Normal(0.0, v_scale))
    numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)).expand([dim - 1]).to_event(1))


def make_funnel(dim: int = 10, v_scale: float = 3.0) -> Target:
    """Neal's funnel in ``dim`` dimensions (sites ``v``, scalar, and ``x``, ``dim - 1``).

    ``v ~ N(0, 3^2)`` and ``x_i | v ~ N(0, e^v)`` (sd ``exp(v/2)``). Truth: ``sd(v) = 3``,
    ``E x_i = 0``, ``sd(x_i) = exp(v_scale^2 / 4)`` (about 9.49); normalised, ``log_Z = 0``.

    References
    ----------
    Neal, R. M. (2003). Slice sampling. *Annals of Statistics* 31(3), 705-767.
    """
    if dim < 2:
        raise ValueError(f"funnel needs dim >= 2, got dim={dim}")

    def reference(key, n):
        kv, kx = jax.random.split(key)
        v = jax.random.normal(kv, (n,)) * v_scale
        x = jax.random.normal(kx, (n, dim - 1)) * jnp.exp(v / 2)[:, None]
        return {"v": np.asarray(v, np.float32), "x": np.asarray(x, np.float32)}

    def log_prob(p):
        v, x = p["v"], p["x"]
        return dist.Normal(0.0, v_scale).log_prob(v) + dist.Normal(
            0.0, jnp.exp(v / 2)[..., None]
        ).log_prob(x).sum(-1)

    return Target(
        name="funnel",
        model=funnel_model,
        kwargs={"dim": dim, "v_scale": v_scale},
        latent_dim=dim,
        reference=reference,
        exact=True,
        log_Z=0.0,
        true_mean={"v": np.zeros(()), "x": np.zeros(dim - 1)},
        true_sd={
            "v": np.asarray(v_scale, np.float64),
            "x": np.full(dim - 1, math.exp(v_scale**2 / 4)),
        },
        log_prob=log_prob,
        description=f"Neal's funnel, {dim}-d",
        extra={"v_scale": v_scale},
    )


# --------------------------------------------------------------------------------------
# Ring of Gaussians
# --------------------------------------------------------------------------------------


def ring_centers(num_modes: int = 8, radius: float = 5.0) -> np.ndarray:
    """Centres ``radius * (cos 2 pi k / K, sin 2 pi k / K)``, shape ``(K, 2)``."""
    ang = 2 * np.pi * np.arange(num_modes) / num_modes
    return radius * np.stack([np.cos(ang), np.sin(ang)], -1)


def _ring_dist(centers, sd):
    centers = jnp.asarray(centers)
    k = centers.shape[0]
    return dist.MixtureSameFamily(
        dist.Categorical(probs=jnp.ones(k) / k),
        dist.Normal(centers, sd).to_event(1),
    )


def ring_model(centers, sd=0.5):
    """One 2-d site ``z`` from the equal-weight mixture of ``N(c_k, sd^2 I)``."""
    numpyro.sample("z", _ring_dist(centers, sd))


def make_ring(num_modes: int = 8, radius: float = 5.0, sd: float = 0.5) -> Target:
    """Equal-weight mixture of ``num_modes`` isotropic Gaussians on a circle.

    Defaults: 8 modes, radius 5, component sd 0.5, so neighbouring centres are
    ``2 r sin(pi / 8) = 3.83`` apart (7.7 component sds). Normalised, ``log_Z = 0``.
    Truth: mean 0, per-coordinate variance ``sd^2 + r^2 / 2`` (for ``K >= 3``). Use
    :func:`modes_covered` to score mode coverage.
    """
    centers = ring_centers(num_modes, radius)
    d = _ring_dist(centers, sd)

    def reference(key, n):
        return {"z": np.asarray(d.sample(key, (n,)), np.float32)}

    mean = centers.mean(0)
    var = sd**2 + (centers**2).mean(0) - mean**2
    return Target(
        name="ring",
        model=ring_model,
        args=(centers.astype(np.float32),),
        kwargs={"sd": sd},
        latent_dim=2,
        reference=reference,
        exact=True,
        log_Z=0.0,
        true_mean={"z": mean},
        true_sd={"z": np.sqrt(var)},
        log_prob=lambda p: d.log_prob(p["z"]),
        description=f"ring of {num_modes} Gaussians, radius {radius:g}, sd {sd:g}",
        extra={"centers": centers, "sd": sd, "radius": radius, "num_modes": num_modes},
    )


def modes_covered(
    samples,
    threshold: float = 0.02,
    radius_sd: float = 2.0,
    *,
    centers=None,
    sd: float = 0.5,
    num_modes: int = 8,
    radius: float = 5.0,
) -> int:
    """Number of ring modes holding at least ``threshold`` of the draws.

    A draw belongs to mode ``k`` when it lies within ``radius_sd * sd`` of centre ``c_k``.
    Exact draws put ``(1 - exp(-radius_sd^2 / 2)) / K`` in each mode (10.8% for the
    defaults), so all modes count.

    Parameters
    ----------
    samples : array (n, 2) or dict with key ``"z"``
        Draws.
    threshold : float
        Minimum fraction of all draws near a centre for the mode to count.
    radius_sd : float
        Neighbourhood radius in component sds.
    centers : array (K, 2), optional
        Mode centres; default :func:`ring_centers` ``(num_modes, radius)``.
    sd, num_modes, radius : float, int, float
        The ring's settings (defaults of :func:`make_ring`).
    """
    if isinstance(samples, Mapping):
        samples = samples["z"]
    z = np.asarray(samples, np.float64).reshape(-1, 2)
    c = ring_centers(num_modes, radius) if centers is None else np.asarray(centers)
    dist2 = ((z[:, None, :] - c[None]) ** 2).sum(-1)
    frac = (dist2 <= (radius_sd * sd) ** 2).mean(0)
    return int((frac >= threshold).sum())


# --------------------------------------------------------------------------------------
# Stored references
# --------------------------------------------------------------------------------------

_REFERENCE_FILES = {
    "eight_schools": "eight_schools_reference.npz",
    "logistic_regression": "logistic_regression_reference.npz",
    "logistic_regression_unstandardized": "logistic_regression_unstandardized_reference.npz",
}


def _data_path(filename):
    from bayesgen.datasets import data_path

    return data_path(filename)


@functools.lru_cache(maxsize=None)
def load_reference(name: str) -> dict:
    """Load a stored reference run: dict of read-only arrays (draws and ``meta_*`` settings).

    ``name`` is one of ``"eight_schools"``, ``"logistic_regression"``,
    ``"logistic_regression_unstandardized"``.
    """
    if name not in _REFERENCE_FILES:
        raise ValueError(f"no stored reference {name!r}; available: {sorted(_REFERENCE_FILES)}")
    path = _data_path(_REFERENCE_FILES[name])
    if not path.is_file():
        raise FileNotFoundError(
            f"reference file {_REFERENCE_FILES[name]} is missing from bayesgen/data; "
            "make it with `python -m bayesgen.models.make_references`"
        )
    with resources.as_file(path) as p, np.load(p) as f:
        out = {k: f[k] for k in f.files}
    for v in out.values():
        v.flags.writeable = False  # cached and shared: copy before modifying
    return out


def _stored_reference(name, sites, transform=None):
    def reference(key=None, n=None):
        data = load_reference(name)
        draws = {s: data[s] for s in sites}
        total = next(iter(draws.values())).shape[0]
        if n is not None:
            if n > total:
                raise ValueError(
                    f"asked for {n} reference draws of {name!r}; {total} are stored"
                )
            if key is None:
                key = jax.random.key(0)
            idx = np.asarray(jax.random.permutation(key, total))[:n]
            draws = {s: v[idx] for s, v in draws.items()}
        if transform is not None:
            draws = transform(draws)
        return draws

    return reference


# --------------------------------------------------------------------------------------
# Eight schools
# --------------------------------------------------------------------------------------

EIGHT_SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools_centered_model(sigma, y=None):
    """Centred eight schools: ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``.

    Priors ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``.
    """
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", jnp.shape(sigma)[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered_model(sigma, y=None):
    """Non-centred eight schools: ``theta = mu + tau * theta_tilde``, ``theta_tilde ~ N(0, 1)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", jnp.shape(sigma)[0]):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_tilde)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _add_theta_tilde(draws):
    draws = dict(draws)
    draws["theta_tilde"] = (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]
    return draws


def _make_eight_schools(centered: bool) -> Target:
    """Eight schools (Rubin 1981), the classic hierarchical benchmark.

    ``y = [28, 8, -3, 7, -1, 1, 18, 12]``, ``sigma = [15, 10, 16, 11, 9, 11, 10, 18]``,
    ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``. The centred form has a funnel between
    ``tau`` and ``theta``; the non-centred form removes it. Both share one posterior for
    ``mu, tau, theta``, stored from a long non-centred NUTS run
    (``bayesgen/data/eight_schools_reference.npz``); the non-centred reference also
    gives ``theta_tilde = (theta - mu) / tau``.

    References
    ----------
    Rubin, D. B. (1981). Estimation in parallel randomized experiments. *Journal of
    Educational Statistics* 6(4), 377-401.
    Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A. and Rubin, D. B.
    (2013). *Bayesian Data Analysis*, 3rd ed., section 5.5.
    """
    sites = ("mu", "tau", "theta")
    if centered:
        name, model, ref = (
            "eight_schools_centered",
            eight_schools_centered_model,
            _stored_reference("eight_schools", sites),
        )
    else:
        name, model, ref = (
            "eight_schools_noncentered",
            eight_schools_noncentered_model,
            _stored_reference("eight_schools", sites, _add_theta_tilde),
        )
    return Target(
        name=name,
        model=model,
        args=(EIGHT_SCHOOLS_SIGMA.astype(np.float32),),
        kwargs={"y": EIGHT_SCHOOLS_Y.astype(np.float32)},
        latent_dim=10,
        reference=ref,
        exact=False,
        description=f"eight schools, {'centred' if centered else 'non-centred'}",
        extra={"y": EIGHT_SCHOOLS_Y, "sigma": EIGHT_SCHOOLS_SIGMA},
    )


def make_eight_schools_centered() -> Target:
    return _make_eight_schools(True)


def make_eight_schools_noncentered() -> Target:
    return _make_eight_schools(False)


make_eight_schools_centered.__doc__ = _make_eight_schools.__doc__
make_eight_schools_noncentered.__doc__ = _make_eight_schools.__doc__


# --------------------------------------------------------------------------------------
# Logistic regression on breast cancer
# --------------------------------------------------------------------------------------


def logistic_regression_model(X, y=None, prior_scale=1.0, intercept_scale=5.0):
    """Bayesian logistic regression.

    ``intercept ~ N(0, intercept_scale)``, ``beta_j ~ N(0, prior_scale)`` (iid),
    ``y_i ~ Bernoulli(sigmoid(intercept + X_i beta))``.
    """
    X = jnp.asarray(X)
    n, d = X.shape
    intercept = numpyro.sample("intercept", dist.Normal(0.0, intercept_scale))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_scale).expand([d]).to_event(1))
    logits = intercept + X @ beta
    with numpyro.plate("N", n):
        numpyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def logistic_regression_data(standardize: bool = True):
    """Breast-cancer design matrix and labels: ``(X, y, X_mean, X_sd)``.

    With ``standardize=True`` each column is centred and scaled to unit sd (ddof 0).
    """
    from bayesgen.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    X_mean, X_sd = X.mean(0), X.std(0)
    if standardize:
        X = (X - X_mean) / X_sd
    return X, y, X_mean, X_sd


def make_logistic_regression(
    standardize: bool = True, prior_scale: float = 1.0, intercept_scale: float = 5.0
) -> Target:
    """Logistic regression on the Wisconsin breast-cancer data (569 x 30, label 1 = malignant).

    Priors: ``intercept ~ N(0, 5)``, ``beta_j ~ N(0, 1)``. With ``standardize=True``
    (default) features are centred and scaled, the well-posed version. With
    ``standardize=False`` the raw features are used, with the *same* priors: this is the
    badly conditioned regression statisticians often write (posterior sds range from
    about 0.01 for the area features to 4 for the intercept, with strong correlations
    between radius, perimeter and area; NUTS needs a dense mass matrix).
    Stored references: ``logistic_regression_reference.npz`` (standardised) and
    ``logistic_regression_unstandardized_reference.npz`` (raw). Only the default
    prior scales have a stored reference.

    References
    ----------
    Wolberg, W. H., Street, W. N. and Mangasarian, O. L. (1995). Breast Cancer Wisconsin
    (Diagnostic). UCI Machine Learning Repository, https://doi.org/10.24432/C5DW2B.
    """
    X, y, X_mean, X_sd = logistic_regression_data(standardize)
    ref_name = "logistic_regression" if standardize else "logistic_regression_unstandardized"
    if prior_scale == 1.0 and intercept_scale == 5.0:
        ref = _stored_reference(ref_name, ("intercept", "beta"))
    else:
        ref = None
    from bayesgen.datasets import BREAST_CANCER_FEATURES

    return Target(
        name="logistic_regression",
        model=logistic_regression_model,
        args=(X.astype(np.float32),),
        kwargs={
            "y": y.astype(np.int32),
            "prior_scale": prior_scale,
            "intercept_scale": intercept_scale,
        },
        latent_dim=X.shape[1] + 1,
        reference=ref,
        exact=False,
        description="breast-cancer logistic regression"
        + (", standardised" if standardize else ", unstandardised"),
        extra={
            "standardize": standardize,
            "X_mean": X_mean,
            "X_sd": X_sd,
            "feature_names": BREAST_CANCER_FEATURES,
            "reference_name": ref_name,
        },
    )


# --------------------------------------------------------------------------------------
# Registry and summaries
# --------------------------------------------------------------------------------------

TARGETS: dict[str, Callable[..., Target]] = {
    "gaussian": make_gaussian,
    "conjugate_gaussian": make_conjugate_gaussian,
    "banana": make_banana,
    "funnel": make_funnel,
    "ring": make_ring,
    "eight_schools_centered": make_eight_schools_centered,
    "eight_schools_noncentered": make_eight_schools_noncentered,
    "logistic_regression": make_logistic_regression,
}
"""Target factories by name; each takes the target's options as keyword arguments."""


def get_target(name: str, **options) -> Target:
    """Build the named target, e.g. ``get_target("gaussian", dim=20)``.

    Options are the keyword arguments of the factory in :data:`TARGETS`
    (``make_gaussian``, ``make_banana``, ...).
    """
    try:
        factory = TARGETS[name]
    except KeyError:
        raise ValueError(
            f"unknown target {name!r}; available targets: {', '.join(TARGETS)}"
        ) from None
    return factory(**options)


def reference_moments(target: Target) -> dict:
    """Marginal ``(mean, sd)`` per site: closed form where known, else from the stored draws.

    Returns
    -------
    dict
        site -> ``(mean, sd)`` numpy arrays of the site's shape.
    """
    if target.true_mean is not None and target.true_sd is not None:
        return {
            s: (np.asarray(target.true_mean[s], np.float64), np.asarray(target.true_sd[s], np.float64))
            for s in target.true_mean
        }
    if target.reference is None:
        raise ValueError(f"target {target.name!r} has neither closed-form moments nor reference draws")
    draws = target.reference(None, None)
    return {
        s: (np.asarray(v, np.float64).mean(0), np.asarray(v, np.float64).std(0, ddof=1))
        for s, v in draws.items()
    }
