"""Importance-sampling diagnostics of a fitted guide: PSIS k-hat and log-evidence.

With draws z_s ~ q and log weights ``log w_s = log p(x, z_s) - log q(z_s)`` (both in the
constrained space the model is written in; a guide's change of variables enters log q):

- the Pareto k-hat of the weights' right tail (Yao, Vehtari, Simpson & Gelman, 2018;
  ``-inf`` when all weights are equal): below 0.5 (or the sample-size-aware threshold
  ``min(1 - 1/log10(S), 0.7)`` of Vehtari et al., 2024) the importance-corrected estimates
  are reliable; above 0.7 q misses mass of the posterior.
- the importance-weighted log-evidence ``log(mean_s w_s)`` (Burda et al., 2016), a
  stochastic lower bound on log p(x) in expectation that tightens with S, beside the ELBO
  ``mean_s log w_s``;
- the importance-sampling effective sample size ``1 / sum_s wbar_s^2``.

All of this needs honest importance weights, never a training surrogate. For a family with
an exact density, log q is its ``log_prob``. For semi-implicit and implicit families (SIVI,
UIVI, kernel SIVI, SIVI-SM, LIVI), whose marginal log q has no closed form, the weights live
on the extended space of the draw and its mixing variables: ``log w = log p(x, z) -
log q_K(z)``, where ``q_K`` averages the conditional density over the generating mixing
draw and K fresh ones (the family's ``log_importance_density``). These are exact importance
weights for an extended target whose z-marginal is the posterior, so the evidence estimate
is unbiased for every K and k-hat diagnoses the extended proposal, which approaches the
marginal q as K grows (default K = 1000; see :mod:`bayesgen.families.semi_implicit`). The
fresh draws may come from a reverse model r(eps | z) and be importance-weighted (IWHVI):
AutoSIVI's learned one (``reverse_model=True``) and LIVI's Laplace one (the default on small
models, :func:`bayesgen.families.implicit.laplace_reverse`); the report's ``weights`` line
names it. A plug-in log q from fresh draws only would be biased low and is never used.
Families with a surrogate and no such method are refused with an explanation.

References
----------
Yao, Vehtari, Simpson & Gelman, "Yes, but did it work?: Evaluating variational inference",
ICML 2018.
Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling", JMLR 25, 2024.
Burda, Grosse & Salakhutdinov, "Importance weighted autoencoders", ICLR 2016.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density

from bayesgen.errors import check_int


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Importance-sampling report of a fitted guide (see module docstring)."""

    khat: float
    khat_threshold: float
    log_evidence: float
    elbo: float
    ess: float
    num_samples: int
    log_weights: np.ndarray = dataclasses.field(repr=False)
    warnings: tuple[str, ...] = ()
    weights: str = "exact log q"

    @property
    def reliable(self) -> bool:
        return bool(self.khat < self.khat_threshold)  # False for nan

    def __str__(self):
        lines = [
            f"PSIS k-hat        {self.khat:.3f}  (threshold {self.khat_threshold:.2f}: "
            f"{'ok' if self.reliable else 'UNRELIABLE'})",
            f"log-evidence (IW) {self.log_evidence:.4f}  from {self.num_samples} draws",
            f"ELBO              {self.elbo:.4f}",
            f"IS ESS            {self.ess:.1f} ({100 * self.ess / self.num_samples:.1f}%)",
            f"weights           {self.weights}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class SurrogateDensityError(ValueError):
    """The guide's density is a surrogate, so importance weights from it are not honest."""


def _guide_kinds(guide, params, args, kwargs, key):
    """Density kind of each latent guide site, and the trace; refuse sites with no honest weight."""
    tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), key)).get_trace(
        *args, **kwargs
    )
    kinds = {}
    for name, site in tr.items():
        if site["type"] != "sample" or site.get("is_observed", False):
            continue
        kind = getattr(site["fn"], "density", "exact")
        if kind != "exact" and not hasattr(site["fn"], "log_importance_density"):
            raise SurrogateDensityError(
                f"guide site {name!r} has a {kind!r} density ({type(site['fn']).__name__}): "
                "its log_prob is a training surrogate, not log q, and the family provides no "
                "extended-space importance density, so PSIS weights and evidence estimates "
                "from it would be wrong. Use a family with an exact density or one that "
                "implements log_importance_density."
            )
        kinds[name] = kind
    return kinds, tr


def _guide_log_density(guide, params, args, kwargs, key, num_mixing):
    """Like numpyro's ``log_density`` of the guide, with extended-space terms for surrogates."""
    k_guide, k_mix = jr.split(key)
    tr = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), k_guide)).get_trace(
        *args, **kwargs
    )
    total = 0.0
    for site in tr.values():
        if site["type"] != "sample" or site.get("is_observed", False):
            continue
        fn, value, inter = site["fn"], site["value"], site.get("intermediates")
        if getattr(fn, "density", "exact") == "exact":
            lp = fn.log_prob(value, inter) if inter else fn.log_prob(value)
        else:
            lp = fn.log_importance_density(k_mix, value, inter, num_mixing)
        scale = site.get("scale")
        lp = jnp.sum(lp) if scale is None else scale * jnp.sum(lp)
        total = total + lp
    return total, tr


def log_importance_weights(
    model, guide, params, args=(), kwargs=None, *, key, num_samples, num_mixing=1000
):
    """``log p(x, z_s) - log q(z_s)`` for ``num_samples`` draws of the guide (numpy array).

    For surrogate families ``log q`` is the extended-space density with ``num_mixing``
    fresh mixing draws (module docstring).
    """
    kwargs = kwargs or {}

    def one(k):
        k_q, k_p = jr.split(k)
        log_q, g_tr = _guide_log_density(guide, params, args, kwargs, k_q, num_mixing)
        latents = {
            n: s["value"]
            for n, s in g_tr.items()
            if s["type"] == "sample" and not s["is_observed"]
            and not s.get("infer", {}).get("is_auxiliary", False)
        }
        log_p, _ = log_density(handlers.seed(model, k_p), args, kwargs, {**params, **latents})
        return log_p - log_q

    keys = jr.split(key, num_samples)
    chunk = min(500, num_samples)
    out = []
    fn = jax.jit(jax.vmap(one))
    for start in range(0, num_samples, chunk):
        ks = keys[start : start + chunk]
        if ks.shape[0] < chunk:  # pad to keep one compiled shape
            ks = jnp.concatenate([ks, keys[: chunk - ks.shape[0]]])
            out.append(np.asarray(fn(ks))[: num_samples - start])
        else:
            out.append(np.asarray(fn(ks)))
    return np.concatenate(out)


def diagnose(result, *, num_samples: int = 4000, key=None, num_mixing: int = 1000) -> Diagnosis:
    """PSIS k-hat, importance-weighted log-evidence, ELBO and IS ESS of a fitted guide.

    Parameters
    ----------
    result : a :class:`bayesgen.fit.FitResult` (anything with ``model``, ``guide``,
        ``params``, ``args`` and ``kwargs``).
    num_samples : number of guide draws S.
    key : PRNG key (default ``jax.random.key(0)``).
    num_mixing : K, fresh mixing draws per z in the extended-space weights of semi-implicit
        and implicit families (ignored for exact families). Larger K: weights closer to
        the marginal ones, cost O(num_samples * K) conditional densities.

    Raises
    ------
    SurrogateDensityError
        when the guide's family declares a surrogate density and has no extended-space
        importance density: weights from it would not be importance weights.
    """
    from arviz_stats.base import array_stats

    check_int("num_samples", num_samples, minimum=100)
    key = jr.key(0) if key is None else (jr.key(key) if isinstance(key, int) else key)
    model, guide, params = result.model, result.guide, result.params
    args, kwargs = tuple(result.args), dict(result.kwargs or {})
    k_check, k_draw = jr.split(key)
    check_int("num_mixing", num_mixing)
    kinds, trace = _guide_kinds(guide, params, args, kwargs, k_check)
    surrogate = sorted(n for n, k in kinds.items() if k != "exact")
    proposals = {n: getattr(trace[n]["fn"], "importance_proposal", None) for n in surrogate}
    notes = [n if proposals[n] is None else f"{n} ({proposals[n]} proposal)" for n in surrogate]
    weights = (
        "exact log q" if not surrogate
        else f"extended space (mixing draws, K={num_mixing}) for {', '.join(notes)}"
    )
    log_w = log_importance_weights(
        model, guide, params, args, kwargs, key=k_draw, num_samples=num_samples,
        num_mixing=num_mixing,
    )
    warnings = []
    finite = np.isfinite(log_w)
    if not finite.all():
        warnings.append(
            f"{(~finite).sum()} of {num_samples} log weights are not finite (the guide puts "
            "mass where the model's density is zero or undefined); they count as zero weight"
        )
        log_w = np.where(finite, log_w, -np.inf)
    spread = np.ptp(log_w[finite]) if finite.any() else 0.0
    if finite.sum() > 1 and spread < 1e-4:
        khat = float("-inf")  # equal weights: q matches p up to float rounding, no tail at all
    else:
        # arviz-stats' psislw expects log-likelihood-like input and negates it internally.
        floor = np.min(log_w[finite], initial=0.0) - 1e3
        _, khat = array_stats.psislw(-np.where(finite, log_w, floor))
        khat = float(khat)
    threshold = min(1.0 - 1.0 / math.log10(num_samples), 0.7)
    lse = float(jax.nn.logsumexp(jnp.asarray(log_w)))
    log_evidence = lse - math.log(num_samples)
    wbar = np.exp(log_w - lse)
    ess = float(1.0 / np.sum(wbar**2))
    elbo = float(np.mean(log_w[finite])) if finite.any() else float("-inf")
    if khat >= threshold:
        warnings.append(
            f"k-hat {khat:.2f} >= {threshold:.2f}: the guide misses posterior mass; "
            "posterior summaries from it are unreliable"
        )
    return Diagnosis(
        khat=khat, khat_threshold=threshold, log_evidence=log_evidence, elbo=elbo, ess=ess,
        num_samples=num_samples, log_weights=log_w, warnings=tuple(warnings), weights=weights,
    )
