"""Exceptions a user can act on, and the model checks that raise them.

:func:`check_model` runs a numpyro model once (seeded, outside of any transformation) and
refuses the structures that bayesgen's guides cannot fit: discrete latent sites, latent
sites inside a subsampled plate, and models without any latent site. Each message names
the offending site (and plate) and says what to change.

:func:`check_int` and :func:`check_positive` are the argument checks the guides and models
share for integer settings (widths, depths, counts) and positive real ones (scales, step
sizes, jitter): a bool is not a number here, NaN and infinity are refused, and the message
names the argument. A 0-d array counts as its number; a traced value (a model argument under
``jit``) cannot be looked at and passes unchecked. :func:`is_int` is their test for an
integer (Python or numpy, not a bool), for sites that branch on it.

:class:`NonFiniteLossError` is raised by :func:`bayesgen.fit` when the loss stops being
finite; it carries the 1-based step and the sites and parameters found to be nonfinite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer.initialization import init_to_sample

__all__ = [
    "ModelStructureError",
    "NonFiniteLossError",
    "check_int",
    "check_positive",
    "check_model",
    "is_int",
    "latent_layout",
    "subsampled_plates",
    "trace_model",
]


def is_int(value) -> bool:
    """Whether ``value`` is a Python or numpy integer (``True``/``False`` are not)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None,
              allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int in ``[minimum, maximum]``
    (no upper end when ``maximum`` is None; ``None`` passes when ``allow_none``;
    ``True``/``False`` never do)."""
    if value is None and allow_none:
        return
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            what = f"an int in [{minimum}, {maximum}]"
        else:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


def check_positive(name: str, value, *, below: float | None = None,
                   allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number ``> 0``
    (and ``< below`` when given; ``None`` passes when ``allow_none``; bools never do).

    A concrete 0-d numpy/jax array is checked as its number; a ``jax.core.Tracer`` passes,
    since its value is only known inside the transformation."""
    if value is None and allow_none:
        return
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()
    number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_)
    if not (number and math.isfinite(value) and value > 0 and (below is None or value < below)):
        what = "a positive finite number" if below is None else f"a number in (0, {below:g})"
        raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, "
                         f"got {value!r}")


class ModelStructureError(ValueError):
    """A model (or a model/checkpoint pair) has a structure the guides cannot handle.

    Raised before any fitting starts. The message names the site, and the plate where one
    is involved, and says how to restructure the model.
    """


class NonFiniteLossError(FloatingPointError):
    """The variational loss became NaN or infinite during fitting.

    Parameters
    ----------
    message : str
        Human-readable description (includes the step and the nonfinite sites).
    step : int
        1-based global step whose loss was the first nonfinite one. The loss of step ``k``
        is evaluated at the parameters reached after ``k - 1`` updates.
    sites : list of str
        Sample or deterministic sites of the model or guide whose value or log density
        was nonfinite when the failing step was replayed.
    params : list of str
        Parameters (``numpyro.param`` sites) holding nonfinite entries at that step.
    gradients : list of str
        Parameters whose gradient was nonfinite when the failing step was replayed (under
        jit, as the fit ran, and eagerly), then those whose gradient was finite but too
        large to square in its float type (it overflows Adam's second moment).
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        sites: Sequence[str] = (),
        params: Sequence[str] = (),
        gradients: Sequence[str] = (),
    ):
        super().__init__(message)
        self.step = int(step)
        self.sites = list(sites)
        self.params = list(params)
        self.gradients = list(gradients)


def trace_model(model, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, seed=0):
    """Run ``model`` once, seeded, and return its numpyro trace.

    Latent sites are drawn with :func:`numpyro.infer.init_to_sample`, which also covers
    ``ImproperUniform`` sites that have no sampler of their own. Sites hidden by
    ``handlers.block`` inside the model do not appear, exactly as for the autoguides;
    sites conditioned with ``handlers.condition`` appear as observed.

    Parameters
    ----------
    model : callable
        A numpyro model.
    args, kwargs
        Arguments of the model.
    seed : int or jax.Array
        Seed of the run.

    Returns
    -------
    collections.OrderedDict
        The trace: site name to site message.
    """
    kwargs = {} if kwargs is None else dict(kwargs)
    seeded = handlers.substitute(handlers.seed(model, seed), substitute_fn=_draw_if_unset)
    return handlers.trace(seeded).get_trace(*tuple(args), **kwargs)


def _draw_if_unset(site):
    # a value already set inside the model (its own substitute/condition) is kept as is
    if site["value"] is not None:
        return site["value"]
    return init_to_sample(site)


def _is_latent(site) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site.get("infer", {}).get("is_auxiliary", False)
    )


def latent_layout(trace) -> dict[str, tuple[int, ...]]:
    """Return ``{site name: shape}`` of the latent (unobserved sample) sites of a trace."""
    return {
        name: tuple(int(d) for d in np.shape(site["value"]))
        for name, site in trace.items()
        if _is_latent(site)
    }


def subsampled_plates(trace) -> dict[str, tuple[int, int]]:
    """``{plate name: (size, subsample_size)}`` for the plates of a trace that subsample."""
    out = {}
    for name, site in trace.items():
        if site["type"] == "plate":
            size, subsample_size = site["args"]
            if subsample_size is not None and int(subsample_size) != int(size):
                out[name] = (int(size), int(subsample_size))
    return out


def check_model(model, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, trace=None):
    """Check that a model can be fitted by bayesgen's guides; raise otherwise.

    The guides are distributions over the flat vector of *global, continuous* latent
    sites. The check runs the model once (see :func:`trace_model`) and raises
    :class:`ModelStructureError` for

    * a latent site with discrete support (including sites marked
      ``infer={"enumerate": "parallel"}``),
    * a latent site inside a plate with ``subsample_size`` smaller than its size (a local
      latent of a minibatched plate),
    * a model without any latent site.

    Parameters
    ----------
    model : callable
        A numpyro model.
    args, kwargs
        Arguments the model will be fitted with.
    trace : dict, optional
        A trace from :func:`trace_model`, to avoid running the model twice.

    Returns
    -------
    collections.OrderedDict
        The trace the check ran on.

    Raises
    ------
    ModelStructureError
        With a message naming the site (and plate) and the fix.
    """
    if trace is None:
        trace = trace_model(model, args, kwargs)

    subsampled = subsampled_plates(trace)

    latents = [name for name, site in trace.items() if _is_latent(site)]

    for name in latents:
        site = trace[name]
        fn = site["fn"]
        enumerate_mode = site.get("infer", {}).get("enumerate")
        if fn.support.is_discrete or enumerate_mode is not None:
            how = (
                f" It is marked infer={{'enumerate': {enumerate_mode!r}}}, but enumeration needs "
                "TraceEnum_ELBO and a guide without this site; bayesgen.fit uses a continuous guide."
                if enumerate_mode is not None
                else ""
            )
            raise ModelStructureError(
                f"Latent site '{name}' ({type(fn).__name__}) has discrete support; bayesgen's guides "
                f"are distributions over continuous latents only.{how} Marginalise '{name}' out of "
                "the model by hand (sum over its values in the likelihood, e.g. with "
                "MixtureSameFamily or a logsumexp in numpyro.factor), or fit it in a plain "
                "numpyro SVI loop with numpyro.contrib.funsor enumeration: mark it "
                "infer={'enumerate': 'parallel'}, build the guide on "
                f"numpyro.handlers.block(model, hide=['{name}']) and use TraceEnum_ELBO."
            )

    for name in latents:
        site = trace[name]
        for frame in site["cond_indep_stack"]:
            if frame.name in subsampled:
                size, subsample_size = subsampled[frame.name]
                raise ModelStructureError(
                    f"Latent site '{name}' sits in plate '{frame.name}', which is subsampled "
                    f"(size={size}, subsample_size={subsample_size}). It is a local latent of a "
                    "minibatched plate, and bayesgen's guides cover global latents only. Either "
                    f"drop subsample_size from plate '{frame.name}' (fit the full data), or make "
                    f"'{name}' global (move it outside the plate), or marginalise it out."
                )

    if not latents:
        observed = [n for n, s in trace.items() if s["type"] == "sample"]
        detail = (
            f" (all of its sample sites are observed: {', '.join(observed)})" if observed else ""
        )
        raise ModelStructureError(
            "The model has no latent sample site" + detail + ", so there is no posterior to "
            "approximate. Add an unobserved numpyro.sample site, or check that the model is not "
            "wrapped in handlers.block/condition/substitute that hides or fixes every latent."
        )
    return trace
