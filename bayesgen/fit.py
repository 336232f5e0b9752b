"""Fit a guide to a numpyro model: the convenience loop behind ``bayesgen.fit``.

:func:`fit` runs stock :class:`numpyro.infer.SVI` (``Trace_ELBO`` unless the guide or the
caller says otherwise) in jitted chunks of steps (``jax.lax.scan`` over ``svi.update``),
shows a progress bar, checks the model before starting, diagnoses a nonfinite loss down to
the site, writes and resumes checkpoints, and can stop early on a loss plateau. It returns
a :class:`FitResult` that samples the fitted posterior and converts it to arviz.

Nothing here is required to use bayesgen's guides: they work in a hand-written SVI loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.example_libraries import optimizers as jax_optimizers
from numpyro import handlers
from numpyro.distributions.distribution import validation_enabled
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.util import compute_log_probs
from numpyro.optim import _NumPyroOptim, optax_to_numpyro

from bayesgen.errors import (
    ModelStructureError,
    NonFiniteLossError,
    check_int,
    check_model,
    is_int,
    latent_layout,
)

__all__ = ["EarlyStop", "FitResult", "default_optimizer", "fit"]

#: Steps run per jitted chunk when no checkpoint interval says otherwise.
CHUNK_SIZE = 100
#: Peak learning rate of :func:`default_optimizer`.
DEFAULT_LEARNING_RATE = 5e-3
#: Final learning rate of :func:`default_optimizer`, as a fraction of the peak.
DEFAULT_FINAL_FRACTION = 0.1

_CHECKPOINT_FORMAT = "bayesgen.fit checkpoint"
_CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- options


def default_optimizer(
    steps: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    final_fraction: float = DEFAULT_FINAL_FRACTION,
) -> optax.GradientTransformation:
    """Return the optimiser :func:`fit` uses when none is given: Adam with cosine decay.

    The learning rate follows ``lr(t) = lr0 * (f + (1 - f) * (1 + cos(pi t / T)) / 2)``
    for ``t <= T = steps`` (then stays at ``f * lr0``), with ``lr0 = learning_rate`` and
    ``f = final_fraction``. The schedule counts optimiser updates, so a resumed fit with
    the same ``steps`` continues on the same curve.

    Parameters
    ----------
    steps : int
        Length ``T`` of the decay, normally the total number of fitting steps.
    learning_rate : float, default 5e-3
        Peak (initial) learning rate.
    final_fraction : float, default 0.1
        Final learning rate as a fraction of the peak.

    Returns
    -------
    optax.GradientTransformation
    """
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=final_fraction)
    return optax.adam(schedule)


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """Stop a fit when the loss has stopped improving.

    The loss trace is cut into consecutive windows of ``window`` steps, aligned to step 0
    of the fit (so a resumed fit sees the same windows). For each window after the first,
    the improvement over the previous window is

        (mean_prev - mean_cur) / max(|mean_prev|, 1),

    i.e. relative for losses larger than one in magnitude and absolute below. A window
    whose improvement is below ``rel_tol`` is a strike; any other window resets the count.
    The fit stops at the first chunk boundary after ``patience`` consecutive strikes (and
    never before ``min_steps``). Subclass and override :meth:`should_stop` for another rule.

    Parameters
    ----------
    patience : int, default 3
        Consecutive non-improving windows needed to stop.
    rel_tol : float, default 1e-3
        Smallest improvement that counts.
    window : int, default 200
        Steps per window.
    min_steps : int, default 0
        Never stop before this many steps in total.
    """

    patience: int = 3
    rel_tol: float = 1e-3
    window: int = 200
    min_steps: int = 0

    def __post_init__(self):
        for name in ("patience", "window"):
            check_int(f"EarlyStop.{name}", getattr(self, name))
        check_int("EarlyStop.min_steps", self.min_steps, minimum=0)
        if not (isinstance(self.rel_tol, int | float) and self.rel_tol >= 0):
            raise ValueError(f"EarlyStop.rel_tol must be a float >= 0, got {self.rel_tol!r}")

    def strikes(self, losses: np.ndarray) -> tuple[int, int]:
        """Return the strike count after the last complete window, and that window's end step."""
        losses = np.asarray(losses, dtype=np.float64)
        n_windows = losses.shape[0] // self.window
        if n_windows < 2:
            return 0, n_windows * self.window
        means = losses[: n_windows * self.window].reshape(n_windows, self.window).mean(axis=1)
        count = 0
        for prev, cur in zip(means[:-1], means[1:], strict=True):
            improvement = (prev - cur) / max(abs(prev), 1.0)
            count = count + 1 if improvement < self.rel_tol else 0
        return count, n_windows * self.window

    def should_stop(self, losses: np.ndarray, start_step: int) -> bool:
        """Decide, at a chunk boundary, whether to stop.

        Parameters
        ----------
        losses : numpy.ndarray
            The whole loss trace so far (including steps restored from a checkpoint).
        start_step : int
            Step at which this call of :func:`fit` started (0, or the checkpoint's step);
            a plateau reached only in restored history does not stop a resumed fit until a
            new window confirms it.
        """
        if losses.shape[0] < self.min_steps:
            return False
        count, window_end = self.strikes(losses)
        return count >= self.patience and window_end > start_step


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(eq=False)
class FitResult:
    """The outcome of :func:`fit`: fitted parameters, loss trace and posterior access.

    Attributes
    ----------
    model, guide : callable
        The numpyro model and the guide that was fitted.
    params : dict
        Constrained parameter values (``svi.get_params``).
    losses : numpy.ndarray
        Loss of every step, shape ``(steps,)``; the loss of step ``k`` (1-based) is
        evaluated at the parameters after ``k - 1`` updates. Includes the steps restored
        from a checkpoint when the fit was resumed.
    args, kwargs
        The model arguments the fit used; :meth:`sample` and :meth:`to_arviz` reuse them.
    steps : int
        Number of steps in ``losses`` (smaller than requested after an early stop).
    wall_time : float
        Seconds spent in the fitting loop of this call (compilation included, model
        checking and initialisation excluded).
    resumed_at_step : int
        Step of the checkpoint this call resumed from (0 for a fresh fit).
    restored_wall_time : float
        Fitting-loop seconds of the earlier calls that wrote that checkpoint (0 for a fresh
        fit; checkpoints from before this was recorded give 0), so ``wall_time +
        restored_wall_time`` is the whole fit's.
    svi_state : numpyro.infer.svi.SVIState
        The final state (optimiser state, mutable state, rng key).
    stopped_early : bool
        Whether :class:`EarlyStop` ended the fit.
    stop_step : int or None
        Step at which it stopped, if it did.
    svi : numpyro.infer.SVI
        The SVI object (model, guide, optimiser, loss) that ran the fit.
    seed : int
        Seed of the fit; the default key of :meth:`sample` is derived from it.
    """

    model: Callable
    guide: Any
    params: dict
    losses: np.ndarray
    args: tuple
    kwargs: dict
    steps: int
    wall_time: float
    svi_state: Any
    stopped_early: bool = False
    stop_step: int | None = None
    svi: Any = None
    seed: int = 0
    resumed_at_step: int = 0
    restored_wall_time: float = 0.0
    _samplers: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __repr__(self):
        last = f"{float(self.losses[-1]):.4g}" if len(self.losses) else "n/a"
        stop = f", stopped_early at step {self.stop_step}" if self.stopped_early else ""
        return (
            f"FitResult(guide={_guide_name(self.guide)}, steps={self.steps}, "
            f"final loss={last}, wall_time={self.wall_time:.2f}s{stop})"
        )

    def _default_key(self):
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), 0x5A3)

    def _sampler(self, size: int):
        if size not in self._samplers:
            guide = self.guide
            rebuild = _ArgPacker(self.args, self.kwargs)

            def draw(key, params, dynamic):
                args, kwargs = rebuild.unpack(dynamic)
                if isinstance(guide, AutoGuide):
                    return guide.sample_posterior(
                        key, params, *args, sample_shape=(size,), **kwargs
                    )
                # a hand-written guide: run it, keep its sample and deterministic sites
                return Predictive(guide, params=params, num_samples=size)(key, *args, **kwargs)

            self._samplers[size] = (jax.jit(draw), rebuild.dynamic)
        return self._samplers[size]

    def sample(self, key=None, num_samples: int = 1000, *, batch_size: int = 1000):
        """Draw from the fitted approximate posterior.

        Draws are made in batches of at most ``batch_size`` (each a jitted call of the
        guide's ``sample_posterior``) and gathered on the host, so the device never holds
        more than one batch; large guides (a flow over a BNN's weights) stay within memory.

        Parameters
        ----------
        key : jax.Array or int, optional
            Random key (or integer seed). Defaults to a key derived from the fit's seed.
        num_samples : int, default 1000
            Number of draws.
        batch_size : int, default 1000
            Largest number of draws made in one device call.

        Returns
        -------
        dict of str to numpy.ndarray
            Site name to constrained draws with leading axis ``num_samples``: every latent
            site, plus the deterministic sites the guide reports (numpyro's autoguides
            report the model's deterministic sites).
        """
        check_int("num_samples", num_samples)
        check_int("batch_size", batch_size)
        key = _as_key(self._default_key() if key is None else key, "key")
        sizes = [batch_size] * (num_samples // batch_size)
        if num_samples % batch_size:
            sizes.append(num_samples % batch_size)
        keys = jax.random.split(key, len(sizes))
        parts = []
        for k, size in zip(keys, sizes, strict=True):
            fn, dynamic = self._sampler(size)
            parts.append(jax.device_get(fn(k, self.params, dynamic)))
        return {
            name: np.concatenate([np.asarray(p[name]) for p in parts], axis=0)
            for name in parts[0]
        }

    def to_arviz(self, num_samples: int = 1000, key=None, **kwargs):
        """Convert the fitted posterior to an arviz ``DataTree``.

        The ``posterior`` group holds ``num_samples`` draws as one chain, laid out exactly
        like ``arviz.from_numpyro`` lays out an MCMC run of the same model (same variables,
        dims and coords); ``sample_stats`` holds the loss trace as ``loss`` over dim
        ``step``. See :func:`bayesgen.diagnostics.arviz.vi_to_datatree`.

        Parameters
        ----------
        num_samples : int, default 1000
            Number of posterior draws.
        key : jax.Array or int, optional
            Random key for the draws (default: derived from the fit's seed).
        **kwargs
            Passed to :func:`~bayesgen.diagnostics.arviz.vi_to_datatree` (``coords``,
            ``dims``, ``log_likelihood``, ...).

        Returns
        -------
        xarray.DataTree
        """
        from bayesgen.diagnostics.arviz import vi_to_datatree

        samples = self.sample(key, num_samples)
        attrs = {
            "inference_method": "variational",
            "guide": _guide_name(self.guide),
            "steps": int(self.steps),
        }
        attrs.update(kwargs.pop("attrs", {}) or {})
        return vi_to_datatree(
            self.model,
            samples,
            self.args,
            self.kwargs,
            losses=self.losses,
            params=self.params,
            attrs=attrs,
            **kwargs,
        )


# --------------------------------------------------------------------------- helpers


def default_loss(guide, num_particles: int = 1):
    """The loss :func:`fit` uses for ``guide``: ``guide.default_loss(num_particles)`` when the
    guide defines one, else ``Trace_ELBO(num_particles=num_particles)``."""
    make_loss = getattr(guide, "default_loss", None)
    if callable(make_loss):
        return make_loss(num_particles)
    return Trace_ELBO(num_particles=num_particles)


def _guide_name(guide) -> str:
    if isinstance(guide, AutoGuide) or not hasattr(guide, "__name__"):
        return type(guide).__name__
    return guide.__name__


def _as_key(value, name: str):
    if is_int(value):
        return jax.random.PRNGKey(int(value))
    if isinstance(value, jax.Array | np.ndarray):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key) or (
            value.dtype == np.uint32 and value.shape == (2,)
        ):
            return value
    raise TypeError(f"{name} must be an int seed or a jax random key, got {value!r}")


class _ArgPacker:
    """Split model arguments into array leaves (jit arguments) and the rest (static)."""

    def __init__(self, args, kwargs):
        leaves, self.treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
        self.is_dynamic = [isinstance(x, jax.Array | np.ndarray) for x in leaves]
        self.static = [None if d else x for x, d in zip(leaves, self.is_dynamic, strict=True)]
        # moved to the device once, not at every chunk call
        self.dynamic = [
            jax.device_put(x) for x, d in zip(leaves, self.is_dynamic, strict=True) if d
        ]

    def unpack(self, dynamic):
        it = iter(dynamic)
        leaves = [next(it) if d else s for s, d in zip(self.static, self.is_dynamic, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)


def _param_shapes(svi, state) -> dict[str, list[int]]:
    params = svi.optim.get_params(state.optim_state)
    # A param may be a pytree (a flowjax module registered as one param): record leaf shapes.
    return {
        k: [[int(d) for d in np.shape(leaf)] for leaf in jax.tree.leaves(v)]
        for k, v in params.items()
    }


def _nonfinite(x) -> bool:
    """Whether an array, or any float leaf of a pytree (a flax nnx param), is not finite."""
    for leaf in jax.tree.leaves(jax.device_get(x)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            return True
    return False


def _max_abs_over_square_limit(x) -> float:
    """The largest ``|x|`` among float leaves whose square overflows their dtype (0 if none):
    a finite gradient that large makes Adam's second moment ``g^2`` infinite."""
    worst = 0.0
    for leaf in jax.tree.leaves(jax.device_get(x)):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and leaf.size:
            m = float(np.max(np.abs(leaf)))
            if math.isfinite(m) and m > math.sqrt(float(np.finfo(leaf.dtype).max)):
                worst = max(worst, m)
    return worst


def _state_finite(state) -> bool:
    leaves = [
        x
        for x in jax.tree.leaves(state)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(all(jnp.all(jnp.isfinite(x)) for x in leaves))


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: str, state, step: int, losses: np.ndarray, meta: dict) -> None:
    leaves, treedef = jax.tree.flatten(state)
    arrays = {}
    key_impls = {}
    for i, leaf in enumerate(leaves):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key_impls[str(i)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arrays[f"leaf_{i:05d}"] = np.asarray(jax.device_get(leaf))
    meta = dict(
        meta,
        format=_CHECKPOINT_FORMAT,
        version=_CHECKPOINT_VERSION,
        step=int(step),
        num_leaves=len(leaves),
        treedef=str(treedef),
        key_impls=key_impls,
    )
    arrays["losses"] = np.asarray(losses, dtype=np.float32)
    arrays["meta"] = np.array(json.dumps(meta))
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_checkpoint(path: str):
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != _CHECKPOINT_FORMAT:
                raise ValueError
            leaves = [np.asarray(data[f"leaf_{i:05d}"]) for i in range(meta["num_leaves"])]
            losses = np.asarray(data["losses"])
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"resume={path!r} is not a bayesgen.fit checkpoint ({err!r})") from None
    return meta, leaves, losses


def _check_latent_layout(path, meta, layout):
    """Refuse a checkpoint written for a model with other latent sites or shapes."""
    saved_layout = {k: tuple(v) for k, v in meta["latent_shapes"].items()}
    if saved_layout != layout:
        differ = sorted(
            name
            for name in set(saved_layout) | set(layout)
            if saved_layout.get(name) != layout.get(name)
        )
        details = "; ".join(
            f"'{n}': checkpoint {saved_layout.get(n, 'absent')}, model {layout.get(n, 'absent')}"
            for n in differ
        )
        raise ModelStructureError(
            f"Cannot resume from {path!r}: the model's latent sites differ from the checkpoint's "
            f"({details}). Resume with the model and data the checkpoint was written for, or "
            "start a fresh fit."
        )


def _restore_state(path, meta, leaves, template_state, param_shapes):
    """Check a checkpoint against the current guide/optimiser and rebuild the SVI state."""
    saved_params = meta["param_shapes"]
    if saved_params != param_shapes:
        differ = sorted(
            n for n in set(saved_params) | set(param_shapes)
            if saved_params.get(n) != param_shapes.get(n)
        )
        raise ModelStructureError(
            f"Cannot resume from {path!r}: the guide's parameters differ from the checkpoint's "
            f"(params {', '.join(differ)}; checkpoint guide {meta.get('guide')!r}). Use the same "
            "guide class and settings as the checkpointed fit."
        )
    template_leaves, treedef = jax.tree.flatten(template_state)
    if str(treedef) != meta["treedef"] or len(template_leaves) != len(leaves):
        raise ModelStructureError(
            f"Cannot resume from {path!r}: the optimiser state has a different structure "
            "(a different optimizer or loss than the checkpointed fit?). Pass the same "
            "optimizer as the checkpointed fit."
        )
    restored = []
    for i, (tmpl, leaf) in enumerate(zip(template_leaves, leaves, strict=True)):
        if str(i) in meta["key_impls"]:
            restored.append(jax.random.wrap_key_data(jnp.asarray(leaf), impl=meta["key_impls"][str(i)]))
            continue
        if np.shape(tmpl) != leaf.shape:
            raise ModelStructureError(
                f"Cannot resume from {path!r}: optimiser state leaf {i} has shape {leaf.shape} "
                f"in the checkpoint but {np.shape(tmpl)} now."
            )
        restored.append(jnp.asarray(leaf, dtype=jnp.result_type(tmpl)))
    return jax.tree.unflatten(treedef, restored)


# --------------------------------------------------------------------------- NaN diagnosis


def _particle_keys(loss, rng_key):
    n = getattr(loss, "num_particles", 1)
    if isinstance(n, int) and n > 1:
        return list(jax.random.split(rng_key, n))
    return [rng_key]


def _diagnose_nonfinite(svi, state, args, kwargs):
    """Replay one step from ``state``; list nonfinite sites, params and gradients.

    Returns ``(sites, site_names, bad_params, bad_grads, overflowing)``, the last a dict
    ``{param: max |gradient|}`` of finite gradients whose square overflows.

    The step's randomness is reproduced exactly as ``SVI.update`` and ``Trace_ELBO`` draw
    it (``split(state.rng_key)[1]``, split again per particle, then into model and guide
    seeds). For other losses the traces are still informative but may use other draws.
    """
    _, rng_key_step = jax.random.split(state.rng_key)
    unconstrained = svi.optim.get_params(state.optim_state)
    params = svi.constrain_fn(unconstrained)
    if state.mutable_state:
        params = {**params, **state.mutable_state}

    sites: list[str] = []
    site_names: list[str] = []

    def note(label, name=None):
        if label not in sites:
            sites.append(label)
        if name is not None and name not in site_names:
            site_names.append(name)

    for particle_key in _particle_keys(svi.loss, rng_key_step):
        model_seed, guide_seed = jax.random.split(particle_key)
        try:
            # eager replay: numpyro's argument validation would raise at the first NaN
            # parameter without naming the site, so it is off while we look
            with validation_enabled(False):
                guide_lp, guide_trace = compute_log_probs(
                    handlers.seed(svi.guide, guide_seed), args, kwargs, params
                )
                model_lp, model_trace = compute_log_probs(
                    handlers.replay(handlers.seed(svi.model, model_seed), guide_trace),
                    args,
                    kwargs,
                    params,
                )
        except Exception as err:  # noqa: BLE001 - diagnosis must not mask the real error
            note(f"(replay failed: {type(err).__name__}: {err})")
            continue
        for where, tr, lp in (("model", model_trace, model_lp), ("guide", guide_trace, guide_lp)):
            for name, site in tr.items():
                if site["type"] in ("sample", "deterministic") and _nonfinite(site["value"]):
                    note(f"{where} site '{name}' (value)", name)
            for name, value in lp.items():
                if _nonfinite(value):
                    note(f"{where} site '{name}' (log density)", name)

    bad_params = [name for name, v in params.items() if _nonfinite(v)]
    bad_params += [n for n, v in unconstrained.items() if _nonfinite(v) and n not in bad_params]

    def loss_of(p):
        cp = svi.constrain_fn(p)
        if state.mutable_state:  # e.g. SIVI-SM's critic: as SVI.update passes it
            cp = {**cp, **jax.lax.stop_gradient(state.mutable_state)}
            out = svi.loss.loss_with_mutable_state(
                rng_key_step, cp, svi.model, svi.guide, *args, **kwargs
            )
            return out["loss"]
        return svi.loss.loss(rng_key_step, cp, svi.model, svi.guide, *args, **kwargs)

    # The fit differentiates under jit, where XLA's fusion can turn a borderline 0/0 into a
    # NaN the eager replay does not reproduce: look at both. A finite gradient whose square
    # overflows makes Adam's second moment infinite (the state turns nonfinite while every
    # gradient is finite): name those too.
    bad_grads, overflowing = [], {}
    for transform in (jax.jit, lambda f: f):
        try:
            with validation_enabled(False):
                grads = transform(jax.grad(loss_of))(unconstrained)
        except Exception:  # noqa: BLE001 - diagnosis must not mask the real error
            continue
        for n, g in grads.items():
            if n in bad_grads or n in overflowing:
                continue
            if _nonfinite(g):
                bad_grads.append(n)
            elif (m := _max_abs_over_square_limit(g)) > 0:
                overflowing[n] = m
    return sites, site_names, bad_params, bad_grads, overflowing


def _nonfinite_error(step, kind, sites, bad_params, bad_grads, site_names,
                     overflowing=None) -> NonFiniteLossError:
    overflowing = overflowing or {}
    if kind == "params" and overflowing and not (bad_grads or bad_params or sites):
        head = (
            f"The optimiser's state became nonfinite in the update of step {step}: the loss "
            "and the gradient were finite, but the gradient was too large to square in its "
            "float type, so Adam's second moment overflowed."
        )
    elif kind == "loss":
        head = (
            f"The loss became nonfinite at step {step} (1-based; the loss of step k is evaluated "
            f"at the parameters after k - 1 updates)."
        )
    else:
        head = (
            f"The parameters became nonfinite in the update of step {step}: the loss was finite "
            "but its gradient was not."
        )
    parts = []
    if sites:
        parts.append("Nonfinite at that step: " + ", ".join(sites) + ".")
    if bad_grads:
        parts.append("Nonfinite gradient for params: " + ", ".join(bad_grads) + ".")
    if overflowing:
        parts.append("Gradients whose square overflows (largest |g|): " + ", ".join(
            f"{n} ({m:.3g})" for n, m in overflowing.items()) + ".")
    if bad_params:
        parts.append("Nonfinite params: " + ", ".join(bad_params) + ".")
    if kind == "params" and not sites and not overflowing:
        parts.append(
            "No site value or log density was nonfinite, so a derivative is: look for sqrt, "
            "log or a power at 0, or a jnp.where/clip whose unused branch is nonfinite."
        )
    if not parts:
        parts.append(
            "Replaying the step found no nonfinite site value, log density or parameter; the "
            "loss object itself may produce it."
        )
    advice = (
        "Check the support and scale of these sites (a scale that can reach 0 or overflow, a "
        "log of a value that can be <= 0), lower the learning rate, or clip gradients, e.g. "
        "optimizer=optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3)); with "
        "`checkpoint` set, the last finite state (end of the last completed chunk) has been "
        "written there, ready for `resume`."
    )
    return NonFiniteLossError(
        " ".join([head, *parts, advice]), step=step, sites=site_names, params=bad_params,
        gradients=bad_grads + [n for n in overflowing if n not in bad_grads],
    )


# --------------------------------------------------------------------------- fit


def _validate(steps, num_particles, checkpoint, checkpoint_every, resume, progress_bar, optimizer, loss):
    check_int("steps", steps)
    check_int("num_particles", num_particles)
    if checkpoint_every is not None:
        if checkpoint is None:
            raise ValueError(
                "checkpoint_every needs checkpoint=<path> to know where to write the checkpoints"
            )
        check_int("checkpoint_every", checkpoint_every)
    if checkpoint is not None and not isinstance(checkpoint, str | os.PathLike):
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {checkpoint!r}")
    if resume is not None:
        if not isinstance(resume, str | os.PathLike):
            raise TypeError(f"resume must be a path (str or os.PathLike), got {resume!r}")
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"resume={os.fspath(resume)!r}: no such checkpoint file")
    if not isinstance(progress_bar, bool):
        raise TypeError(f"progress_bar must be True or False, got {progress_bar!r}")
    if optimizer is not None and not isinstance(
        optimizer, optax.GradientTransformation | _NumPyroOptim | jax_optimizers.Optimizer
    ):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation or a numpyro.optim optimizer, "
            f"got {type(optimizer).__name__}"
        )
    if loss is not None and not callable(getattr(loss, "loss", None)):
        raise TypeError(
            f"loss must be a numpyro loss object with a .loss(...) method (e.g. Trace_ELBO()), got {loss!r}"
        )


def _resolve_early_stop(early_stop):
    if early_stop is None or early_stop is False:
        return None
    if early_stop is True:
        return EarlyStop()
    if isinstance(early_stop, EarlyStop):
        return early_stop
    raise TypeError(f"early_stop must be None, a bool or an EarlyStop, got {early_stop!r}")


def _boundaries(start: int, steps: int, checkpoint_every: int | None) -> list[int]:
    """Chunk end steps: multiples of CHUNK_SIZE and of checkpoint_every, and ``steps``."""
    ends = set(range(CHUNK_SIZE, steps, CHUNK_SIZE))
    if checkpoint_every:
        ends |= set(range(checkpoint_every, steps, checkpoint_every))
    ends.add(steps)
    return sorted(e for e in ends if e > start)


def fit(
    model,
    guide,
    *args,
    steps: int = 5000,
    optimizer=None,
    num_particles: int = 1,
    loss=None,
    progress_bar: bool = True,
    seed=0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: str | os.PathLike | None = None,
    early_stop: EarlyStop | bool | None = None,
    **kwargs,
) -> FitResult:
    """Fit ``guide`` to the posterior of ``model`` by stochastic variational inference.

    Minimises the loss (by default the negative ELBO, ``Trace_ELBO(num_particles)``) with
    stock :class:`numpyro.infer.SVI`. Steps run in jitted chunks of ``CHUNK_SIZE`` (100)
    steps, each a ``jax.lax.scan`` over ``svi.update``; chunk ends also fall on every
    multiple of ``checkpoint_every``. Array arguments of the model are passed to the jitted
    chunk as arguments (not baked in as constants); other arguments are static.

    Before fitting, :func:`bayesgen.errors.check_model` refuses discrete latent sites,
    latent sites in subsampled plates and models without latents. After every chunk the
    losses are checked; at the first nonfinite loss the failing step is replayed and
    :class:`~bayesgen.errors.NonFiniteLossError` names the step and the sites and
    parameters that were nonfinite.

    Parameters
    ----------
    model : callable
        A numpyro model.
    guide : callable
        A guide for it: any numpyro ``AutoGuide`` (``AutoNormal``, an ``AutoContinuous``
        such as ``AutoMultivariateNormal`` or bayesgen's guides) or a hand-written guide.
    *args, **kwargs
        Arguments of the model and guide. (``fit``'s own keywords cannot be passed through.)
    steps : int, default 5000
        Total number of optimisation steps, counting the steps restored by ``resume``.
    optimizer : optax.GradientTransformation or numpyro.optim optimizer, optional
        Default :func:`default_optimizer` ``(steps)``: Adam, learning rate 5e-3 decayed by
        a cosine to 5e-4 over ``steps``. Optax transformations are wrapped with
        :func:`numpyro.optim.optax_to_numpyro`.
    num_particles : int, default 1
        Monte Carlo draws per step for the default loss.
    loss : numpyro loss object, optional
        Default: ``guide.default_loss(num_particles)`` when the guide defines
        ``default_loss``, else ``Trace_ELBO(num_particles=num_particles)``.
    progress_bar : bool, default True
        Show a tqdm bar with the mean loss of the last chunk.
    seed : int or jax random key, default 0
        Seed of the initialisation and of the step draws.
    checkpoint : path, optional
        File to write the fit state to (atomically: temporary file, then ``os.replace``):
        every ``checkpoint_every`` steps, at the end, and on ``KeyboardInterrupt`` or
        :class:`~bayesgen.errors.NonFiniteLossError` (then the last finite state). It holds
        the SVI state (parameters, optimiser state, rng key), the step, the loss trace, the
        fitting time so far and the latent/parameter layout, as a ``.npz`` archive without
        pickles.
    checkpoint_every : int, optional
        Steps between checkpoints; requires ``checkpoint``.
    resume : path, optional
        Checkpoint to continue from, up to ``steps`` steps in total. With the same model,
        guide, optimiser and ``checkpoint_every`` (or none), the result equals the
        uninterrupted fit. A checkpoint whose latent sites or guide parameters differ from
        the current ones is refused with :class:`~bayesgen.errors.ModelStructureError`.
        (The default optimiser's schedule spans ``steps``; resuming with another ``steps``
        than the checkpointed fit planned bends the schedule.)
    early_stop : EarlyStop or bool, optional
        Stop on a loss plateau (off by default; ``True`` uses ``EarlyStop()``). Checked at
        chunk ends; see :class:`EarlyStop`.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError, TypeError, FileNotFoundError
        For invalid arguments; the message names the argument.
    ModelStructureError
        For a model the guides cannot fit, or a checkpoint from another model/guide.
    NonFiniteLossError
        When the loss (or the parameters) become NaN or infinite.

    Examples
    --------
    >>> guide = numpyro.infer.autoguide.AutoNormal(model)        # doctest: +SKIP
    >>> result = bayesgen.fit(model, guide, x, y=y, steps=2000)  # doctest: +SKIP
    >>> idata = result.to_arviz()                                 # doctest: +SKIP
    """
    _validate(steps, num_particles, checkpoint, checkpoint_every, resume, progress_bar, optimizer, loss)
    stopper = _resolve_early_stop(early_stop)
    steps = int(steps)
    checkpoint_every = None if checkpoint_every is None else int(checkpoint_every)
    key = _as_key(seed, "seed")
    seed_int = int(seed) if is_int(seed) else 0
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)

    trace = check_model(model, args, kwargs)
    layout = latent_layout(trace)

    if loss is None:
        loss = default_loss(guide, num_particles)
    uses_default_optimizer = optimizer is None
    if optimizer is None:
        optimizer = default_optimizer(steps)
    if isinstance(optimizer, optax.GradientTransformation):
        optimizer = optax_to_numpyro(optimizer)
    svi = SVI(model, guide, optimizer, loss)

    if resume is not None:
        meta, leaves, history = _load_checkpoint(os.fspath(resume))
        _check_latent_layout(os.fspath(resume), meta, layout)
    state = svi.init(key, *args, **kwargs)
    param_shapes = _param_shapes(svi, state)
    start = 0
    restored_wall = 0.0
    if resume is None:
        history = np.zeros((0,), dtype=np.float32)
    else:
        state = _restore_state(os.fspath(resume), meta, leaves, state, param_shapes)
        start = int(meta["step"])
        restored_wall = float(meta.get("wall_time", 0.0))
        history = history[:start]
        if start > steps:
            raise ValueError(
                f"steps={steps} is smaller than the {start} steps already in the checkpoint "
                f"resume={os.fspath(resume)!r}; pass steps >= {start}"
            )
        if uses_default_optimizer and meta.get("default_optimizer") and meta.get("steps") != steps:
            warnings.warn(
                f"The checkpointed fit planned steps={meta.get('steps')}; the default optimiser's "
                f"learning-rate schedule is now rebuilt over steps={steps}, so the result will "
                "differ from an uninterrupted fit of either length.",
                stacklevel=2,
            )

    meta_base = {
        "latent_shapes": {k: list(v) for k, v in layout.items()},
        "param_shapes": param_shapes,
        "guide": _guide_name(guide),
        "steps": int(steps),
        "seed": seed_int,
        "num_particles": int(num_particles),
        "default_optimizer": uses_default_optimizer,
    }

    packer = _ArgPacker(args, kwargs)
    runners: dict[int, Callable] = {}

    def run_chunk(s, n):
        if n not in runners:

            def chunk(s, dynamic):
                a, kw = packer.unpack(dynamic)

                def body(carry, _):
                    return svi.update(carry, *a, **kw)

                return jax.lax.scan(body, s, None, length=n)

            runners[n] = jax.jit(chunk)
        return runners[n](s, packer.dynamic)

    chunks = [history]
    step = start
    stopped = False
    stop_step = None
    last_saved = -1

    def save(at_state, at_step):
        nonlocal last_saved
        _save_checkpoint(
            checkpoint,
            at_state,
            at_step,
            np.concatenate(chunks),
            dict(meta_base, stopped_early=stopped, stop_step=stop_step,
                 wall_time=restored_wall + time.perf_counter() - t0),
        )
        last_saved = at_step

    bar = _progress(progress_bar, steps, start)
    t0 = time.perf_counter()
    try:
        for end in _boundaries(start, steps, checkpoint_every):
            new_state, chunk_losses = run_chunk(state, end - step)
            chunk_losses = np.asarray(jax.device_get(chunk_losses))
            bad = ~np.isfinite(chunk_losses)
            if bad.any():
                fail = step + int(np.argmax(bad)) + 1
                raise _replay_failure(svi, run_chunk, state, step, fail, "loss", args, kwargs)
            if not _state_finite(new_state):
                raise _replay_failure(svi, run_chunk, state, step, end, "params", args, kwargs)
            state, step = new_state, end
            chunks.append(chunk_losses)
            if bar is not None:
                bar.update(len(chunk_losses))
                bar.set_postfix_str(f"loss {float(chunk_losses.mean()):.4g}", refresh=False)
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                save(state, step)
            if stopper is not None and step < steps and stopper.should_stop(np.concatenate(chunks), start):
                stopped, stop_step = True, step
                break
    except (KeyboardInterrupt, NonFiniteLossError):
        # keep the last finite state (end of the last completed chunk) for `resume`
        if checkpoint is not None and last_saved != step:
            save(state, step)
        raise
    finally:
        if bar is not None:
            bar.close()
    jax.block_until_ready(state)
    wall_time = time.perf_counter() - t0
    if checkpoint is not None and last_saved != step:
        save(state, step)
    elif checkpoint is not None and stopped:
        save(state, step)  # record the early stop

    losses = np.concatenate(chunks)
    return FitResult(
        model=model,
        guide=guide,
        params=svi.get_params(state),
        losses=losses,
        args=tuple(args),
        kwargs=dict(kwargs),
        steps=int(losses.shape[0]),
        wall_time=wall_time,
        svi_state=state,
        stopped_early=stopped,
        stop_step=stop_step,
        svi=svi,
        seed=seed_int,
        resumed_at_step=start,
        restored_wall_time=restored_wall,
    )


def _replay_failure(svi, run_chunk, chunk_state, chunk_start, fail_step, kind, args, kwargs):
    """Build the NonFiniteLossError for step ``fail_step`` from the chunk's start state."""
    args, kwargs = tuple(args), dict(kwargs)

    def state_after(k):  # state after k updates (k >= chunk_start)
        n = k - chunk_start
        return chunk_state if n == 0 else run_chunk(chunk_state, n)[0]

    if kind == "loss":
        # the loss of step k is evaluated at the state after k - 1 updates
        state = state_after(fail_step - 1)
        if fail_step - 1 > chunk_start and not _state_finite(state):
            # finite loss, nonfinite gradient: the update of step k - 1 broke the params
            kind, fail_step = "params", fail_step - 1
    if kind == "params":
        # the state went nonfinite somewhere in the chunk: find the update that did it, one
        # update at a time (a gradient that overflows Adam's second moment once leaves the
        # parameters finite, and the chunk's last gradient is then an ordinary one)
        state, step = chunk_state, chunk_start
        while step < fail_step - 1:
            after = run_chunk(state, 1)[0]
            if not _state_finite(after):
                break
            state, step = after, step + 1
        fail_step = step + 1
    sites, names, bad_params, bad_grads, overflowing = _diagnose_nonfinite(
        svi, state, args, kwargs)
    return _nonfinite_error(fail_step, kind, sites, bad_params, bad_grads, names, overflowing)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="step", dynamic_ncols=True)

