"""LIVI against numpyro's AutoNormal on a wide BNN: step time, memory and test metrics.

:func:`livi_bnn_benchmark` trains, in one process, with the same minibatch size,
optimiser and number of steps,

- :class:`bayesgen.guides.implicit.AutoLIVI` with the matrix generator and the matrix-free
  entropy (the paper's scalable configuration), and
- numpyro's ``AutoNormal`` (mean-field Gaussian, the cheapest guide numpyro has),

on a regression BNN (:func:`bayesgen.models.bnn.bnn_regression`, ``hidden=(1000, 1000)``
gives about 1M weights on UCI inputs, ``(4128, 4128)`` about 17M) with the observations in
a subsampled plate. Steps are run in jitted chunks (``lax.scan`` over ``svi.update``), the
two guides alternating chunk by chunk so that both see the same machine state; the step
time reported for each is the median over chunks after the first (which compiles). Both
guides are set up on the full-data model (same latent layout) and trained on the
minibatch model.

Reported: the number of weights, the two step times and their ratio, the process's peak
resident memory (``ru_maxrss``) after each stage (AutoNormal is set up and compiled first,
so the increase at the LIVI stages is LIVI's), the device's peak memory when the backend
reports it (GPU), the final losses (mean of the last 10% of steps), and the test RMSE and
test log-likelihood of the mixture predictive of each guide (original units of y).

Reading the losses: LIVI's negative ELBO contains the constant ``(d - m) (-log sigma - 1/2
log(2 pi e))`` of its near-degenerate output noise (sigma = 1e-3 in whitened units), about
``5.5 d`` nats, so it is far above AutoNormal's even when its predictions are better; compare
the test metrics.

Measured (1 particle, minibatch 256, Adam 1e-3 cosine, kin8nm split 0, seed 0):

=====================  =======  ==========  =========  =====  =====================
BNN, machine           steps    AutoNormal  AutoLIVI   ratio  memory
=====================  =======  ==========  =========  =====  =====================
(1000, 1000), 1.01M,   300      52.4 ms     78.8 ms    1.51   peak RSS 1.45 GiB for
2-core CPU                                                    the whole run (LIVI's
                                                              set-up +0.24, compile
                                                              +0.12 GiB)
(4128, 4128), 17.1M,   300      1.17 ms     2.80 ms    2.38   device peak 3.8 GiB
H100                                                          (both guides)
(1000, 1000), H100     300      0.48 ms     1.89 ms    3.9    launch-bound sizes
=====================  =======  ==========  =========  =====  =====================

Test metrics after these short runs (300 steps, about 10 epochs; original units): at 1M
weights AutoNormal RMSE 0.112 / log-lik 0.295, AutoLIVI RMSE 0.212 / log-lik 0.133 (CPU;
the GPU run agrees); at 17M AutoNormal 0.156 / 0.144, AutoLIVI 0.203 / 0.174.

Run (CPU, about 1M weights)::

    python -c "from bayesgen.bench.livi import livi_bnn_benchmark; \
               livi_bnn_benchmark(hidden=(1000, 1000), dataset='kin8nm', steps=300)"

and ``hidden=(4128, 4128)`` for 17M weights on a GPU.
"""

from __future__ import annotations

import functools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_median, init_to_sample

from bayesgen.errors import check_int
from bayesgen.guides.implicit import AutoLIVI
from bayesgen.models.bnn import bnn_forward, bnn_num_weights, bnn_regression, regression_metrics

__all__ = ["BNNData", "livi_bnn_benchmark", "synthetic_bnn_data"]


@dataclass(frozen=True)
class BNNData:
    """Train/test regression data on the fitted scale; ``y_std`` maps errors to original units."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    y_std: float = 1.0
    name: str = "data"


def synthetic_bnn_data(n_train=8192, n_test=1024, n_features=8, seed=0) -> BNNData:
    """A seeded nonlinear regression set (standardised inputs, noise sd 0.1)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    w = rng.standard_normal((n_features, 2)) / np.sqrt(n_features)
    y = np.sin(2 * x @ w[:, 0]) + 0.5 * np.tanh(x @ w[:, 1]) + 0.1 * rng.standard_normal(n)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    return BNNData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 1.0, "synthetic")


def _load_data(dataset) -> BNNData:
    if isinstance(dataset, BNNData):
        return dataset
    if callable(dataset):
        return _load_data(dataset())
    if dataset == "synthetic":
        return synthetic_bnn_data()
    if isinstance(dataset, str):
        from bayesgen.datasets.uci import load_uci

        split = load_uci(dataset, split=0, standardize=True)
        return BNNData(split.x_train, split.y_train, split.x_test, split.y_test,
                       float(split.y_std), dataset)
    if isinstance(dataset, tuple | list) and len(dataset) in (4, 5):
        arrays = [np.asarray(a, np.float32) for a in dataset[:4]]
        y_std = float(dataset[4]) if len(dataset) == 5 else 1.0
        return BNNData(*arrays, y_std=y_std, name="user data")
    raise ValueError(
        "dataset must be a UCI name (see bayesgen.datasets.uci.UCI_DATASETS), 'synthetic', a "
        "BNNData, a callable returning one, or (x_train, y_train, x_test, y_test[, y_std]); "
        f"got {dataset!r}"
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _device_peak_mb():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _tree_mb(tree) -> float:
    return sum(np.size(a) * np.asarray(a).dtype.itemsize
               for a in jax.tree.leaves(jax.device_get(tree))) / 2**20


def _generator_shapes(guide):
    if guide._generator_kind != "matrix":
        return None
    gen = guide._generator_template
    return [tuple(gen.noise_shape)] + [
        (layer.left.value.shape[0], layer.right.value.shape[1]) for layer in gen.layers
    ]


def _chunk_runner(svi, x, y, chunk):
    @jax.jit
    def run(state):
        def body(s, _):
            return svi.update(s, x, y)

        return jax.lax.scan(body, state, None, length=chunk)

    return run


def _predict(guide, params, data: BNNData, activation, *, key, num_draws, chunk=10):
    fs, noises = [], []
    x_test = jnp.asarray(data.x_test)

    @jax.jit
    def draw(k):
        s = guide.sample_posterior(k, params, sample_shape=(chunk,))
        weights = {n: v for n, v in s.items() if n != "noise"}
        f = jax.vmap(lambda p: bnn_forward(p, x_test, activation))(weights)
        return f, s["noise"]

    for k in jr.split(key, -(-num_draws // chunk)):
        f, noise = draw(k)
        fs.append(np.asarray(f))
        noises.append(np.asarray(noise))
    f = np.concatenate(fs)[:num_draws]
    noise = np.concatenate(noises)[:num_draws]
    return regression_metrics(f, noise, jnp.asarray(data.y_test), y_scale=data.y_std)


def livi_bnn_benchmark(
    hidden=(1000, 1000),
    dataset="kin8nm",
    steps: int = 200,
    batch_size: int = 256,
    num_particles: int = 1,
    seed: int = 0,
    *,
    learning_rate: float = 1e-3,
    chunk: int = 10,
    activation: str = "tanh",
    livi_options: dict | None = None,
    autonormal_options: dict | None = None,
    num_predictive_draws: int = 100,
    log: Callable = print,
) -> dict:
    """Train AutoLIVI and AutoNormal on the same wide BNN; report time, memory and metrics.

    Parameters
    ----------
    hidden : hidden widths of the BNN, e.g. ``(1000, 1000)`` (about 1M weights with 8
        inputs) or ``(4128, 4128)`` (about 17M).
    dataset : a UCI name (split 0, standardised), ``"synthetic"``, a :class:`BNNData`, a
        callable returning one, or ``(x_train, y_train, x_test, y_test[, y_std])``.
    steps : SVI steps per guide (rounded up to a multiple of ``chunk``).
    batch_size : minibatch size of the ``"data"`` plate.
    num_particles : particles of ``Trace_ELBO`` (the same for both guides).
    seed : seeds the guides, the minibatches and the predictive draws.
    learning_rate : Adam with cosine decay to 1% over ``steps``, the same for both guides.
    chunk : steps per jitted chunk (the timing unit).
    activation : the BNN's activation.
    livi_options : keyword arguments for :class:`AutoLIVI` (default: matrix generator,
        matrix-free entropy, the guide's defaults otherwise).
    autonormal_options : keyword arguments for ``AutoNormal`` (default: ``init_to_sample``,
        i.e. a prior draw as the mean, a standard network initialisation, and
        ``init_scale=0.01``).
    num_predictive_draws : posterior draws for the test metrics.
    log : where the table goes (``print``; ``None`` for silence).

    Returns
    -------
    dict with the numbers of the table (times in ms, memory in MiB).
    """
    check_int("steps", steps, minimum=2 * chunk)
    data = _load_data(dataset)
    n_train, n_features = data.x_train.shape
    check_int("batch_size", batch_size, maximum=n_train)
    num_chunks = -(-steps // chunk)
    steps = num_chunks * chunk
    model_kw = dict(hidden=tuple(hidden), activation=activation)
    full_model = functools.partial(bnn_regression, batch_size=None, **model_kw)
    batch_model = functools.partial(bnn_regression, batch_size=batch_size, **model_kw)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    rss = {"start": _peak_rss_mb()}

    def optimiser():
        return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))

    loss = Trace_ELBO(num_particles=num_particles)
    k_an, k_livi, k_pred = jr.split(jr.key(seed), 3)
    guides, states, runners, setup_s = {}, {}, {}, {}

    an_kw = {"init_loc_fn": init_to_sample, "init_scale": 0.01, **(autonormal_options or {})}
    livi_kw = {"generator": "matrix", "entropy": "matrix_free", "seed": seed,
               "init_loc_fn": init_to_median, **(livi_options or {})}
    for name, make, key in (
        ("AutoNormal", lambda: AutoNormal(full_model, **an_kw), k_an),
        ("AutoLIVI", lambda: AutoLIVI(full_model, **livi_kw), k_livi),
    ):
        t0 = time.perf_counter()
        guide = make()
        svi = SVI(batch_model, guide, optimiser(), loss)
        state = svi.init(key, x, y)
        run = _chunk_runner(svi, x, y, chunk)
        jax.block_until_ready(state)
        guides[name], states[name], runners[name] = (guide, svi), state, run
        setup_s[name] = time.perf_counter() - t0
        rss[f"{name} set-up"] = _peak_rss_mb()

    losses = {name: [] for name in guides}
    times = {name: [] for name in guides}
    cpu_times = {name: [] for name in guides}
    for i in range(num_chunks):
        for name in guides:  # alternate chunk by chunk
            t0, c0 = time.perf_counter(), time.process_time()
            states[name], chunk_losses = runners[name](states[name])
            chunk_losses = np.asarray(chunk_losses)  # blocks
            times[name].append((time.perf_counter() - t0) / chunk)
            cpu_times[name].append((time.process_time() - c0) / chunk)
            losses[name].append(chunk_losses)
            if i == 0:
                rss[f"{name} compiled"] = _peak_rss_mb()
    rss["trained"] = _peak_rss_mb()

    rows = {}
    for name, (guide, svi) in guides.items():
        params = svi.get_params(states[name])
        trace = np.concatenate(losses[name])
        rmse, loglik = _predict(guide, params, data, activation,
                                key=k_pred, num_draws=num_predictive_draws)
        rows[name] = {
            "step_ms": 1e3 * float(np.median(times[name][1:])),
            "step_cpu_ms": 1e3 * float(np.median(cpu_times[name][1:])),
            "setup_s": setup_s[name],
            "final_loss": float(np.mean(trace[-max(steps // 10, 1):])),
            "finite": bool(np.all(np.isfinite(trace))),
            "test_rmse": rmse,
            "test_loglik": loglik,
            "params_mb": _tree_mb(params),
        }
    rss["end"] = _peak_rss_mb()
    livi_guide = guides["AutoLIVI"][0]
    result = {
        "backend": jax.default_backend(),
        "dataset": data.name,
        "n_train": int(n_train),
        "hidden": tuple(hidden),
        "num_weights": bnn_num_weights(n_features, hidden),
        "latent_dim": int(guides["AutoLIVI"][0].latent_dim),
        "livi_noise_dim": int(livi_guide._noise_dim),
        "livi_generator_shapes": _generator_shapes(livi_guide),
        "steps": steps,
        "batch_size": batch_size,
        "num_particles": num_particles,
        "guides": rows,
        "step_time_ratio": rows["AutoLIVI"]["step_ms"] / rows["AutoNormal"]["step_ms"],
        "step_cpu_time_ratio": rows["AutoLIVI"]["step_cpu_ms"] / rows["AutoNormal"]["step_cpu_ms"],
        "peak_rss_mb": rss,
        "device_peak_mb": _device_peak_mb(),
    }
    if log is not None:
        log(format_livi_table(result))
    return result


def format_livi_table(result: dict) -> str:
    """The benchmark's numbers as a plain-text table."""
    lines = [
        f"LIVI vs AutoNormal on a BNN {result['hidden']} ({result['num_weights']:,} weights, "
        f"latent {result['latent_dim']:,}), {result['dataset']} n={result['n_train']}, "
        f"{result['steps']} steps, batch {result['batch_size']}, "
        f"{result['num_particles']} particle(s), backend {result['backend']}",
        f"LIVI noise dim {result['livi_noise_dim']}, generator shapes "
        f"{result['livi_generator_shapes']}",
        f"{'guide':<12}{'step ms':>10}{'cpu ms':>10}{'setup s':>10}{'final loss':>16}"
        f"{'test RMSE':>11}{'test LL':>10}{'params MiB':>12}",
    ]
    for name, row in result["guides"].items():
        lines.append(
            f"{name:<12}{row['step_ms']:>10.2f}{row['step_cpu_ms']:>10.2f}"
            f"{row['setup_s']:>10.1f}{row['final_loss']:>16.5g}"
            f"{row['test_rmse']:>11.4f}{row['test_loglik']:>10.4f}{row['params_mb']:>12.1f}"
        )
    lines.append(
        f"step time ratio LIVI / AutoNormal: {result['step_time_ratio']:.2f} wall-clock, "
        f"{result['step_cpu_time_ratio']:.2f} process CPU time"
    )
    lines.append("peak RSS (MiB) by stage: " + ", ".join(
        f"{k} {v:.0f}" for k, v in result["peak_rss_mb"].items()))
    if result["device_peak_mb"] is not None:
        lines.append(f"device peak memory: {result['device_peak_mb']:.0f} MiB")
    return "\n".join(lines)
