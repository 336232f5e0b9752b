"""Benchmark runner: bayesgen guides against numpyro's autoguides and blackjax NUTS.

Each (target, method) pair is fitted in the same process with the same optimiser, steps
and particles, then scored against the target's reference draws:

- ``max|mean err|/sd`` and ``mean|mean err|/sd``: per-coordinate |E_q - E_ref| / sd_ref;
- ``|log sd ratio|``: mean over coordinates of |log(sd_q / sd_ref)|;
- ``energy``: energy distance between q and reference draws (reference-standardised);
- ``elbo``: minus the mean loss of the last 10% of steps (VI only);
- ``khat``: PSIS k-hat of the guide (exact densities, or the extended-space / path weights
  of semi-implicit and diffusion guides);
- ``elbo_err``, ``iw_err``, ``eubo_err`` (targets with a known log Z): ELBO, importance-
  weighted evidence (2000 draws) and evidence upper bound (from 2000 exact draws; exact-
  density and diffusion guides) minus log Z;
- ``wall_s``: wall time of the fit or the sampler (compilation included);
- ``step_ms``: compiled time of one SVI step, and ``vs_iaf``: that over numpyro
  AutoIAFNormal's step time on the same target, measured in the same run;
- target extras: funnel ``sd(v)`` (truth 3), banana ``sd_err_x1``/``sd_err_x2``
  (sd_q / sd_true - 1 per coordinate), eight schools ``mean|z|`` (mean over mu, tau and
  theta of |E_q - E_ref| / sd_ref), ring ``modes`` covered (of 8).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO

from bayesgen.bench.peers import NUMPYRO_GUIDES, run_nuts
from bayesgen.diagnostics.metrics import energy_distance, flatten_draws
from bayesgen.diagnostics.psis import SurrogateDensityError, diagnose
from bayesgen.fit import default_optimizer, fit
from bayesgen.guides import AutoFlow
from bayesgen.models.targets import get_target, modes_covered
from bayesgen.objectives import KernelSteinLoss, ScoreMatchingLoss

FLOW_METHODS = ("realnvp", "nsf", "maf", "bnaf", "planar", "radial")
IMPLICIT_METHODS = ("sivi", "uivi", "ksivi", "sivism", "livi", "ddvi", "dbvi", "snf", "cmcd")
METHODS = FLOW_METHODS + IMPLICIT_METHODS + tuple(NUMPYRO_GUIDES) + ("nuts",)


def _implicit_guide_class(method):
    import bayesgen.guides as g

    return {"sivi": "AutoSIVI", "uivi": "AutoUIVI", "ksivi": "AutoKSIVI",
            "sivism": "AutoSIVISM", "livi": "AutoLIVI", "ddvi": "AutoDDVI",
            "dbvi": "AutoDBVI", "snf": "AutoSNF", "cmcd": "AutoCMCD"}[method], g


def make_guide(method: str, model, **options):
    """The guide a method name stands for (bayesgen flows, semi-implicit guides, numpyro peers)."""
    if method in FLOW_METHODS:
        return AutoFlow(model, flow=method, **options)
    if method in IMPLICIT_METHODS:
        name, module = _implicit_guide_class(method)
        return getattr(module, name)(model, **options)
    if method in NUMPYRO_GUIDES:
        return NUMPYRO_GUIDES[method](model, **options)
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def _compiled_runner(svi, args, kwargs, num_steps):
    @jax.jit
    def run(state):
        def body(s, _):
            s, loss = svi.update(s, *args, **kwargs)
            return s, loss

        return jax.lax.scan(body, state, None, length=num_steps)

    return run


def _time_once(run, state):
    t0 = time.perf_counter()
    jax.block_until_ready(run(state))
    return time.perf_counter() - t0


def time_svi_step(svi, state, args=(), kwargs=None, *, num_steps: int = 200, repeats: int = 3):
    """Seconds per compiled SVI step (best of ``repeats`` runs of ``num_steps`` steps)."""
    run = _compiled_runner(svi, args, kwargs or {}, num_steps)
    jax.block_until_ready(run(state))  # compile
    return min(_time_once(run, state) for _ in range(repeats)) / num_steps


def _sites(reference):
    return sorted(reference)


def score(target, samples, reference):
    """Accuracy of ``samples`` (dict site -> (n, ...)) against reference draws."""
    sites = [s for s in _sites(reference) if s in samples]
    x = flatten_draws(samples, sites)
    r = flatten_draws(reference, sites)
    m_ref, s_ref = r.mean(0), r.std(0)
    z = np.abs(x.mean(0) - m_ref) / s_ref
    row = {
        "max_mean_err": float(z.max()),
        "mean_mean_err": float(z.mean()),
        "log_sd_ratio": float(np.mean(np.abs(np.log(x.std(0) / s_ref)))),
        "energy": float(energy_distance(x, r)),
    }
    name = target.name
    if name == "funnel":
        row["sd_v"] = float(np.std(np.asarray(samples["v"])))
    if name.startswith("eight_schools"):
        es_sites = [s for s in ("mu", "tau", "theta") if s in samples]
        xe, re_ = flatten_draws(samples, es_sites), flatten_draws(reference, es_sites)
        row["mean_abs_z"] = float(np.mean(np.abs(xe.mean(0) - re_.mean(0)) / re_.std(0)))
    if name == "banana":  # per-coordinate sd error against the exact sds
        true_sd = np.asarray(target.true_sd["z"])
        sd = np.std(np.asarray(samples["z"]).reshape(-1, 2), axis=0)
        row["sd_err_x1"], row["sd_err_x2"] = (float(e) for e in sd / true_sd - 1.0)
    if name == "ring":
        key = next(iter(samples))
        row["modes"] = int(modes_covered(np.asarray(samples[key]), centers=target.extra["centers"],
                                         sd=target.extra["sd"]))
    return row


def eubo(result, target, key, num_draws: int = 2000) -> float:
    """Evidence upper bound ``E_p[log p(x, z) - log q(z)]`` from exact posterior draws.

    Exact-density guides use ``log q`` itself; diffusion guides the path term on reference
    paths started at the draws (``reference_log_ratio``). NaN where the guide has neither,
    the target has no exact draws, or a site is constrained (the draws would need the
    constraining Jacobian).
    """
    guide = result.guide
    if not target.exact or not hasattr(guide, "_init_locs"):
        return float("nan")
    try:
        family = guide.get_posterior(result.params)
    except (NotImplementedError, AttributeError, TypeError):
        return float("nan")
    draws = target.reference(key, num_draws)
    sites = list(guide._init_locs)
    prototype = guide.prototype_trace
    from numpyro.distributions.transforms import IdentityTransform, biject_to

    def unconstrained(site):
        t = biject_to(prototype[site]["fn"].support)
        return isinstance(getattr(t, "base_transform", t), IdentityTransform)

    if not all(unconstrained(s) for s in sites):
        return float("nan")
    z = jnp.concatenate([jnp.reshape(jnp.asarray(draws[s]), (num_draws, -1)) for s in sites], 1)
    if getattr(family, "density", "exact") == "exact":  # numpyro's guides: exact
        log_q = family.log_prob(z)
    elif hasattr(family, "reference_log_ratio"):
        log_q = family.reference_log_ratio(jr.fold_in(key, 1), z)
    else:
        return float("nan")
    from numpyro.infer.util import potential_energy

    def log_p_one(zi):
        return -potential_energy(target.model, target.args, dict(target.kwargs),
                                 guide._unpack_latent(zi))

    log_p = jax.vmap(log_p_one)(z)
    return float(jnp.mean(log_p - log_q))


def run_method(target, method, *, steps, num_particles, learning_rate, num_samples, seed,
               guide_options=None, nuts_options=None, time_steps=True):
    """Fit (or sample) one method on one target; returns (row, samples)."""
    key = jr.key(seed)
    if method == "nuts":
        opts = dict(num_warmup=1000, num_samples=max(1, num_samples // 4), num_chains=4)
        opts.update(nuts_options or {})
        draws, info = run_nuts(target.model, target.args, dict(target.kwargs), key=key, **opts)
        samples = {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}
        row = {"wall_s": info["wall_time"], "divergences": info["divergences"],
               "grad_evals": info["num_grad_evals"]}
        return row, samples
    guide = make_guide(method, target.model, **(guide_options or {}))
    optimizer = default_optimizer(steps, learning_rate=learning_rate)
    result = fit(target.model, guide, *target.args, steps=steps, optimizer=optimizer,
                 num_particles=num_particles, progress_bar=False, seed=seed, **dict(target.kwargs))
    samples = {k: np.asarray(v) for k, v in result.sample(jr.fold_in(key, 1), num_samples).items()}
    tail = result.losses[-max(1, steps // 10):]
    row = {"wall_s": result.wall_time}
    if not isinstance(result.svi.loss, (KernelSteinLoss, ScoreMatchingLoss)):  # no ELBO there
        row["elbo"] = float(-np.mean(tail))
    try:
        diag = diagnose(result, num_samples=2000, key=jr.fold_in(key, 2))
        row["khat"] = diag.khat
        if target.log_Z is not None:  # evidence errors: ELBO, importance-weighted, EUBO
            row["elbo_err"] = diag.elbo - target.log_Z
            row["iw_err"] = diag.log_evidence - target.log_Z
            row["eubo_err"] = eubo(result, target, jr.fold_in(key, 3)) - target.log_Z
    except SurrogateDensityError:
        row["khat"] = float("nan")
    if time_steps:
        row["step_ms"] = 1e3 * time_svi_step(result.svi, result.svi_state, target.args,
                                             dict(target.kwargs))
    return row, samples


def run_bench(targets, methods, *, steps=10000, num_particles=8, learning_rate=2e-3,
              num_samples=4000, seed=0, target_options=None, guide_options=None, log=print):
    """Run every method on every target; returns a list of result rows (dicts).

    ``guide_options`` maps a method name to keyword arguments of its guide.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    rows = []
    all_samples = {}
    for tname in targets:
        target = get_target(tname, **(target_options or {}).get(tname, {}))
        reference = target.reference(jr.key(seed + 12345), num_samples)
        reference = {k: np.asarray(v) for k, v in reference.items()}
        t_rows = []
        for method in methods:
            log(f"[bench] {tname} / {method} ...")
            row, samples = run_method(
                target, method, steps=steps, num_particles=num_particles,
                learning_rate=learning_rate, num_samples=num_samples, seed=seed,
                guide_options=(guide_options or {}).get(method),
            )
            row = {"target": tname, "method": method, **score(target, samples, reference), **row}
            t_rows.append(row)
            all_samples[(tname, method)] = samples
            log("         " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                                        if k not in ("target", "method")))
        iaf = [r.get("step_ms") for r in t_rows if r["method"] == "numpyro-iaf"]
        for r in t_rows:
            if iaf and iaf[0] and r.get("step_ms"):
                r["vs_iaf"] = r["step_ms"] / iaf[0]
        rows += t_rows
    return rows, all_samples


def steptime_comparison(targets, *, methods=("maf", "realnvp"), num_layers=3, hidden=None,
                        depth=2, num_particles=1, num_steps=2000, repeats=7, seed=0, log=print):
    """Step time of bayesgen guides against numpyro's AutoIAFNormal, measured in one run.

    numpyro's AutoIAFNormal(num_flows=L, hidden_dims=[H] * depth) is the reference. Flow
    methods get the same size (``num_layers=L, hidden=H, depth=depth``; H defaults to the
    latent dimension, numpyro's default width); the semi-implicit and implicit guides run at
    their defaults. All use the same optimiser and are timed as the best of ``repeats``
    interleaved runs of ``num_steps`` compiled steps.
    """
    rows = []
    for tname in targets:
        target = get_target(tname)
        h = hidden or max(target.latent_dim, 2)
        guides = {
            "numpyro-iaf": NUMPYRO_GUIDES["numpyro-iaf"](target.model, num_flows=num_layers,
                                                         hidden_dims=[h] * depth),
        }
        for m in methods:
            if m in FLOW_METHODS:
                guides[m] = AutoFlow(target.model, flow=m, num_layers=num_layers, hidden=h,
                                     depth=depth)
            else:
                guides[m] = make_guide(m, target.model)
        runs = {}
        for name, guide in guides.items():
            make_loss = getattr(guide, "default_loss", None)
            loss = make_loss(num_particles) if callable(make_loss) else Trace_ELBO(num_particles)
            svi = SVI(target.model, guide, numpyro.optim.Adam(1e-3), loss)
            state = svi.init(jr.key(seed), *target.args, **dict(target.kwargs))
            run = _compiled_runner(svi, target.args, dict(target.kwargs), num_steps)
            jax.block_until_ready(run(state))  # compile
            runs[name] = (run, state)
        # Interleave the timings so a load change on the machine hits every guide alike.
        best = {name: math.inf for name in runs}
        for _ in range(repeats):
            for name, (run, state) in runs.items():
                best[name] = min(best[name], _time_once(run, state))
        times = {name: 1e3 * t / num_steps for name, t in best.items()}
        for name, t in times.items():
            sized = name in FLOW_METHODS or name == "numpyro-iaf"
            rows.append({"target": tname, "method": name,
                         "layers": num_layers if sized else "default",
                         "hidden": h if sized else "default", "depth": depth if sized else "default",
                         "step_ms": t, "vs_iaf": t / times["numpyro-iaf"]})
            log(f"[steptime] {tname} {name}: {t:.3f} ms ({t / times['numpyro-iaf']:.2f}x IAF)")
    return rows


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


COLUMNS = ("target", "method", "max_mean_err", "mean_mean_err", "log_sd_ratio", "energy",
           "sd_v", "sd_err_x1", "sd_err_x2", "mean_abs_z", "modes", "elbo", "khat",
           "elbo_err", "iw_err", "eubo_err", "divergences", "wall_s", "step_ms", "vs_iaf")


def format_table(rows, columns=COLUMNS):
    """Markdown table of result rows (columns that no row has are left out)."""
    cols = [c for c in columns if any(c in r for r in rows)]
    cols += [c for r in rows for c in r if c not in cols and c not in ("grad_evals",)]
    cols = list(dict.fromkeys(cols))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) if c in r else "" for c in cols) + " |")
    return "\n".join(lines)
