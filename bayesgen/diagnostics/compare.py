"""Side-by-side comparison of posterior approximations: VI fits and MCMC runs alike.

:func:`compare` takes :class:`~bayesgen.fit.FitResult` and
:class:`~bayesgen.mcmc.MCMCResult` objects (and optionally a reference: another result or
a dict of draws) and returns a :class:`Comparison` with

- ``table``: one row per (method, scalar coordinate): mean, sd, bulk ESS and R-hat (MCMC;
  arviz's rank-normalised estimates), and against the reference the mean error in
  reference sds and the sd ratio;
- ``summary``: one row per method: the worst coordinate's mean error and log sd ratio,
  the smallest ESS, the largest R-hat, PSIS k-hat and the importance-sampling ESS (VI
  guides, from :func:`bayesgen.diagnose`; surrogate families through their extended-space
  weights), wall time and gradient evaluations;
- ``plot()``: mean +- 2 sd of every coordinate, one colour per method, beside the
  reference.

VI draws are independent, so ESS and R-hat are not reported for them (they would only
restate the number of draws); their quality measure is k-hat.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from arviz_stats.base import array_stats

__all__ = ["Comparison", "compare"]


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` returns: ``table`` (per coordinate), ``summary`` (per method)."""

    table: pd.DataFrame
    summary: pd.DataFrame
    _draws: dict = dataclasses.field(repr=False, default_factory=dict)
    _reference: dict | None = dataclasses.field(repr=False, default=None)

    def __str__(self):
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            return self.summary.to_string(float_format=lambda v: f"{v:.3g}")

    def plot(self, path: str | None = None, max_coords: int = 30):
        """Mean +- 2 sd per coordinate and method (reference in black); saved if ``path``.

        Coordinates have different scales, so each is shown standardised by the
        reference's mean and sd (the first method's when there is no reference).
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        methods = list(self._draws)
        coords = list(next(iter(self._draws.values())))[:max_coords]
        series = [(m, self._draws[m]) for m in methods]
        if self._reference is not None:
            series.append(("reference", self._reference))
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(coords) * max(1, len(series)) / 2 + 1.5))
        height = 0.8 / len(series)
        base = self._reference if self._reference is not None else series[0][1]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (name, draws) in enumerate(series):
            color = "black" if name == "reference" else colors[i % len(colors)]
            for j, c in enumerate(coords):
                if c not in draws:
                    continue
                x = (draws[c] - base[c].mean()) / (base[c].std() or 1.0)
                y = j + (i - (len(series) - 1) / 2) * height
                ax.plot([x.mean() - 2 * x.std(), x.mean() + 2 * x.std()], [y, y], color=color, lw=1.5)
                ax.plot([x.mean()], [y], "o", color=color, ms=3, label=name if j == 0 else None)
        ax.set_yticks(range(len(coords)))
        ax.set_yticklabels(coords)
        ax.invert_yaxis()
        ax.axvline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("mean +- 2 sd, standardised by the " + ("reference" if self._reference is not None else series[0][0]))
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _scalar_draws(samples: Mapping[str, Any], sites=None, grouped=False) -> dict:
    """``{'site[i,j]': draws}``; draws (chain, draw) when ``grouped`` else (n,)."""
    out = {}
    for name in sorted(samples):
        if sites is not None and name not in sites:
            continue
        v = np.asarray(samples[name], np.float64)
        lead = 2 if grouped else 1
        flat = v.reshape(v.shape[:lead] + (-1,))
        shape = v.shape[lead:]
        for j in range(flat.shape[-1]):
            label = name if not shape else f"{name}[{','.join(map(str, np.unravel_index(j, shape)))}]"
            out[label] = flat[..., j]
    return out


def _kind(result):
    from bayesgen.fit import FitResult
    from bayesgen.mcmc import MCMCResult

    if isinstance(result, MCMCResult):
        return "mcmc"
    if isinstance(result, FitResult):
        return "vi"
    raise TypeError(
        f"compare takes FitResult (bayesgen.fit) and MCMCResult (bayesgen.mcmc.run) objects, got "
        f"{type(result).__name__}"
    )


def _name(result, kind):
    if kind == "mcmc":
        return f"mcmc:{result.kernel}"
    from bayesgen.fit import _guide_name

    return f"vi:{_guide_name(result.guide)}"


def _latent_names(result, kind):
    from bayesgen.errors import latent_layout, trace_model

    model = result.model
    return set(latent_layout(trace_model(model, result.args, result.kwargs)))


def compare(
    results: Sequence[Any],
    reference: Any = None,
    *,
    names: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
    num_samples: int = 4000,
    diagnose_vi: bool = True,
    seed: int = 0,
) -> Comparison:
    """Compare VI and MCMC results on the same model in one table.

    Parameters
    ----------
    results : sequence of FitResult / MCMCResult
    reference : FitResult, MCMCResult or dict of draws ``{site: (n, ...)}``, optional
        The answer to compare against (e.g. a long NUTS run).
    names : labels of the results (default ``vi:<guide>`` / ``mcmc:<kernel>``).
    sites : latent sites to compare (default: the latent sites of the first result's
        model).
    num_samples : draws taken from each VI result.
    diagnose_vi : run :func:`bayesgen.diagnose` on VI results for k-hat (costs
        ``num_samples`` joint-density evaluations; surrogate families also their
        extended-space weights).
    seed : seed of the VI draws and diagnostics.
    """
    results = list(results)
    if not results:
        raise ValueError("compare needs at least one result")
    kinds = [_kind(r) for r in results]
    if names is None:
        names = [_name(r, k) for r, k in zip(results, kinds, strict=True)]
        seen: dict[str, int] = {}
        for i, n in enumerate(names):  # make duplicates unique
            seen[n] = seen.get(n, 0) + 1
            if seen[n] > 1:
                names[i] = f"{n}#{seen[n]}"
    names = list(names)
    if len(names) != len(results) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(results)} distinct labels, got {names!r}")
    if sites is None:
        sites = _latent_names(results[0], kinds[0])
    sites = set(sites)

    ref_draws = None
    if reference is not None:
        if isinstance(reference, Mapping):
            ref_draws = _scalar_draws(reference, sites)
        else:
            rk = _kind(reference)
            ref_samples = (reference.get_samples() if rk == "mcmc"
                           else reference.sample(seed, num_samples))
            ref_draws = _scalar_draws(ref_samples, sites)
        if not ref_draws:
            raise ValueError(f"the reference has none of the sites {sorted(sites)}")

    rows, summary, flat_draws = [], [], {}
    for result, kind, name in zip(results, kinds, names, strict=True):
        info: dict[str, Any] = {"method": name, "kind": kind}
        if kind == "mcmc":
            grouped = _scalar_draws(result.samples, sites, grouped=True)
            draws = {k: v.reshape(-1) for k, v in grouped.items()}
            info["wall_s"] = result.wall_time
            info["grad_evals"] = result.num_grad_evals
            div = result.sample_stats.get("diverging")
            info["divergences"] = int(np.sum(div)) if div is not None else np.nan
        else:
            grouped = None
            draws = _scalar_draws(result.sample(seed, num_samples), sites)
            info["wall_s"] = result.wall_time
            particles = getattr(getattr(result.svi, "loss", None), "num_particles", 1)
            info["grad_evals"] = int(result.steps) * int(particles)
            info["divergences"] = np.nan
        if not draws:
            raise ValueError(f"result '{name}' has none of the sites {sorted(sites)}")
        flat_draws[name] = draws
        errs, lsd, ess_all, rhat_all = [], [], [], []
        for coord, x in draws.items():
            row = {"method": name, "coord": coord, "mean": x.mean(), "sd": x.std(ddof=1)}
            if grouped is not None:
                g = grouped[coord]
                row["ess_bulk"] = float(array_stats.ess(g, chain_axis=0, draw_axis=1, method="bulk"))
                row["r_hat"] = (float(array_stats.rhat(g, chain_axis=0, draw_axis=1))
                                if g.shape[0] > 1 else np.nan)
                ess_all.append(row["ess_bulk"])
                rhat_all.append(row["r_hat"])
            else:
                row["ess_bulk"] = row["r_hat"] = np.nan
            if ref_draws is not None and coord in ref_draws:
                r = ref_draws[coord]
                rsd = r.std(ddof=1)
                row["mean_err_sd"] = (row["mean"] - r.mean()) / rsd if rsd > 0 else np.nan
                row["sd_ratio"] = row["sd"] / rsd if rsd > 0 else np.nan
                errs.append(abs(row["mean_err_sd"]))
                lsd.append(abs(math.log(row["sd_ratio"])) if row["sd_ratio"] > 0 else np.inf)
            rows.append(row)
        info["max_mean_err_sd"] = max(errs) if errs else np.nan
        info["max_log_sd_ratio"] = max(lsd) if lsd else np.nan
        info["min_ess"] = min(ess_all) if ess_all else np.nan
        info["max_r_hat"] = np.nanmax(rhat_all) if rhat_all and not np.all(np.isnan(rhat_all)) else np.nan
        info["khat"] = info["is_ess"] = np.nan
        if kind == "vi" and diagnose_vi:
            from bayesgen.diagnostics.psis import diagnose

            d = diagnose(result, num_samples=num_samples, key=seed)
            info["khat"], info["is_ess"] = d.khat, d.ess
        summary.append(info)

    cols = ["method", "kind", "max_mean_err_sd", "max_log_sd_ratio", "min_ess", "max_r_hat",
            "khat", "is_ess", "divergences", "wall_s", "grad_evals"]
    summary_df = pd.DataFrame(summary)[cols].set_index("method")
    table = pd.DataFrame(rows).set_index(["method", "coord"])
    return Comparison(table, summary_df, flat_draws, ref_draws)
