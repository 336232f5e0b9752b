"""``bayesgen demo``: flows against numpyro's guides and NUTS on two hard posteriors.

Fits Neal's 10-d funnel and the centered eight-schools model with two bayesgen flow guides
(RealNVP, neural spline), numpyro's AutoNormal and AutoIAFNormal, and runs blackjax NUTS;
prints the comparison table (see :mod:`bayesgen.bench.runner` for the columns) and writes
a pair plot per method and target (arviz-plots) to the output folder.
"""

from __future__ import annotations

import os
import time

import numpy as np

DEMO_TARGETS = ("funnel", "eight_schools_centered")
DEMO_METHODS = ("realnvp", "nsf", "numpyro-normal", "numpyro-iaf", "nuts")
PAIR_VARS = {"funnel": ("v", "x", 3), "eight_schools_centered": ("tau", "theta", 3)}


def pair_plot(samples, target_name, method, path):
    """Pair plot of a few coordinates (arviz-plots, matplotlib backend) saved to ``path``."""
    import arviz_base
    import arviz_plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalar, vector, k = PAIR_VARS[target_name]
    post = {scalar: np.asarray(samples[scalar])[None]}
    vec = np.asarray(samples[vector])[:, :k]
    for i in range(k):
        post[f"{vector}[{i}]"] = vec[None, :, i]
    dt = arviz_base.from_dict({"posterior": post})
    pc = arviz_plots.plot_pair(dt, backend="matplotlib")
    fig = pc.viz["figure"].item() if hasattr(pc.viz["figure"], "item") else pc.viz["figure"]
    fig.suptitle(f"{target_name}: {method}")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(out, *, steps=6000, seed=0, log=print):
    from bayesgen.bench.runner import format_table, run_bench

    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    rows, samples = run_bench(DEMO_TARGETS, DEMO_METHODS, steps=steps, num_particles=8,
                              learning_rate=2e-3, num_samples=4000, seed=seed, log=log)
    table = format_table(rows)
    for (tname, method), s in samples.items():
        path = os.path.join(out, f"pair_{tname}_{method}.png")
        try:
            pair_plot(s, tname, method, path)
        except Exception as err:  # a plot failure must not hide the numbers
            log(f"[demo] pair plot for {tname}/{method} failed: {err!r}")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# bayesgen demo\n\nCommand: `bayesgen demo --steps {steps} --seed {seed}`\n\n"
                f"{table}\n")
    log(table)
    log("\nfunnel: sd(v) is 3 in truth; eight schools: mean|z| is the mean error of the "
        "posterior means in reference sds (reference: long NUTS run stored in the package).")
    log(f"[demo] {time.time() - t0:.0f} s; table and pair plots in {out}/")
    return rows
