"""Make the stored reference draws of the non-analytic benchmark targets.

Run ``python -m bayesgen.models.make_references`` (about one minute on 2 CPU cores). It
runs numpyro NUTS in float64 with parallel chains and writes, into ``bayesgen/data``:

``eight_schools_reference.npz``
    Non-centred eight schools (the same posterior serves the centred model for ``mu``,
    ``tau``, ``theta``): 4 chains x 50,000 draws, ``target_accept_prob=0.95``, thinned
    by 10 to 20,000 draws.
``logistic_regression_reference.npz``
    Standardised breast-cancer logistic regression: 4 chains x 5,000 draws, thinned
    by 2 to 10,000 draws.
``logistic_regression_unstandardized_reference.npz``
    The raw-feature regression: dense mass matrix, 4 chains x 5,000 draws after a long
    warm-up, thinned by 2 to 10,000 draws.

Draws are stored as float32 (site name -> ``(num_draws, *site_shape)``). The run's
settings and convergence are stored as ``meta_*`` arrays: ``meta_num_warmup``,
``meta_num_samples`` (per chain, before thinning), ``meta_num_chains``, ``meta_thinning``,
``meta_seed``, ``meta_target_accept_prob``, ``meta_dense_mass``, ``meta_max_tree_depth``,
``meta_numpyro_version``, ``meta_jax_version``, ``meta_max_rhat``, ``meta_min_ess_bulk``,
``meta_num_divergences``, ``meta_runtime_s``, ``meta_model``.

Convergence is printed per site (split R-hat and bulk ESS of the unthinned chains,
numpyro's estimators); the script refuses to write a file whose max R-hat exceeds 1.01.

Use ``--only NAME`` to remake one file and ``--quick`` for a short smoke run written
to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _run_nuts(model, args, kwargs, *, num_warmup, num_samples, num_chains, seed,
              target_accept_prob, dense_mass, max_tree_depth):
    import jax
    import numpy as np
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(
        model,
        target_accept_prob=target_accept_prob,
        dense_mass=dense_mass,
        max_tree_depth=max_tree_depth,
    )
    chain_method = "parallel" if jax.local_device_count() >= num_chains else "sequential"
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=False,
    )
    t0 = time.perf_counter()
    mcmc.run(jax.random.key(seed), *args, extra_fields=("diverging", "num_steps"), **kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    samples = jax.tree.map(lambda x: np.asarray(x.block_until_ready()), samples)
    runtime = time.perf_counter() - t0
    extra = mcmc.get_extra_fields(group_by_chain=True)
    diverging = int(np.asarray(extra["diverging"]).sum())
    mean_steps = float(np.asarray(extra["num_steps"]).mean())

    rhat, ess = {}, {}
    for site, x in samples.items():
        rhat[site] = np.asarray(split_gelman_rubin(x))
        ess[site] = np.asarray(effective_sample_size(x))
    return samples, rhat, ess, diverging, mean_steps, runtime


def _report(name, rhat, ess, diverging, mean_steps, runtime, total):
    import numpy as np

    print(f"\n== {name}: {runtime:.1f} s, {diverging} divergences, "
          f"{mean_steps:.1f} leapfrog steps per draw, {total} draws in all")
    for site in rhat:
        print(f"  {site:12s} max R-hat {np.max(rhat[site]):.4f}   "
              f"min bulk ESS {np.min(ess[site]):9.0f}   mean ESS {np.mean(ess[site]):9.0f}")
    max_rhat = max(float(np.max(r)) for r in rhat.values())
    min_ess = min(float(np.min(e)) for e in ess.values())
    print(f"  overall: max R-hat {max_rhat:.4f}, min bulk ESS {min_ess:.0f}")
    return max_rhat, min_ess


def make_one(name, out_dir, *, quick=False, seed=0):
    """Run the reference for ``name`` and write ``<out_dir>/<file>``; returns the path."""
    import jax
    import numpy as np
    import numpyro

    from bayesgen.models import targets as T

    if name == "eight_schools":
        model = T.eight_schools_noncentered_model
        args = (T.EIGHT_SCHOOLS_SIGMA,)
        kwargs = {"y": T.EIGHT_SCHOOLS_Y}
        settings = dict(num_warmup=5000, num_samples=50000, num_chains=4, seed=seed,
                        target_accept_prob=0.95, dense_mass=False, max_tree_depth=10)
        thinning = 10
        keep = ("mu", "tau", "theta")
    elif name in ("logistic_regression", "logistic_regression_unstandardized"):
        standardize = name == "logistic_regression"
        X, y, _, _ = T.logistic_regression_data(standardize)
        model = T.logistic_regression_model
        args = (X,)
        kwargs = {"y": y, "prior_scale": 1.0, "intercept_scale": 5.0}
        if standardize:
            settings = dict(num_warmup=2000, num_samples=5000, num_chains=4, seed=seed,
                            target_accept_prob=0.9, dense_mass=False, max_tree_depth=10)
        else:
            settings = dict(num_warmup=5000, num_samples=5000, num_chains=4, seed=seed,
                            target_accept_prob=0.9, dense_mass=True, max_tree_depth=10)
        thinning = 2
        keep = ("intercept", "beta")
    else:
        raise ValueError(f"unknown reference {name!r}; choose from {list(T._REFERENCE_FILES)}")

    if quick:
        settings.update(num_warmup=200, num_samples=400)
        thinning = 1

    samples, rhat, ess, diverging, mean_steps, runtime = _run_nuts(model, args, kwargs, **settings)
    rhat = {k: rhat[k] for k in keep}
    ess = {k: ess[k] for k in keep}
    total = settings["num_chains"] * (settings["num_samples"] // thinning)
    max_rhat, min_ess = _report(name, rhat, ess, diverging, mean_steps, runtime, total)

    out = {}
    for site in keep:
        x = samples[site][:, ::thinning]
        out[site] = x.reshape((-1,) + x.shape[2:]).astype(np.float32)
    out.update(
        meta_model=np.array(model.__name__),
        meta_num_warmup=np.array(settings["num_warmup"]),
        meta_num_samples=np.array(settings["num_samples"]),
        meta_num_chains=np.array(settings["num_chains"]),
        meta_thinning=np.array(thinning),
        meta_seed=np.array(seed),
        meta_target_accept_prob=np.array(settings["target_accept_prob"]),
        meta_dense_mass=np.array(settings["dense_mass"]),
        meta_max_tree_depth=np.array(settings["max_tree_depth"]),
        meta_numpyro_version=np.array(numpyro.__version__),
        meta_jax_version=np.array(jax.__version__),
        meta_max_rhat=np.array(max_rhat),
        meta_min_ess_bulk=np.array(min_ess),
        meta_num_divergences=np.array(diverging),
        meta_runtime_s=np.array(runtime),
    )
    if max_rhat > 1.01 and not quick:
        print(f"  NOT written: max R-hat {max_rhat:.4f} > 1.01")
        return None
    path = os.path.join(out_dir, T._REFERENCE_FILES[name])
    np.savez_compressed(path, **out)
    print(f"  wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=None,
                        help="eight_schools, logistic_regression or "
                             "logistic_regression_unstandardized (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="short runs written to a temporary folder (smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default: bayesgen/data)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)

    # Before any jax computation: 64-bit reference runs, one host device per chain.
    import numpyro

    numpyro.set_host_device_count(4)
    numpyro.enable_x64()

    names = opts.only or ["eight_schools", "logistic_regression",
                          "logistic_regression_unstandardized"]
    if opts.out is not None:
        out_dir = opts.out
    elif opts.quick:
        out_dir = tempfile.mkdtemp(prefix="bayesgen_refs_")
    else:
        out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    failed = [n for n in names if make_one(n, out_dir, quick=opts.quick, seed=opts.seed) is None]
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
