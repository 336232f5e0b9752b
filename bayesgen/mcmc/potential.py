"""The log density of a numpyro model over its flat unconstrained latent, for blackjax.

MCMC runs on the same flat vector of unconstrained latents as the variational families
(``DESIGN.md``): :func:`model_log_density` traces the model once, checks that every latent
is continuous, and returns

* ``logdensity(z)``: log p(x, z) with the constraining transforms' log-Jacobians, on the
  full data (every subsampled plate is given all of its indices, so its scale is 1);
* ``minibatch_logdensity(z, batch)``: the same with the subsampled plates given the
  indices in ``batch`` (a dict plate name -> index array); numpyro's plate rescales the
  likelihood by ``size / len(indices)``, so this is an unbiased estimate of
  ``logdensity(z)`` when the indices are a uniform draw without replacement;
* ``postprocess(z)``: the constrained values of the latent and deterministic sites.

Why not ``numpyro.infer.util.initialize_model``'s potential directly: on a model with a
subsampled plate it silently evaluates one fixed minibatch (the plate draws its indices
from the default key), which is wrong for NUTS and for SG-MCMC alike. Its initial points
are used (on the full-data model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.util import constrain_fn, initialize_model, potential_energy
from numpyro.primitives import Messenger

from bayesgen.errors import ModelStructureError, _is_latent, subsampled_plates, trace_model

__all__ = ["ModelLogDensity", "model_log_density"]


class _PlateIndices(Messenger):
    """Give named plates fixed subsample indices (and the matching subsample size)."""

    def __init__(self, fn, indices: Mapping[str, Any]):
        self.indices = dict(indices)
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "plate" and msg["name"] in self.indices:
            idx = self.indices[msg["name"]]
            msg["value"] = idx
            msg["args"] = (msg["args"][0], idx.shape[0])


class ModelLogDensity(NamedTuple):
    """What :func:`model_log_density` returns; see the module docstring."""

    logdensity: Any  # (d,) -> scalar, full data
    minibatch_logdensity: Any  # ((d,), {plate: indices}) -> scalar
    postprocess: Any  # (d,) -> {site: constrained value}
    init_positions: jax.Array  # (num_chains, d)
    unravel: Any  # (d,) -> {site: unconstrained value}
    plates: dict  # subsampled plate name -> (size, subsample_size)
    full_model: Any  # the model with every subsampled plate given all its indices
    latent_sites: tuple


def _latents(trace):
    return [n for n, s in trace.items() if _is_latent(s)]


def _check(trace, plates, minibatch: bool, kernel_name: str):
    latents = _latents(trace)
    if not latents:
        observed = [n for n, s in trace.items() if s["type"] == "sample"]
        detail = f" (its sample sites are all observed: {', '.join(observed)})" if observed else ""
        raise ModelStructureError(
            f"The model has no latent sample site{detail}, so there is nothing for MCMC to "
            "sample. Add an unobserved numpyro.sample site, or check that handlers.block/"
            "condition/substitute around the model do not hide or fix every latent."
        )
    for name in latents:
        site = trace[name]
        if site["fn"].support.is_discrete or site.get("infer", {}).get("enumerate"):
            raise ModelStructureError(
                f"Latent site '{name}' ({type(site['fn']).__name__}) is discrete; the kernels "
                "of bayesgen.mcmc are gradient-based and sample continuous latents only. "
                f"Marginalise '{name}' out of the model (a sum over its values, e.g. "
                "MixtureSameFamily or a logsumexp in numpyro.factor), or sample it with "
                "numpyro's own DiscreteHMCGibbs / MixedHMC."
            )
    if minibatch:
        for name in latents:
            for frame in trace[name]["cond_indep_stack"]:
                if frame.name in plates:
                    raise ModelStructureError(
                        f"Latent site '{name}' is local to the subsampled plate "
                        f"'{frame.name}': kernel '{kernel_name}' updates every latent from a "
                        "minibatch gradient, which gives a local latent of an unseen datum no "
                        "likelihood at all. Move it out of the plate, marginalise it, or use "
                        "a full-batch kernel ('nuts', 'hmc', 'mala')."
                    )
    return latents


def model_log_density(
    model,
    args=(),
    kwargs: Mapping[str, Any] | None = None,
    *,
    key,
    num_chains: int,
    minibatch: bool = False,
    kernel_name: str = "",
    init_strategy=init_to_uniform,
) -> ModelLogDensity:
    """Build the flat log density, minibatch log density, postprocessing and initial points.

    Parameters
    ----------
    model : a numpyro model with continuous latents.
    args, kwargs : its arguments.
    key : PRNG key for the initial points.
    num_chains : number of initial points.
    minibatch : whether the kernel uses minibatch gradients (local latents of subsampled
        plates are then refused).
    kernel_name : used in error messages.
    init_strategy : numpyro init strategy for the initial points (default uniform(-2, 2)
        in the unconstrained space, numpyro's default for MCMC).
    """
    args = tuple(args)
    kwargs = {} if kwargs is None else dict(kwargs)
    trace = trace_model(model, args, kwargs)
    plates = subsampled_plates(trace)
    full_model = _PlateIndices(model, {n: jnp.arange(size) for n, (size, _) in plates.items()})
    if plates:
        trace = trace_model(full_model, args, kwargs)
    latents = _check(trace, plates, minibatch, kernel_name)

    keys = jax.random.split(key, num_chains)
    inits, *_ = initialize_model(
        keys, full_model, model_args=args, model_kwargs=kwargs, init_strategy=init_strategy
    )
    init_tree = inits.z
    one = jax.tree.map(lambda a: a[0], init_tree)
    _, unravel = ravel_pytree(one)
    init_positions = jax.vmap(lambda t: ravel_pytree(t)[0])(init_tree)

    def logdensity(z):
        return -potential_energy(full_model, args, kwargs, unravel(z))

    def minibatch_logdensity(z, batch):
        return -potential_energy(_PlateIndices(model, batch), args, kwargs, unravel(z))

    def postprocess(z):
        return constrain_fn(full_model, args, kwargs, unravel(z), return_deterministic=True)

    return ModelLogDensity(
        logdensity,
        minibatch_logdensity,
        postprocess,
        init_positions,
        unravel,
        plates,
        full_model,
        tuple(latents),
    )
