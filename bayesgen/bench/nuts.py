"""bayesgen's NUTS (blackjax through :func:`bayesgen.mcmc.run`) against numpyro's own NUTS.

Both samplers run the same model with the same chains, warmup and draws, alternating in
one process, ``repeats`` times each. For every run the table reports

- ``ess_min`` / ``ess_med``: smallest and median bulk ESS (arviz) over the latent
  coordinates (constrained sites, every scalar);
- ``wall_s``: seconds of the whole call (tracing, compilation, warmup and sampling, as a
  user meets it);
- ``ess_min/s``: ``ess_min / wall_s``;
- ``grads``: leapfrog steps of the sampling phase (all chains), and ``ess_min/kgrad``:
  ``ess_min`` per thousand of them;
- ``ratio``: bayesgen's ``ess_min/s`` over numpyro's, medians over the repeats.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from arviz_stats.base import array_stats
from numpyro.infer import MCMC, NUTS

import bayesgen.mcmc as bm
from bayesgen.models.targets import get_target

DEFAULT_TARGETS = ("eight_schools_noncentered", "logistic_regression")


def _ess(samples: dict) -> np.ndarray:
    """Bulk ESS of every scalar of ``{site: (chain, draw, ...)}``."""
    out = []
    for v in samples.values():
        v = np.asarray(v, np.float64)
        flat = v.reshape(v.shape[:2] + (-1,))
        for j in range(flat.shape[-1]):
            out.append(array_stats.ess(flat[..., j], chain_axis=0, draw_axis=1, method="bulk"))
    return np.asarray(out)


def _latent_samples(samples, names):
    return {k: samples[k] for k in names if k in samples}


def run_numpyro_nuts(target, *, key, num_chains, num_warmup, num_samples, chain_method):
    mcmc = MCMC(
        NUTS(target.model), num_warmup=num_warmup, num_samples=num_samples,
        num_chains=num_chains, chain_method=chain_method, progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(key, *target.args, extra_fields=("num_steps",), **target.kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples)
    wall = time.perf_counter() - start
    grads = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
    return {k: np.asarray(v) for k, v in samples.items()}, wall, grads


def run_bayesgen_nuts(target, *, seed, num_chains, num_warmup, num_samples, chain_method):
    start = time.perf_counter()
    result = bm.run(
        target.model, "nuts", *target.args, num_chains=num_chains, num_warmup=num_warmup,
        num_samples=num_samples, seed=seed, progress_bar=False, chain_method=chain_method,
        **target.kwargs,
    )
    wall = time.perf_counter() - start
    grads = int(np.sum(result.sample_stats["n_steps"]))
    return result.samples, wall, grads


def nuts_comparison(
    targets=DEFAULT_TARGETS,
    *,
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    repeats: int = 3,
    seed: int = 0,
    numpyro_chain_method: str = "sequential",
    bayesgen_chain_methods=("vectorized", "sequential"),
):
    """Rows of the NUTS comparison (see the module docstring)."""
    rows = []
    for name in targets:
        target = get_target(name)
        latent = None
        per_method: dict[str, list] = {}
        for r in range(repeats):
            key = jax.random.PRNGKey(seed + r)
            runs = [("numpyro", numpyro_chain_method,
                     lambda cm: run_numpyro_nuts(target, key=key, num_chains=num_chains,
                                                 num_warmup=num_warmup, num_samples=num_samples,
                                                 chain_method=cm))]
            for cm in bayesgen_chain_methods:
                runs.append(("bayesgen", cm,
                             lambda cm: run_bayesgen_nuts(target, seed=seed + r, num_chains=num_chains,
                                                          num_warmup=num_warmup,
                                                          num_samples=num_samples, chain_method=cm)))
            for lib, cm, fn in runs:
                samples, wall, grads = fn(cm)
                if latent is None:
                    latent = sorted(target.reference(jax.random.PRNGKey(0), 10))
                ess = _ess(_latent_samples(samples, latent))
                per_method.setdefault(f"{lib} ({cm})", []).append(
                    {"ess_min": float(ess.min()), "ess_med": float(np.median(ess)),
                     "wall_s": wall, "grads": grads}
                )
        base = np.median([m["ess_min"] / m["wall_s"] for m in per_method[f"numpyro ({numpyro_chain_method})"]])
        for method, runs in per_method.items():
            med = {k: float(np.median([m[k] for m in runs])) for k in runs[0]}
            rate = float(np.median([m["ess_min"] / m["wall_s"] for m in runs]))
            per_grad = float(np.median([1e3 * m["ess_min"] / m["grads"] for m in runs]))
            rows.append({
                "target": name, "method": method, "ess_min": med["ess_min"],
                "ess_med": med["ess_med"], "wall_s": med["wall_s"], "ess_min/s": rate,
                "grads": int(med["grads"]), "ess_min/kgrad": per_grad, "ratio": rate / base,
            })
    return rows


def format_nuts_table(rows) -> str:
    cols = ["target", "method", "ess_min", "ess_med", "wall_s", "ess_min/s", "grads",
            "ess_min/kgrad", "ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
