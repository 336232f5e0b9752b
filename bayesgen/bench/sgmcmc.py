"""SG-MCMC on a BNN classifier: SGLD, SGHMC, cyclical SGLD and Entropy-SGLD against NUTS.

:func:`sgmcmc_bnn_study` runs, on the bundled Wisconsin breast-cancer set (569 x 30,
binary), a one-hidden-layer tanh classification BNN (:func:`bayesgen.models.bnn.
bnn_classification`, ``hidden=(16,)`` by default: 513 weights) over several random
stratified 80/20 train/test splits, and reports per method the test accuracy, NLL and ECE
(15 equal-width bins) of the Bayesian model average, the mean total-variation distance of
its predictive probabilities to NUTS's, the wall time and the gradient evaluations; mean
and standard error over the splits. :func:`format_sgmcmc_table` makes the markdown table;
``bayesgen bench-sgmcmc`` runs both and writes ``outputs/bench-sgmcmc/``.

Protocol (all defaults of :func:`sgmcmc_bnn_study`)
---------------------------------------------------

* Data: features standardised with the training split's mean and sd. Splits are drawn
  with ``numpy.random.default_rng(seed + split)``, stratified by class.
* Same budget for every SG method: the same minibatch size (32), the same number of
  chains (4, vectorised, started from the same prior draws: ``init_to_sample`` with the
  split's seed), ``num_warmup`` burn-in steps at the method's base step size, then
  ``5 * num_samples`` steps of which ``num_samples`` per chain are kept: every 5th step for
  the constant-step methods (``thin=5``); for the cyclical ones ``num_cycles`` cycles of
  the cosine schedule, each exploring (no noise) for its first 80% and keeping the draws
  of its last 20% (``exploration=0.8``, as in the kernels' default). So every SG method
  makes the same number of minibatch gradient evaluations and keeps the same number of
  draws; Entropy-SGLD also keeps the same number of draws of its guide θ_a at no extra
  gradient cost.
* Temperature 1 everywhere (the Bayesian posterior; the Entropy-MCMC paper's CIFAR runs
  use a cold posterior, T = 1e-4, with data augmentation, which does not apply here).
* Predictions: the Bayesian model average of the per-draw class probabilities. Reported
  twice: ``chain``, the average of the metrics of each chain's own BMA (one chain, the
  setting of the SG-MCMC papers), and ``pooled``, the BMA of all chains' draws. For
  Entropy-SGLD two variants: the θ draws only (the posterior draws proper, same count as
  the others), and θ with θ_a (what the reference code averages: it saves both the
  sampler's and the guide's weights at each sampling epoch; twice the draws).
* Step sizes are given in "learning-rate" units ``lr`` = step size x N (the per-datum
  scale, the reference code's ``lr``; :mod:`bayesgen.mcmc.entropy_mcmc`): SGLD-type
  kernels use ``h = lr / N``; SGHMC uses ``h = sqrt(lr / (10 N))``, because with the
  default friction ``alpha h = 0.1`` its update is momentum-0.9 SGD with per-datum
  learning rate ``h^2 N``, whose effective step ``h^2 N / (1 - 0.9)`` then equals ``lr``.
  The cyclical kernels' ``lr`` is the peak of the cycle.
* Tuning: on the first split only, the training set is split again (stratified 80/20)
  into a fitting and a validation part; each method runs its grid (``lr_grid``, and
  ``eta_grid`` x ``lr_grid`` for Entropy-SGLD) with the full budget on the fitting part,
  and the setting with the lowest validation NLL (one-chain BMA, θ draws) is used on every
  split. The test splits are never looked at for tuning.
* NUTS: blackjax NUTS with window adaptation on the full-data model, same network and
  prior, 4 chains of ``nuts_warmup`` + ``nuts_samples``, run one after the other
  (``chain_method="sequential"``). Its pooled predictive is the reference for
  ``tv_to_nuts``, the mean over test points of the total-variation distance between a
  method's pooled predictive probabilities and NUTS's. ``tv_halves`` is the same distance
  between the pooled predictives of a method's first and second half of its chains: the
  Monte Carlo noise floor of such distances (for NUTS, of ``tv_to_nuts`` itself).

Measured (``bayesgen bench-sgmcmc``, defaults, 2-core CPU, 532 s; docs/benchmarks.md):
all methods within the splits' standard error of NUTS (accuracy 0.97, NLL 0.12, ECE 0.055);
paired over splits, the cyclical methods have NLL 0.008 below SGLD and NUTS, and
Entropy-SGLD is indistinguishable from SGLD (constant step) or cyclical SGLD (cyclical).

Wall times include the compilation of each run (a few seconds, most of an SG run's time
at these sizes) and were taken on a machine shared with other jobs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from numpyro.infer.initialization import init_to_sample

from bayesgen.datasets import load_breast_cancer
from bayesgen.models.bnn import bnn_class_probs, bnn_classification, bnn_num_weights
from bayesgen.models.bnn import classification_metrics

__all__ = [
    "METHODS",
    "format_paired_table",
    "format_sgmcmc_table",
    "format_tuning_table",
    "sgmcmc_bnn_study",
    "stratified_split",
]

# method name -> (kernel of bayesgen.mcmc.run, is cyclical)
METHODS = {
    "sgld": ("sgld", False),
    "sghmc": ("sghmc", False),
    "cyclical_sgld": ("cyclical_sgld", True),
    "entropy_sgld": ("entropy_sgld", False),
    "cyclical_entropy_sgld": ("entropy_sgld", True),
}
_METRICS = ("accuracy", "nll", "ece")


def stratified_split(y, test_fraction: float, rng: np.random.Generator):
    """Indices ``(train, test)``: each class contributes ``round(test_fraction n_c)`` to test."""
    y = np.asarray(y)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _standardise(x_fit, *others):
    mu, sd = x_fit.mean(0), x_fit.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [((x - mu) / sd).astype(np.float32) for x in (x_fit, *others)]


def _step_size(kernel: str, lr: float, n: int) -> float:
    if kernel == "sghmc":
        return math.sqrt(lr / (10.0 * n))
    return lr / n


def _budget(num_samples: int, num_cycles: int, exploration: float) -> int:
    """The thin that gives the constant-step methods the sampling steps of a cyclical run.

    A cyclical run takes ``num_cycles (ceil(keep e / (1 - e)) + keep)`` sampling steps
    (``keep = num_samples / num_cycles``; the kernels' formula). In floating point
    ``0.8 / (1 - 0.8)`` is a hair above 4, so with the default ``e = 0.8`` each cycle
    explores one step more than ``4 keep``: the cyclical runs make ``num_cycles`` more
    gradient evaluations per chain than the thinned ones (4 in 2000 by default), which the
    table's gradient counts show.
    """
    if num_samples % num_cycles:
        raise ValueError(f"num_samples={num_samples} must be a multiple of num_cycles={num_cycles}")
    keep = num_samples // num_cycles
    steps = num_cycles * (int(math.ceil(keep * exploration / (1.0 - exploration) - 1e-9)) + keep)
    return max(1, int(round(steps / num_samples)))


def _evaluate(draws: dict, x_eval, y_eval, num_chains: int):
    """Per-chain and pooled BMA metrics, and the pooled probabilities, of draws
    ``(chain, draw, ...)``."""
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}
    probs = np.asarray(bnn_class_probs(flat, x_eval), np.float64)
    probs = probs.reshape((num_chains, -1) + probs.shape[1:])  # (chain, draw, n, K)
    per_chain = [classification_metrics(probs[c].mean(0), y_eval) for c in range(num_chains)]
    chain = {m: float(np.mean([r[m] for r in per_chain])) for m in _METRICS}
    pooled_probs = probs.mean((0, 1))
    half = num_chains // 2
    tv_halves = (float(0.5 * np.abs(probs[:half].mean((0, 1)) - probs[half:].mean((0, 1)))
                       .sum(-1).mean()) if half else float("nan"))
    return {"chain": chain, "pooled": classification_metrics(pooled_probs, y_eval),
            "probs": pooled_probs, "tv_halves": tv_halves}


def _concat_draws(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]], axis=1) for k in a}


def _run_sg(method, x, y, x_eval, y_eval, *, lr, eta, hidden, batch_size, num_chains, num_warmup,
            num_samples, num_cycles, exploration, thin, seed):
    from bayesgen import mcmc as bm

    kernel, cyclical = METHODS[method]
    n = x.shape[0]
    opts = {"step_size": _step_size(kernel, lr, n)}
    if cyclical:
        opts.update(num_cycles=num_cycles, exploration=exploration)
    else:
        opts["thin"] = thin
    if kernel == "entropy_sgld":
        opts["eta"] = eta
    model = functools.partial(bnn_classification, hidden=hidden, batch_size=batch_size)
    res = bm.run(model, kernel, x, y, num_chains=num_chains, num_warmup=num_warmup,
                 num_samples=num_samples, batch_size=batch_size, seed=seed, progress_bar=False,
                 kernel_options=opts, init_strategy=init_to_sample)
    out = {"theta": _evaluate(res.samples, x_eval, y_eval, num_chains)}
    if res.guide_samples is not None:
        both = _concat_draws(res.samples, res.guide_samples)
        out["theta+theta_a"] = _evaluate(both, x_eval, y_eval, num_chains)
    info = {"wall_s": res.wall_time, "grad_evals": res.num_grad_evals,
            "data_passes": res.num_grad_evals * batch_size / n,
            "step_size": opts["step_size"]}
    return out, info


def _run_nuts(x, y, x_eval, y_eval, *, hidden, num_chains, num_warmup, num_samples, seed):
    from bayesgen import mcmc as bm

    model = functools.partial(bnn_classification, hidden=hidden)
    res = bm.run(model, "nuts", x, y, num_chains=num_chains, num_warmup=num_warmup,
                 num_samples=num_samples, seed=seed, progress_bar=False,
                 chain_method="sequential", init_strategy=init_to_sample)
    out = {"theta": _evaluate(res.samples, x_eval, y_eval, num_chains)}
    info = {"wall_s": res.wall_time, "grad_evals": res.num_grad_evals,
            "data_passes": float(res.num_grad_evals),
            "divergences": int(np.sum(res.sample_stats["diverging"])),
            "step_size": float(np.mean(res.adaptation["step_size"]))}
    return out, info


def _mean_se(values):
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def sgmcmc_bnn_study(
    methods: Sequence[str] = tuple(METHODS),
    *,
    num_splits: int = 5,
    test_fraction: float = 0.2,
    hidden: Sequence[int] = (16,),
    batch_size: int = 32,
    num_chains: int = 4,
    num_warmup: int = 2000,
    num_samples: int = 400,
    num_cycles: int = 4,
    exploration: float = 0.8,
    lr_grid: Sequence[float] = (0.03, 0.1, 0.3),
    eta_grid: Sequence[float] = (3e-3, 3e-2),
    settings: dict | None = None,
    nuts: bool = True,
    nuts_warmup: int = 500,
    nuts_samples: int = 500,
    seed: int = 0,
    log: Callable = print,
) -> dict:
    """Run the BNN-classification SG-MCMC study (see the module docstring).

    Parameters
    ----------
    methods : names from :data:`METHODS`.
    num_splits, test_fraction : random stratified train/test splits.
    hidden, batch_size, num_chains : network, minibatch size, chains per run.
    num_warmup, num_samples : burn-in steps and kept draws per chain (SG methods); the
        sampling phase is ``num_samples / (1 - exploration)`` steps for every SG method.
    num_cycles, exploration : the cyclical schedule.
    lr_grid, eta_grid : tuning grids (learning-rate units, see the module docstring; η in
        the units of :mod:`bayesgen.mcmc.entropy_mcmc`).
    settings : ``{method: {"lr": ..., "eta": ...}}`` to skip the tuning of those methods.
    nuts, nuts_warmup, nuts_samples : the NUTS reference.
    seed : base seed of the splits and runs.
    log : progress printer.

    Returns
    -------
    dict with ``rows`` (one per method and prediction variant: means and standard errors
    over splits), ``tuning`` (every validation run), ``settings`` (the chosen ``lr``/``eta``),
    ``per_split`` (the raw per-split numbers) and ``config``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    thin = _budget(num_samples, num_cycles, exploration)
    x_all, y_all = load_breast_cancer()
    y_all = y_all.astype(np.int32)
    common = dict(hidden=tuple(hidden), batch_size=batch_size, num_chains=num_chains,
                  num_warmup=num_warmup, num_samples=num_samples, num_cycles=num_cycles,
                  exploration=exploration, thin=thin)
    config = dict(common, num_splits=num_splits, test_fraction=test_fraction,
                  lr_grid=list(lr_grid), eta_grid=list(eta_grid), nuts=nuts,
                  nuts_warmup=nuts_warmup, nuts_samples=nuts_samples, seed=seed,
                  num_weights=bnn_num_weights(x_all.shape[1], hidden), temperature=1.0,
                  ece_bins=15)
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- tuning on split 0
    settings = {m: dict(s) for m, s in (settings or {}).items()}
    tuning = []
    to_tune = [m for m in methods if m not in settings]
    if to_tune:
        train, _ = stratified_split(y_all, test_fraction, np.random.default_rng(seed))
        fit_rel, val_rel = stratified_split(y_all[train], 0.2, np.random.default_rng(seed + 10_000))
        fit, val = train[fit_rel], train[val_rel]
        x_fit, x_val = _standardise(x_all[fit], x_all[val])
        for method in to_tune:
            etas = eta_grid if METHODS[method][0] == "entropy_sgld" else (None,)
            best = None
            for eta in etas:
                for lr in lr_grid:
                    out, info = _run_sg(method, x_fit, y_all[fit], x_val, y_all[val], lr=lr,
                                        eta=eta, seed=seed, **common)
                    nll = out["theta"]["chain"]["nll"]
                    nll = nll if np.isfinite(nll) else float("inf")
                    tuning.append({"method": method, "lr": lr, "eta": eta, "val_nll": nll,
                                   "val_accuracy": out["theta"]["chain"]["accuracy"],
                                   "val_ece": out["theta"]["chain"]["ece"],
                                   "wall_s": info["wall_s"]})
                    log(f"[tune] {method} lr={lr:g}" + (f" eta={eta:g}" if eta else "")
                        + f": val NLL {nll:.4f}, acc {out['theta']['chain']['accuracy']:.3f}"
                        + f" ({info['wall_s']:.1f} s)")
                    if best is None or nll < best[0]:
                        best = (nll, lr, eta)
            settings[method] = {"lr": best[1], "eta": best[2]}
            log(f"[tune] {method}: chose {settings[method]}")

    # ---------------------------------------------------------------- the splits
    per_split = []
    for split in range(num_splits):
        train, test = stratified_split(y_all, test_fraction, np.random.default_rng(seed + split))
        x_tr, x_te = _standardise(x_all[train], x_all[test])
        y_tr, y_te = y_all[train], y_all[test]
        run_seed = seed + split
        results = {}
        if nuts:
            out, info = _run_nuts(x_tr, y_tr, x_te, y_te, hidden=tuple(hidden),
                                  num_chains=num_chains, num_warmup=nuts_warmup,
                                  num_samples=nuts_samples, seed=run_seed)
            results["nuts"] = (out, info)
            log(f"[split {split}] nuts: acc {out['theta']['pooled']['accuracy']:.3f} NLL "
                f"{out['theta']['pooled']['nll']:.4f} ({info['wall_s']:.1f} s, "
                f"{info['divergences']} divergences)")
        for method in methods:
            s = settings[method]
            out, info = _run_sg(method, x_tr, y_tr, x_te, y_te, lr=s["lr"], eta=s.get("eta"),
                                seed=run_seed, **common)
            results[method] = (out, info)
            log(f"[split {split}] {method}: acc {out['theta']['pooled']['accuracy']:.3f} NLL "
                f"{out['theta']['pooled']['nll']:.4f} ({info['wall_s']:.1f} s)")
        ref = results["nuts"][0]["theta"]["probs"] if nuts else None
        for method, (out, info) in results.items():
            for variant, ev in out.items():
                row = {"split": split, "method": method, "draws": variant, **info}
                for pool in ("chain", "pooled"):
                    for m in _METRICS:
                        row[f"{pool}_{m}"] = ev[pool][m]
                row["tv_halves"] = ev["tv_halves"]
                if ref is not None:
                    row["tv_to_nuts"] = float(0.5 * np.abs(ev["probs"] - ref).sum(-1).mean())
                per_split.append(row)

    # ---------------------------------------------------------------- summary rows
    rows = []
    order = (["nuts"] if nuts else []) + list(methods)
    for method in order:
        for variant in ("theta", "theta+theta_a"):
            group = [r for r in per_split if r["method"] == method and r["draws"] == variant]
            if not group:
                continue
            row = {"method": method, "draws": variant, "splits": len(group)}
            if method in settings:
                row.update(lr=settings[method]["lr"], eta=settings[method].get("eta"))
            keys = [f"{p}_{m}" for p in ("chain", "pooled") for m in _METRICS]
            keys += ["tv_halves"] + (["tv_to_nuts"] if nuts else [])
            for k in keys + ["wall_s"]:
                row[k], row[k + "_se"] = _mean_se([r[k] for r in group])
            row["grad_evals"] = int(np.mean([r["grad_evals"] for r in group]))
            row["data_passes"] = float(np.mean([r["data_passes"] for r in group]))
            if method == "nuts":
                row["divergences"] = int(sum(r["divergences"] for r in group))
            rows.append(row)
    total = time.perf_counter() - t_start
    log(f"[sgmcmc] {total:.0f} s in all")
    return {"rows": rows, "tuning": tuning, "settings": settings, "per_split": per_split,
            "config": config, "total_s": total}


def _pm(row, key, digits=3):
    mean, se = row.get(key), row.get(key + "_se")
    if mean is None:
        return ""
    if se is None or not np.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


_LABELS = {
    "nuts": "NUTS (reference)",
    "sgld": "SGLD",
    "sghmc": "SGHMC",
    "cyclical_sgld": "cyclical SGLD",
    "entropy_sgld": "Entropy-SGLD",
    "cyclical_entropy_sgld": "Entropy-SGLD, cyclical",
}


def format_sgmcmc_table(result: dict, pool: str = "chain") -> str:
    """Markdown table of :func:`sgmcmc_bnn_study`'s rows: metrics of the one-chain BMA
    (``pool="chain"``) or of the pooled chains (``"pooled"``), mean ± se over splits."""
    if pool not in ("chain", "pooled"):
        raise ValueError(f"pool must be 'chain' or 'pooled', got {pool!r}")
    rows = result["rows"]
    has_tv = any("tv_to_nuts" in r for r in rows)
    head = ["method", "draws", "lr", "eta", "accuracy", "NLL", "ECE"]
    head += ["TV to NUTS", "TV halves"] if has_tv else ["TV halves"]
    head += ["wall s", "grad evals", "data passes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        draws = "θ" if r["draws"] == "theta" else "θ + θ_a (2x draws)"
        cells = [_LABELS.get(r["method"], r["method"]), draws,
                 f"{r['lr']:g}" if r.get("lr") is not None else "",
                 f"{r['eta']:g}" if r.get("eta") is not None else "",
                 _pm(r, f"{pool}_accuracy"), _pm(r, f"{pool}_nll"), _pm(r, f"{pool}_ece")]
        if has_tv:
            cells.append(_pm(r, "tv_to_nuts"))
        cells.append(_pm(r, "tv_halves"))
        cells += [f"{r['wall_s']:.1f}", f"{r['grad_evals']:,}", f"{r['data_passes']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paired_table(result: dict, baseline: str = "sgld", pool: str = "chain") -> str:
    """Markdown table of paired differences to ``baseline`` (θ draws), split by split:
    method minus baseline for accuracy, NLL and ECE, mean ± se over splits. The splits'
    own variation (most of the ± of :func:`format_sgmcmc_table`) cancels in the pairs."""
    per = result["per_split"]

    def values(method, draws, key):
        rows = sorted((r for r in per if r["method"] == method and r["draws"] == draws),
                      key=lambda r: r["split"])
        return np.array([r[key] for r in rows], np.float64)

    if not any(r["method"] == baseline for r in per):
        raise ValueError(f"baseline {baseline!r} is not among the study's methods")
    lines = ["| method | draws | Δ accuracy | Δ NLL | Δ ECE |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["method"] == baseline and r["draws"] == "theta":
            continue
        cells = [_LABELS.get(r["method"], r["method"]),
                 "θ" if r["draws"] == "theta" else "θ + θ_a"]
        for m in _METRICS:
            key = f"{pool}_{m}"
            d = values(r["method"], r["draws"], key) - values(baseline, "theta", key)
            mean, se = _mean_se(d)
            cells.append(f"{mean:+.4f} ± {se:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tuning_table(result: dict) -> str:
    """Markdown table of the validation runs of the tuning."""
    lines = ["| method | lr | eta | val NLL | val accuracy | val ECE |",
             "|---|---|---|---|---|---|"]
    for t in result["tuning"]:
        eta = f"{t['eta']:g}" if t["eta"] is not None else ""
        lines.append(f"| {t['method']} | {t['lr']:g} | {eta} | {t['val_nll']:.4f} | "
                     f"{t['val_accuracy']:.3f} | {t['val_ece']:.3f} |")
    return "\n".join(lines)
