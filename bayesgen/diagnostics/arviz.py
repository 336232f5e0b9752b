"""Conversion of posterior draws of a numpyro model to an arviz ``DataTree``.

VI and MCMC results leave bayesgen through the same function, :func:`vi_to_datatree`, so
that their ``posterior`` groups line up variable by variable: the layout (variable names,
dims inferred from plates, coords) is the one :func:`arviz_base.from_numpyro` gives for
``numpyro.infer.MCMC`` on the same model, because the conversion runs through arviz's own
numpyro converter with an adapter that serves the given draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import xarray as xr
from arviz_base import from_numpyro
from arviz_base.io_numpyro import NumPyroInferenceAdapter
from numpyro.infer import Predictive

from bayesgen.errors import check_int, trace_model

__all__ = ["vi_to_datatree"]


class _DrawsAdapter(NumPyroInferenceAdapter):
    """Serve precomputed ``(chain, draw, ...)`` arrays to arviz's numpyro converter."""

    def __init__(self, samples, model, model_args, model_kwargs, sample_shape, sample_stats):
        super().__init__(
            None,
            model=model,
            model_args=tuple(model_args),
            model_kwargs=dict(model_kwargs),
            sample_shape=tuple(sample_shape),
        )
        self._draws = samples
        self._stats = sample_stats

    @property
    def sample_dims(self):  # noqa: D102
        return ["chain", "draw"]

    def get_samples(self, seed=None, **kwargs):  # noqa: D102
        return self._draws

    def get_sample_stats(self, **kwargs):  # noqa: D102
        return self._stats


def _split_chains(value: np.ndarray, num_chains: int, name: str) -> np.ndarray:
    total = value.shape[0]
    if total % num_chains:
        raise ValueError(
            f"posterior_samples['{name}'] has {total} draws, not divisible by num_chains={num_chains}"
        )
    return value.reshape((num_chains, total // num_chains) + value.shape[1:])


def vi_to_datatree(
    model,
    posterior_samples: Mapping[str, Any],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    losses=None,
    *,
    num_chains: int = 1,
    params: Mapping[str, Any] | None = None,
    sample_stats: Mapping[str, Any] | None = None,
    log_likelihood: bool = False,
    posterior_predictive: Mapping[str, Any] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    extra_event_dims: Mapping[str, Sequence[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
    index_origin: int | None = None,
    rng_key=None,
):
    """Convert posterior draws of a numpyro model to an arviz ``DataTree``.

    The ``posterior`` group has the layout of ``arviz.from_numpyro(mcmc)`` for an MCMC
    run of the same model: one variable per latent sample site and per deterministic
    site, leading dims ``("chain", "draw")``, further dims named after the enclosing
    ``numpyro.plate`` (or ``infer={"event_dims": [...]}``), and ``<var>_dim_<i>`` for axes
    that no plate names. Dims are inferred by arviz's own numpyro machinery
    (:func:`arviz_base.io_numpyro.infer_dims`). Deterministic sites missing from
    ``posterior_samples`` are computed with :class:`numpyro.infer.Predictive`; observed
    sites are dropped from the posterior (they go to ``observed_data``, as with MCMC).

    Parameters
    ----------
    model : callable
        The numpyro model the draws belong to.
    posterior_samples : mapping of str to array
        Constrained draws, site name to array with a leading axis of
        ``num_chains * num_draws`` draws (chain-major).
    args, kwargs
        Arguments of the model (also used to infer dims and the observed data).
    losses : array_like, optional
        Loss trace, one value per optimisation step. Stored in ``sample_stats`` as
        variable ``loss`` with its own dim ``step`` (coords ``1 .. len(losses)``, the
        1-based step numbers used by :func:`bayesgen.fit`), without chain/draw.
    num_chains : int, default 1
        Number of chains the leading axis is split into. VI draws are independent, so
        one chain is the natural choice; MCMC callers pass their chain count.
    params : mapping, optional
        Values of ``numpyro.param`` sites of the model, used when deterministic sites are
        computed.
    sample_stats : mapping of str to array, optional
        Per-draw statistics, leading axis like ``posterior_samples`` (e.g. MCMC's
        ``diverging``; numpyro names such as ``potential_energy`` are renamed the way
        ``from_numpyro`` renames them).
    log_likelihood : bool, default False
        Add a ``log_likelihood`` group (pointwise log-likelihood of observed sites).
    posterior_predictive : mapping of str to array, optional
        Posterior predictive draws with the same leading axis.
    coords, dims, extra_event_dims, index_origin
        Passed to :func:`arviz_base.from_numpyro`.
    attrs : mapping, optional
        Extra attributes for the ``posterior`` and ``sample_stats`` groups.
    rng_key : jax.Array, optional
        Key for :class:`~numpyro.infer.Predictive` when deterministic sites are computed
        (only matters if the model draws at a deterministic site's ancestors).

    Returns
    -------
    xarray.DataTree
        With groups ``posterior``, ``observed_data`` (when the model has observed sites),
        ``sample_stats`` (when ``losses`` or ``sample_stats`` is given) and the optional
        ``log_likelihood`` / ``posterior_predictive``.
    """
    args = tuple(args)
    kwargs = {} if kwargs is None else dict(kwargs)
    check_int("num_chains", num_chains)
    if not posterior_samples:
        raise ValueError("posterior_samples is empty: there is nothing to convert")

    samples = {k: np.asarray(jax.device_get(v)) for k, v in posterior_samples.items()}
    leading = {k: (v.shape[0] if v.ndim else None) for k, v in samples.items()}
    sizes = set(leading.values())
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "every array in posterior_samples needs the same leading (draw) axis; got shapes "
            + ", ".join(f"{k}: {v.shape}" for k, v in samples.items())
        )
    total = sizes.pop()

    trace = trace_model(model, args, kwargs)
    observed = {n for n, s in trace.items() if s["type"] == "sample" and s["is_observed"]}
    missing_det = [
        n for n, s in trace.items() if s["type"] == "deterministic" and n not in samples
    ]
    if missing_det:
        latent_names = {
            n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]
        }
        predictive = Predictive(
            model,
            posterior_samples={k: v for k, v in samples.items() if k in latent_names},
            params=None if params is None else dict(params),
            return_sites=missing_det,
            batch_ndims=1,
        )
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        extra = predictive(key, *args, **kwargs)
        samples.update({k: np.asarray(jax.device_get(v)) for k, v in extra.items()})

    samples = {
        k: _split_chains(v, num_chains, k) for k, v in samples.items() if k not in observed
    }
    stats = {}
    if sample_stats:
        for k, v in sample_stats.items():
            v = np.asarray(jax.device_get(v))
            if v.ndim == 0 or v.shape[0] != total:
                raise ValueError(
                    f"sample_stats['{k}'] must have a leading axis of {total} draws, "
                    f"got shape {v.shape}"
                )
            stats[k] = _split_chains(v, num_chains, k)

    adapter = _DrawsAdapter(
        samples, model, args, kwargs, (num_chains, total // num_chains), stats
    )
    tree = from_numpyro(
        adapter,
        posterior_predictive=posterior_predictive,
        log_likelihood=log_likelihood,
        coords=coords,
        dims=dims,
        extra_event_dims=extra_event_dims,
        index_origin=index_origin,
    )

    groups = {
        node.path.strip("/") or "/": node.to_dataset() for node in tree.subtree if node.has_data
    }
    groups.pop("/", None)
    stats_ds = groups.pop("sample_stats", None)
    if stats_ds is not None and not stats_ds.data_vars:
        stats_ds = None
    if losses is not None:
        loss = np.asarray(jax.device_get(losses)).reshape(-1)
        loss_ds = xr.Dataset(
            {"loss": (("step",), loss)},
            coords={"step": np.arange(1, loss.shape[0] + 1)},
        )
        if stats_ds is None:
            loss_ds.attrs.update(groups["posterior"].attrs)
            loss_ds.attrs.pop("sample_dims", None)
            stats_ds = loss_ds
        else:
            stats_ds = stats_ds.merge(loss_ds, combine_attrs="override")
    if attrs:
        groups["posterior"].attrs.update(dict(attrs))
        if stats_ds is not None:
            stats_ds.attrs.update(dict(attrs))
    ordered = {"posterior": groups.pop("posterior")}
    if stats_ds is not None:
        ordered["sample_stats"] = stats_ds
    ordered.update(groups)
    return xr.DataTree.from_dict(ordered)
