"""Deep GPs on UCI regression: DSVI vs DDVI vs DBVI (``bayesgen bench-dgp``).

For each dataset, number of layers and split of the standard protocol
(:func:`bayesgen.datasets.uci.load_uci`, inputs and target standardised on the training
rows), one :class:`~bayesgen.models.deep_gp.DeepGP` is fitted per method with the same
optimiser (Adam, cosine decay), steps, minibatch and inducing points:

- ``dsvi``: :class:`~bayesgen.models.deep_gp.AutoDSVI` (Gaussian per layer and output,
  closed-form KL; Salimbeni & Deisenroth 2017);
- ``ddvi``: :class:`bayesgen.AutoDDVI` on the whitened inducing outputs, with bayesgen's
  pathfinder start (a diagonal preconditioner from an L-BFGS path on the minibatch
  potential the guide is set up with). ``init_scale=None`` would make the reference
  process the GP prior's, as in the DDVI paper, but from the prior (unit variance in every
  inner layer) the doubly stochastic loss starts near 5e4 on Boston and Adam at 1e-2 went
  to NaN; from the pathfinder start it is 3.6e3 and falls below DSVI's (1.6e3 vs 3.1e3
  after 1000 steps; measured with ``bayesgen bench-dgp``'s settings);
- ``dbvi``: :class:`bayesgen.AutoDBVI`, same start, with its diffusion start amortised from
  each layer's inducing inputs (``context=model.start_context``).

Learning rates: DSVI's 1e-2 (Salimbeni & Deisenroth), 3e-3 for the diffusion guides (their
networks diverge at 1e-2); both with cosine decay to a tenth.

Reported per method: test RMSE and test log-likelihood in the target's original units (the
predictive mixture over ``num_samples`` posterior draws), mean and standard error over the
splits, and the fit's wall time.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from bayesgen.datasets.uci import load_uci
from bayesgen.errors import NonFiniteLossError
from bayesgen.fit import default_optimizer, fit
from bayesgen.models.deep_gp import AutoDSVI, DeepGP, deep_gp_predict, deep_gp_regression_metrics

METHODS = ("dsvi", "ddvi", "dbvi")
LEARNING_RATES = {"dsvi": 1e-2, "ddvi": 3e-3, "dbvi": 3e-3}


def make_dgp_guide(method: str, model: DeepGP, **options):
    """The guide a method name stands for, on a :class:`DeepGP`."""
    import bayesgen

    if method == "dsvi":
        return AutoDSVI(model, **options)
    if method == "ddvi":
        return bayesgen.AutoDDVI(model, **options)
    if method == "dbvi":
        return bayesgen.AutoDBVI(model, **{"context": model.start_context, **options})
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def run_dgp_split(dataset, split, num_layers, method, *, steps=5000, learning_rate=None,
                  batch_size=256, num_inducing=100, num_samples=100, seed=0,
                  guide_options=None):
    """Fit one method on one split; returns a result row (dict)."""
    data = load_uci(dataset, split)
    n = data.x_train.shape[0]
    model = DeepGP(data.x_train, num_layers=num_layers,
                   num_inducing=min(num_inducing, n), seed=seed)
    guide = make_dgp_guide(method, model, **(guide_options or {}))
    batch = None if batch_size is None or batch_size >= n else batch_size
    learning_rate = learning_rate or LEARNING_RATES[method]
    t0 = time.perf_counter()
    result = fit(model, guide, data.x_train, data.y_train, steps=steps,
                 optimizer=default_optimizer(steps, learning_rate), progress_bar=False,
                 seed=seed, batch_size=batch)
    wall = time.perf_counter() - t0
    draws = result.sample(jax.random.key(seed + 1), num_samples=num_samples)
    pred = deep_gp_predict(model, draws, result.params, data.x_test,
                           rng_key=jax.random.key(seed + 2))
    y_test = jnp.asarray(data.y_test)
    rmse, loglik = deep_gp_regression_metrics(pred, y_test, y_scale=float(data.y_std))
    tail = np.asarray(result.losses)[-max(1, steps // 10):]
    return {"dataset": dataset, "split": split, "layers": num_layers, "method": method,
            "rmse": float(rmse), "test_ll": float(loglik), "final_loss": float(tail.mean()),
            "wall_s": wall}


def dgp_uci_study(datasets, layers=(2,), methods=METHODS, *, num_splits=None, split_ids=None,
                  log=print, **options):
    """Every method, depth and split; returns the per-split rows.

    ``num_splits`` runs the first N splits of each dataset (default all); ``split_ids`` runs
    the listed split indices instead (to finish or share out a study), not both.
    """
    from bayesgen.datasets.uci import uci_splits

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    if num_splits is not None and split_ids is not None:
        raise ValueError("pass num_splits (the first N splits) or split_ids, not both")
    rows = []
    for dataset in datasets:
        total = len(uci_splits(dataset))
        if split_ids is not None:
            bad = [i for i in split_ids if not 0 <= int(i) < total]
            if bad:
                raise ValueError(f"split_ids {bad} are out of range for {dataset}, which has "
                                 f"splits 0..{total - 1}")
            splits = [int(i) for i in split_ids]
        else:
            splits = range(total if num_splits is None else min(num_splits, total))
        for num_layers in layers:
            for split in splits:
                for method in methods:
                    try:
                        row = run_dgp_split(dataset, split, num_layers, method, **options)
                    except NonFiniteLossError as err:  # one diverged fit: count it, go on
                        first = str(err).split(". ")[0]
                        log(f"[bench-dgp] {dataset} L={num_layers} split {split} {method}: "
                            f"FAILED ({first})")
                        rows.append({"dataset": dataset, "split": split, "layers": num_layers,
                                     "method": method, "failed": first})
                        continue
                    log(f"[bench-dgp] {dataset} L={num_layers} split {split} {method}: "
                        f"RMSE {row['rmse']:.3f}, test LL {row['test_ll']:.3f}, "
                        f"{row['wall_s']:.0f} s")
                    rows.append(row)
    return rows


def summarise(rows):
    """Mean and standard error over the finished splits per (dataset, layers, method).

    Splits whose fit failed (rows with ``"failed"``) are counted in ``failed``, not averaged.
    """
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["layers"], r["method"]), []).append(r)
    out = []
    for (dataset, layers, method), all_rs in groups.items():
        rs = [r for r in all_rs if "failed" not in r]
        failed = len(all_rs) - len(rs)
        if not rs:
            nan = (float("nan"), float("nan"))
            out.append({"dataset": dataset, "layers": layers, "method": method, "splits": 0,
                        "failed": failed, "rmse": nan, "test_ll": nan, "wall_s": float("nan")})
            continue

        def mse(key, rs=rs):
            v = np.array([r[key] for r in rs])
            se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            return float(v.mean()), float(se)

        out.append({"dataset": dataset, "layers": layers, "method": method, "splits": len(rs),
                    "failed": failed, "rmse": mse("rmse"), "test_ll": mse("test_ll"),
                    "wall_s": float(np.mean([r["wall_s"] for r in rs]))})
    return out


def format_dgp_table(summary):
    lines = ["| dataset | layers | method | splits | test RMSE | test LL | fit s |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        splits = f"{s['splits']} ({s['failed']} failed)" if s.get("failed") else f"{s['splits']}"
        lines.append(
            f"| {s['dataset']} | {s['layers']} | {s['method']} | {splits} | "
            f"{s['rmse'][0]:.3f} ± {s['rmse'][1]:.3f} | {s['test_ll'][0]:.3f} ± "
            f"{s['test_ll'][1]:.3f} | {s['wall_s']:.0f} |")
    return "\n".join(lines)
