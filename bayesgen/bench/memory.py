"""Memory of posterior sampling from a flow guide on a 600-weight BNN.

numpyro's AutoIAFNormal, asked for 1000 draws on such a network, peaked near 18 GB here (a
copy of the flow's weights per draw under ``vmap``; see the project notes). This benchmark
fits a flow guide to a 10 -> 50 -> 1 tanh network (601 weights, float32) on a seeded
synthetic regression set of 200 points, checks that the loss stays finite throughout, then
draws ``num_draws`` posterior samples with ``FitResult.sample`` and reports the process's
peak resident memory before and after the draw (``ru_maxrss``; run it in a fresh process
for a clean number).
"""

from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist


def bnn_model(X, y=None, hidden=50):
    """Two-layer tanh BNN with N(0, 1) weights and a fixed noise sd of 0.1."""
    d = X.shape[1]
    w1 = numpyro.sample("w1", dist.Normal(0, 1).expand([d, hidden]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0, 1).expand([hidden]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0, 1).expand([hidden, 1]).to_event(2))
    b2 = numpyro.sample("b2", dist.Normal(0, 1).expand([1]).to_event(1))
    mean = (jnp.tanh(X @ w1 + b1) @ w2 + b2)[:, 0]
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(mean, 0.1), obs=y)


def synthetic_regression(n=200, d=10, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d) / np.sqrt(d)
    y = (np.sin(X @ w) + 0.1 * rng.standard_normal(n)).astype(np.float32)
    return X, y


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_memory_benchmark(flow="maf", steps=2000, num_draws=4000, seed=0, log=print):
    from bayesgen.fit import default_optimizer, fit
    from bayesgen.guides import AutoFlow

    X, y = synthetic_regression(seed=seed)
    guide = AutoFlow(bnn_model, flow=flow)
    result = fit(bnn_model, guide, X, y, steps=steps, num_particles=1, progress_bar=False,
                 optimizer=default_optimizer(steps, 1e-3), seed=seed)
    finite = bool(np.all(np.isfinite(result.losses)))
    before = _peak_mb()
    t0 = time.perf_counter()
    draws = result.sample(jr.key(seed + 1), num_draws)
    jax.block_until_ready(draws)
    t_draw = time.perf_counter() - t0
    after = _peak_mb()
    row = {
        "flow": flow, "latent_dim": int(guide.latent_dim), "steps": steps,
        "loss_finite": finite, "final_loss": float(np.mean(result.losses[-100:])),
        "num_draws": num_draws, "peak_rss_mb_before_draw": before,
        "peak_rss_mb_after_draw": after, "draw_s": t_draw,
        "dtype": str(np.asarray(draws["w1"]).dtype),
    }
    log(row)
    return row
