"""Distances between approximate and reference draws.

All functions take draws as either a dict ``site -> array (n, *site_shape)`` (the
layout of :meth:`numpyro.infer.MCMC.get_samples`, ``guide.sample_posterior`` and the
targets' ``reference``) or a plain array ``(n,)`` / ``(n, d)``. Dict inputs are
flattened over the sites the two inputs share, in the order of the *reference's* keys,
so a reference with extra sites (a deterministic ``theta`` next to ``theta_tilde``)
compares on the common ones. Draws from several chains must be merged into the leading
axis first. Everything is plain numpy; randomness (subsampling, projections) comes
from an explicit integer ``seed``.

The reference argument ``ref`` of :func:`mean_error_in_sd` and :func:`log_sd_ratio`
may also be a dict ``site -> (mean, sd)`` such as
:func:`bayesgen.models.targets.reference_moments` returns.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "flatten_draws",
    "mean_error_in_sd",
    "log_sd_ratio",
    "energy_distance",
    "sliced_wasserstein",
]


def _common_sites(x, ref, sites):
    if sites is not None:
        missing = [s for s in sites if s not in x or s not in ref]
        if missing:
            raise KeyError(f"sites {missing} are missing from the samples or the reference")
        return list(sites)
    common = [s for s in ref if s in x]
    if not common:
        raise KeyError(
            f"samples (sites {sorted(x)}) and reference (sites {sorted(ref)}) share no site"
        )
    return common


def flatten_draws(draws, sites: Optional[Sequence[str]] = None) -> np.ndarray:
    """Stack draws into a ``(n, d)`` float64 array (sites in the order given)."""
    if isinstance(draws, Mapping):
        sites = list(draws) if sites is None else sites
        cols = []
        n = None
        for s in sites:
            a = np.asarray(draws[s], np.float64)
            if a.ndim == 0:
                raise ValueError(f"site {s!r} has no draw axis (a scalar); pass (n, ...) arrays")
            if n is not None and a.shape[0] != n:
                raise ValueError(
                    f"site {s!r} has {a.shape[0]} draws but earlier sites have {n}"
                )
            n = a.shape[0]
            cols.append(a.reshape(n, -1))
        return np.concatenate(cols, axis=1)
    a = np.asarray(draws, np.float64)
    if a.ndim == 1:
        return a[:, None]
    if a.ndim != 2:
        raise ValueError(f"expected draws of shape (n,) or (n, d), got {a.shape}")
    return a


def _pair(x, y, sites=None):
    """Flatten ``x`` and ``y`` (reference) over common sites."""
    if isinstance(x, Mapping) != isinstance(y, Mapping):
        raise TypeError("pass both inputs as dicts of sites or both as arrays")
    if isinstance(x, Mapping):
        sites = _common_sites(x, y, sites)
        X, Y = flatten_draws(x, sites), flatten_draws(y, sites)
    else:
        X, Y = flatten_draws(x), flatten_draws(y)
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"draws have {X.shape[1]} coordinates, the reference {Y.shape[1]}")
    return X, Y


def _ref_moments(samples, ref, sites):
    """Flattened (sample mean, sample sd, ref mean, ref sd)."""
    is_moments = isinstance(ref, Mapping) and all(
        isinstance(v, tuple) and len(v) == 2 for v in ref.values()
    )
    if not is_moments:
        X, Y = _pair(samples, ref, sites)
        return X.mean(0), X.std(0, ddof=1), Y.mean(0), Y.std(0, ddof=1)
    if not isinstance(samples, Mapping):
        raise TypeError("with a dict of (mean, sd) reference, pass the samples as a dict of sites")
    sites = _common_sites(samples, ref, sites)
    X = flatten_draws(samples, sites)
    m = np.concatenate([np.ravel(np.asarray(ref[s][0], np.float64)) for s in sites])
    sd = np.concatenate([np.ravel(np.asarray(ref[s][1], np.float64)) for s in sites])
    if X.shape[1] != m.shape[0]:
        raise ValueError(f"draws have {X.shape[1]} coordinates, the reference {m.shape[0]}")
    return X.mean(0), X.std(0, ddof=1), m, sd


def mean_error_in_sd(samples, ref, sites: Optional[Sequence[str]] = None) -> np.ndarray:
    """Per-coordinate ``|mean(samples) - mean(ref)| / sd(ref)``, flattened over sites.

    Parameters
    ----------
    samples : dict or array
        Approximate draws.
    ref : dict or array
        Reference draws, or a dict ``site -> (mean, sd)``.
    sites : sequence of str, optional
        Sites to compare (default: those the two share, in the reference's order).

    Returns
    -------
    np.ndarray, shape (d,)
    """
    m, _, rm, rsd = _ref_moments(samples, ref, sites)
    return np.abs(m - rm) / rsd


def log_sd_ratio(samples, ref, sites: Optional[Sequence[str]] = None) -> np.ndarray:
    """Per-coordinate ``log(sd(samples) / sd(ref))``: negative means under-dispersed.

    Arguments as in :func:`mean_error_in_sd`.
    """
    _, sd, _, rsd = _ref_moments(samples, ref, sites)
    return np.log(sd) - np.log(rsd)


def _subsample(a, max_draws, rng):
    if a.shape[0] <= max_draws:
        return a
    return a[rng.choice(a.shape[0], size=max_draws, replace=False)]


def _standardize(X, Y):
    mu, sd = Y.mean(0), Y.std(0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
    return (X - mu) / sd, (Y - mu) / sd


def _mean_pairwise_dist(A, B, exclude_diagonal):
    sq = (A**2).sum(1)[:, None] + (B**2).sum(1)[None, :] - 2.0 * A @ B.T
    D = np.sqrt(np.maximum(sq, 0.0))
    if exclude_diagonal:
        n = A.shape[0]
        np.fill_diagonal(D, 0.0)
        return D.sum() / (n * (n - 1))
    return D.mean()


def energy_distance(
    x,
    y,
    *,
    standardize: bool = True,
    max_draws: int = 2000,
    seed: int = 0,
    sites: Optional[Sequence[str]] = None,
) -> float:
    """Squared energy distance between draws ``x`` and reference draws ``y``.

    .. math::
        D^2(P, Q) = 2 E\\|X - Y\\| - E\\|X - X'\\| - E\\|Y - Y'\\|,

    which is zero iff ``P = Q``. Estimated by the U-statistic: the cross term averages all
    ``n m`` pairs and the within-sample terms average the ``n (n - 1)`` pairs of distinct
    draws, so the estimate is unbiased for ``D^2`` (and can be slightly negative when the
    distributions agree). Draws are flattened over sites and, by default, standardised
    coordinatewise by the reference's mean and sd (so the value is scale-free); each set
    is subsampled without replacement to at most ``max_draws`` draws.

    Parameters
    ----------
    x, y : dict or array
        Draws and reference draws.
    standardize : bool
        Scale coordinates by the reference sd first (default True).
    max_draws : int
        Subsample size cap per input (the cost is quadratic).
    seed : int
        Seed of the subsampling.
    sites : sequence of str, optional
        Sites to compare (default: the shared ones).

    References
    ----------
    Székely, G. J. and Rizzo, M. L. (2013). Energy statistics: a class of statistics based
    on distances. *Journal of Statistical Planning and Inference* 143(8), 1249-1272.
    """
    X, Y = _pair(x, y, sites)
    if X.shape[0] < 2 or Y.shape[0] < 2:
        raise ValueError("energy_distance needs at least 2 draws in each input")
    rng = np.random.default_rng(seed)
    X, Y = _subsample(X, max_draws, rng), _subsample(Y, max_draws, rng)
    if standardize:
        X, Y = _standardize(X, Y)
    exy = _mean_pairwise_dist(X, Y, False)
    exx = _mean_pairwise_dist(X, X, True)
    eyy = _mean_pairwise_dist(Y, Y, True)
    return float(2.0 * exy - exx - eyy)


def sliced_wasserstein(
    x,
    y,
    num_projections: int = 128,
    *,
    p: int = 2,
    standardize: bool = False,
    max_draws: Optional[int] = None,
    seed: int = 0,
    sites: Optional[Sequence[str]] = None,
) -> float:
    """Sliced ``p``-Wasserstein distance between draws ``x`` and reference draws ``y``.

    .. math::
        SW_p(P, Q) = \\Big( E_{\\theta \\sim U(S^{d-1})} W_p^p(\\theta^T P, \\theta^T Q) \\Big)^{1/p},

    with the expectation over ``num_projections`` seeded random directions (in 1-d the
    only direction is exact). Each 1-d distance compares the empirical quantile
    functions at the ``max(n, m)`` mid-point levels ``(i + 1/2) / max(n, m)`` (sorted
    draws when ``n = m``), so for ``y = x + c`` it returns ``|c|`` exactly in 1-d.

    Parameters
    ----------
    x, y : dict or array
        Draws and reference draws.
    num_projections : int
        Number of random directions (ignored in 1-d).
    p : int
        Order of the Wasserstein distance (default 2).
    standardize : bool
        Scale coordinates by the reference mean and sd first (default False).
    max_draws : int, optional
        Subsample each input to at most this many draws.
    seed : int
        Seed of the directions and subsampling.
    sites : sequence of str, optional
        Sites to compare (default: the shared ones).

    References
    ----------
    Bonneel, N., Rabin, J., Peyré, G. and Pfister, H. (2015). Sliced and Radon Wasserstein
    barycenters of measures. *Journal of Mathematical Imaging and Vision* 51, 22-45.
    """
    X, Y = _pair(x, y, sites)
    rng = np.random.default_rng(seed)
    if max_draws is not None:
        X, Y = _subsample(X, max_draws, rng), _subsample(Y, max_draws, rng)
    if standardize:
        X, Y = _standardize(X, Y)
    d = X.shape[1]
    if d == 1:
        theta = np.ones((1, 1))
    else:
        theta = rng.normal(size=(num_projections, d))
        theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    PX, PY = np.sort(X @ theta.T, axis=0), np.sort(Y @ theta.T, axis=0)
    n, m = PX.shape[0], PY.shape[0]
    if n != m:
        k = max(n, m)
        levels = (np.arange(k) + 0.5) / k
        PX = np.quantile(PX, levels, axis=0)
        PY = np.quantile(PY, levels, axis=0)
    wpp = (np.abs(PX - PY) ** p).mean(0)
    return float(wpp.mean() ** (1.0 / p))
