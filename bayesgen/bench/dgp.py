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

Learning rates: DSVI's 1e-2 (Salimbeni & Deisenroth); 3e-3 for both diffusion guides (their
networks diverge at 1e-2). AutoDBVI ran at 1e-3 for a while, after its fit on yacht split 1
(2 layers, 10k steps) went nonfinite at 3e-3. Start scales driven towards 0 were behind the
failures we traced (bridge round-off, then a 0/0 gradient); with the bridge rewritten and the
scale floored (``AutoDBVI(min_start_scale=1e-3)``) it finishes all 20 yacht splits at 3e-3.
All with cosine decay to a tenth.

Reported per method: test RMSE and test log-likelihood in the target's original units (the
predictive mixture over ``num_samples`` posterior draws), mean and standard error over the
splits, and the fit's wall time. Each row also keeps the final training loss and the learned
likelihood noise variance (standardised units), to tell a fit that under- or over-smooths.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI
from numpyro.primitives import Messenger

from bayesgen.datasets.uci import load_uci
from bayesgen.errors import NonFiniteLossError, check_int, check_model, check_positive
from bayesgen.fit import CHUNK_SIZE, default_loss, default_optimizer, fit
from bayesgen.models.deep_gp import AutoDSVI, DeepGP, deep_gp_predict, deep_gp_regression_metrics

METHODS = ("dsvi", "ddvi", "dbvi")
LEARNING_RATES = {"dsvi": 1e-2, "ddvi": 3e-3, "dbvi": 3e-3}
#: options that go with a method's guide options (``--options``) but set up its fit, not its
#: guide: ``warm_start`` (a method name: start the DeepGP's parameters from that method's fit
#: of the split) and ``freeze_model_params`` (keep them at their start: only the guide fits)
FIT_OPTIONS = ("warm_start", "freeze_model_params")


def make_dgp_guide(method: str, model: DeepGP, **options):
    """The guide a method name stands for, on a :class:`DeepGP`.

    ``dbvi`` takes ``unwhitened_start=True`` for ``start_whitening=model.start_whitening``
    (the start's mean amortised in the unwhitened inducing outputs; a name that fits in the
    bench's JSON options and row logs)."""
    import bayesgen

    if method == "dsvi":
        return AutoDSVI(model, **options)
    if method == "ddvi":
        return bayesgen.AutoDDVI(model, **options)
    if method == "dbvi":
        options = dict(options)
        if options.pop("unwhitened_start", False):  # JSON-friendly name of the callables
            options["start_whitening"] = model.start_whitening
        return bayesgen.AutoDBVI(model, **{"context": model.start_context, **options})
    raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")


def run_dgp_split(dataset, split, num_layers, method, *, steps=5000, learning_rate=None,
                  batch_size=256, num_inducing=100, num_samples=100, seed=0,
                  guide_options=None, clip_norm=None, checkpoint=None, checkpoint_every=None,
                  resume=False):
    """Fit one method on one split; returns a result row (dict).

    ``clip_norm``: clip the gradient's global norm to this before Adam (``None``: no
    clipping, the study's default). A gradient whose square overflows float32 (|g| above
    1.8e19) breaks Adam's second moment; clipping is the usual remedy.

    ``checkpoint``, ``checkpoint_every``: write the fit's state there every so many steps
    (:func:`~bayesgen.fit.fit`); with ``resume=True`` and the file present the fit goes on
    from it. At a multiple of the fit's chunk (100 steps) the chunks are those of a fit
    without checkpoints, so the row is the one an uninterrupted fit gives; its ``wall_s``
    then adds the earlier calls' fitting time and ``resumed_at_step`` says where it went on.

    Two options in ``guide_options`` set up the fit rather than the guide (:data:`FIT_OPTIONS`):
    ``warm_start="dsvi"`` first fits that method on the split with its own learning rate and
    guide (the fit of its row in the study: same steps, minibatch, inducing points, seed and
    clipping) and starts this fit's DeepGP parameters (inducing inputs, kernel parameters,
    noise) from its result (``DeepGP(param_init=...)``; the row's ``warm_start_wall_s`` is
    that fit's time, not in ``wall_s``; a resumed fit repeats it, the guide's start depends
    on it);
    ``freeze_model_params=True`` keeps the DeepGP parameters at their start, so that only the
    guide is fitted (the guide's posterior at given hyperparameters).
    """
    settings = run_settings(method, steps=steps, learning_rate=learning_rate,
                            batch_size=batch_size, num_inducing=num_inducing,
                            num_samples=num_samples, seed=seed, guide_options=guide_options,
                            clip_norm=clip_norm)
    fit_options = _fit_options(method, settings["guide_options"])
    param_init, warm_wall = None, None
    if fit_options.get("warm_start") is not None:
        t0 = time.perf_counter()
        source = run_settings(fit_options["warm_start"], steps=steps, batch_size=batch_size,
                              num_inducing=num_inducing, num_samples=num_samples, seed=seed,
                              clip_norm=clip_norm)
        param_init = _fitted_model_params(dataset, split, num_layers,
                                          fit_options["warm_start"], source)
        warm_wall = time.perf_counter() - t0
    data, model, guide, batch = _split_setup(dataset, split, num_layers, method, settings,
                                             param_init=param_init)
    optimizer = _optimizer(settings, frozen=model.param_names
                           if fit_options.get("freeze_model_params") else ())
    go_on = resume and checkpoint is not None and os.path.exists(checkpoint)
    t0 = time.perf_counter()
    result = _fit_split(data, model, guide, batch, settings, optimizer, checkpoint=checkpoint,
                        checkpoint_every=checkpoint_every if checkpoint is not None else None,
                        resume=checkpoint if go_on else None)
    wall = time.perf_counter() - t0 + result.restored_wall_time
    row = _result_row(dataset, split, num_layers, method, data, model, result, wall, settings)
    if result.resumed_at_step:
        row["resumed_at_step"] = result.resumed_at_step
    if warm_wall is not None:
        row["warm_start_wall_s"] = warm_wall
    return row


def _fit_options(method, guide_options):
    """The :data:`FIT_OPTIONS` among a method's guide options, checked."""
    out = {k: guide_options[k] for k in FIT_OPTIONS if k in guide_options}
    source = out.get("warm_start")
    if source is not None and (source not in METHODS or source == method):
        raise ValueError(f"warm_start of {method} must name another method "
                         f"({', '.join(m for m in METHODS if m != method)}), got {source!r}")
    if not isinstance(out.get("freeze_model_params", False), bool):
        raise ValueError("freeze_model_params must be true or false, got "
                         f"{out['freeze_model_params']!r}")
    return out


def _fitted_model_params(dataset, split, num_layers, method, settings):
    """The DeepGP parameters ``method``'s fit of the split ends at (``settings``: its
    :func:`run_settings`), for a warm start."""
    data, model, guide, batch = _split_setup(dataset, split, num_layers, method, settings)
    result = _fit_split(data, model, guide, batch, settings, _optimizer(settings))
    return {k: np.asarray(result.params[k]) for k in model.param_names}


def _fit_split(data, model, guide, batch, settings, optimizer, **fit_options):
    """:func:`~bayesgen.fit.fit` on a split's training rows with the row's steps and seed."""
    return fit(model, guide, data.x_train, data.y_train, steps=settings["steps"],
               optimizer=optimizer, progress_bar=False, seed=settings["seed"],
               batch_size=batch, **fit_options)


def _split_setup(dataset, split, num_layers, method, settings, param_init=None,
                 **guide_overrides):
    """The split's data, its DeepGP (parameters started at ``param_init`` where given) and
    guide, and the minibatch size (``None``: all rows)."""
    data = load_uci(dataset, split)
    n = data.x_train.shape[0]
    model = DeepGP(data.x_train, num_layers=num_layers,
                   num_inducing=min(settings["inducing"], n), param_init=param_init,
                   seed=settings["seed"])
    options = {k: v for k, v in settings["guide_options"].items() if k not in FIT_OPTIONS}
    guide = make_dgp_guide(method, model, **{**options, **guide_overrides})
    batch = settings["batch"]
    return data, model, guide, None if batch is None or batch >= n else batch


def _optimizer(settings, frozen=()):
    """Adam with cosine decay at the method's rate (clipped where ``clip_norm``); the params
    named in ``frozen`` get no updates."""
    optimizer = default_optimizer(settings["steps"], settings["lr"])
    if settings["clip_norm"] is not None:
        optimizer = optax.chain(optax.clip_by_global_norm(settings["clip_norm"]), optimizer)
    if frozen:
        frozen = set(frozen)
        optimizer = optax.multi_transform(
            {"fit": optimizer, "frozen": optax.set_to_zero()},
            lambda params: {k: "frozen" if k in frozen else "fit" for k in params})
    return optimizer


def _result_row(dataset, split, num_layers, method, data, model, result, wall, settings):
    """Test RMSE and log-likelihood of a fitted split, with the training summary."""
    seed = settings["seed"]
    draws = result.sample(jax.random.key(seed + 1), num_samples=settings["samples"])
    pred = deep_gp_predict(model, draws, result.params, data.x_test,
                           rng_key=jax.random.key(seed + 2))
    rmse, loglik = deep_gp_regression_metrics(pred, jnp.asarray(data.y_test),
                                              y_scale=float(data.y_std))
    tail = np.asarray(result.losses)[-max(1, settings["steps"] // 10):]
    row = {"dataset": dataset, "split": split, "layers": num_layers, "method": method,
           "rmse": float(rmse), "test_ll": float(loglik), "final_loss": float(tail.mean()),
           "noise_variance": float(result.params["noise_variance"]),
           "wall_s": wall, **settings}
    if getattr(result.guide, "max_correction", None) is not None:
        # a correction stuck at its bound has no gradient left (AutoDDVI.correction_saturation)
        row["correction_saturation"] = result.guide.correction_saturation(result.params,
                                                                          seed=seed + 3)
    return row


@contextlib.contextmanager
def _split_constants(model, guide, constants):
    """Run the template ``model`` and ``guide`` with one split's constants in place.

    What a split's DeepGP and guide hold outside the SVI state: the mean functions' weights
    (from the split's training inputs) and a preconditioned guide's pathfinder start.
    Inside a traced function these are the vmapped split's values (tracers); they are put
    back on exit.
    """
    saved = model.mean_weights, getattr(guide, "preconditioner", None)
    model.mean_weights = constants["mean_weights"]
    if "preconditioner" in constants:
        guide.preconditioner = constants["preconditioner"]
    try:
        yield
    finally:
        model.mean_weights = saved[0]
        if "preconditioner" in constants:
            guide.preconditioner = saved[1]


def _constants(model, guide):
    out = {"mean_weights": tuple(jnp.asarray(w) for w in model.mean_weights)}
    if getattr(guide, "preconditioner", None) is not None:
        out["preconditioner"] = tuple(jnp.asarray(a) for a in guide.preconditioner)
    return out


def run_dgp_splits(dataset, splits, num_layers, method, *, steps=5000, learning_rate=None,
                   batch_size=256, num_inducing=100, num_samples=100, seed=0,
                   guide_options=None, clip_norm=None, chunk_size=1000, log=print):
    """Fit one method on several splits of a dataset at once; returns their rows.

    The splits' fits are the fits :func:`run_dgp_split` makes (same set-up, seed, keys and
    optimiser, so the same rows up to float round-off), run as one ``jax.vmap`` over the
    splits inside one jitted ``lax.scan`` of SVI steps: on a GPU, where one small deep GP
    leaves the device mostly idle, K splits cost about one. (On a CPU core they cost K:
    measured on concrete, 2 layers, 4 splits vmapped took 6.1 ms a step a split for DSVI
    against 6.1 alone, 30 against 24 for AutoDDVI.) Each split is set up on its own (its
    DeepGP, its guide's pathfinder start, ``svi.init``); one split's model and guide then
    serve as the template of the step, run with each split's constants
    (:func:`_split_constants`). The splits must have the same number of training rows (the
    standard splits of one dataset do). The set-up is shared where it can be: the diffusion
    guides' pathfinder searches run as one compiled function (:func:`_pathfinder_starts`)
    and the DeepGPs' jitted propagation is cached by the models' structure, so the splits
    after the first cost no compilation there.

    "Up to round-off": the same arithmetic in another order (a vmapped step, another
    device) gives the same fit for the first steps (60 steps: metrics equal to 1e-6) but
    the fits are chaotic in round-off, so over 10k steps the rows are equally good fits of
    the same procedure rather than copies.

    A split whose loss or state turns nonfinite is dropped from the batch's results and
    fitted again alone with :func:`run_dgp_split`, which names the site or parameter when it
    fails there too (its row then records the failure, as the study does). ``wall_s`` of
    each row is the batch's fitting time divided by the number of splits; ``batched`` says
    how many splits shared it.
    """
    from numpyro.optim import optax_to_numpyro

    from bayesgen.fit import FitResult

    splits = [int(i) for i in splits]
    if not splits:
        raise ValueError("splits is empty; pass the split indices to fit")
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits has repeats: {splits}")
    check_positive("chunk_size", chunk_size)
    split_kwargs = {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
                    "num_inducing": num_inducing, "num_samples": num_samples, "seed": seed,
                    "guide_options": guide_options, "clip_norm": clip_norm}
    settings = run_settings(method, **split_kwargs)
    fit_options = sorted(set(FIT_OPTIONS) & set(settings["guide_options"]))
    if fit_options:
        raise ValueError(f"{', '.join(fit_options)} (options of {method}) need fits one at a "
                         "time (run_dgp_split); drop batch_splits to use them")
    optimizer = optax_to_numpyro(_optimizer(settings))
    # the diffusion guides' pathfinder starts: one vmapped search after the set-ups, not one
    # compilation a split (the search closes over its split's data and parameters)
    shared_start = (method != "dsvi"
                    and settings["guide_options"].get("init_scale", "pathfinder") == "pathfinder")
    overrides = {"init_scale": None} if shared_start else {}
    setups, states = [], []
    for split in splits:
        data, model, guide, batch = _split_setup(dataset, split, num_layers, method, settings,
                                                 **overrides)
        check_model(model, (data.x_train, data.y_train), {"batch_size": batch})
        svi = SVI(model, guide, optimizer, default_loss(guide))
        states.append(svi.init(jax.random.PRNGKey(seed), data.x_train, data.y_train,
                               batch_size=batch))
        setups.append((data, model, guide, svi, batch))
    shapes = {np.shape(s[0].x_train) for s in setups}
    if len(shapes) > 1:
        raise ValueError(f"the splits of {dataset} have training inputs of shapes "
                         f"{sorted(shapes)}; only splits of one size can be fitted together")
    _, model0, guide0, svi0, batch = setups[0]
    if shared_start:
        locs, scales = _pathfinder_starts(setups, batch)
        for k, (_, _, guide, _, _) in enumerate(setups):
            guide.init_scale = "pathfinder"  # what it stands for now
            guide.preconditioner = (locs[k], scales[k])
    stack = lambda *a: jnp.stack(a)  # noqa: E731
    state = jax.tree.map(stack, *states)
    consts = jax.tree.map(stack, *[_constants(s[1], s[2]) for s in setups])
    xs = jnp.stack([jnp.asarray(s[0].x_train) for s in setups])
    ys = jnp.stack([jnp.asarray(s[0].y_train) for s in setups])

    def one_split(state, x, y, constants, n):
        def body(s, _):
            with _split_constants(model0, guide0, constants):
                return svi0.update(s, x, y, batch_size=batch)

        return jax.lax.scan(body, state, None, length=n)

    runners = {}

    def run_chunk(state, n):
        if n not in runners:
            runners[n] = jax.jit(jax.vmap(lambda s, x, y, c: one_split(s, x, y, c, n)))
        return runners[n](state, xs, ys, consts)

    ok = np.ones(len(splits), bool)
    losses = []
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        n = min(int(chunk_size), steps - done)
        state, chunk = run_chunk(state, n)
        chunk = np.asarray(jax.device_get(chunk))  # (K, n)
        ok &= np.isfinite(chunk).all(axis=1) & np.asarray(_finite_per_split(state.optim_state))
        losses.append(chunk)
        done += n
    jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / len(splits)
    losses = np.concatenate(losses, axis=1)
    rows = []
    for k, (split, (data, model, guide, svi, _)) in enumerate(zip(splits, setups, strict=True)):
        if not ok[k]:
            log(f"[bench-dgp] {dataset} L={num_layers} split {split} {method}: nonfinite in "
                "the batch; fitting it alone")
            try:
                rows.append(run_dgp_split(dataset, split, num_layers, method, **split_kwargs))
            except NonFiniteLossError as err:
                rows.append(_failed_row(dataset, split, num_layers, method, settings, err))
            continue
        state_k = jax.tree.map(lambda a, k=k: a[k], state)
        result = FitResult(model=model, guide=guide, params=svi.get_params(state_k),
                           losses=losses[k], args=(data.x_train, data.y_train),
                           kwargs={"batch_size": batch}, steps=steps, wall_time=wall,
                           svi_state=state_k, svi=svi, seed=seed)
        rows.append({**_result_row(dataset, split, num_layers, method, data, model, result,
                                   wall, settings), "batched": len(splits)})
    return rows


class _DefaultKey(Messenger):
    """A ``prng_key`` site nobody seeded gets ``key(0)``: what numpyro's ``initialize_model``
    adds to the model its potential evaluates (so the minibatch is the same here)."""

    def process_message(self, msg):
        if msg["type"] == "prng_key" and msg["value"] is None:
            msg["value"] = jax.random.key(0)


def _pathfinder_starts(setups, batch):
    """Each split's pathfinder start (:func:`bayesgen.init.find_preconditioner`): the search
    a guide runs at set-up, on that split's potential (its data, initial parameters, mean
    functions, initial point and key), compiled once for all the splits rather than once a
    split. ``setups``: per split ``(data, model, guide, svi, batch)``, guides set up with
    ``init_scale=None``.

    One search a split, not a vmap over them: the search is chaotic in round-off (on yacht,
    2 layers, moving the initial point by 1e-6 moved the start's location by 0.74 and its
    chosen iterate from 79 to 41), and a vmapped search differs from the guide's own by
    round-off, so it would not give the split the start its one-at-a-time fit gets."""
    from numpyro.handlers import block, substitute
    from numpyro.infer.util import potential_energy

    from bayesgen.init import find_preconditioner

    model0, guide0 = setups[0][1], setups[0][2]

    def inputs(data, model, guide):
        params = {k: site["value"] for k, site in guide.prototype_trace.items()
                  if site["type"] in ("param", "mutable")}
        return (guide._init_latent, guide._preconditioner_key, params,
                jnp.asarray(data.x_train), jnp.asarray(data.y_train),
                tuple(jnp.asarray(w) for w in model.mean_weights))

    def one(x0, key, params, x, y, mean_weights):
        # as at set-up: under ``block``, which asks the stack for the minibatch's key, and the
        # default key answers (so the minibatch does not depend on the split or the seed)
        with _split_constants(model0, guide0, {"mean_weights": mean_weights}), block():
            model = _DefaultKey(substitute(model0, data=params))

            def potential(z):
                return potential_energy(model, (x, y), {"batch_size": batch},
                                        guide0._unpack_latent(z))

            pre = find_preconditioner(potential, x0, key, num_steps=guide0.init_steps,
                                      dense=guide0._dense(), **guide0.init_options)
        return pre.loc, pre.scale

    search = jax.jit(one)  # compiled once: the split's data and parameters are arguments
    starts = [search(*inputs(*s[:3])) for s in setups]
    return [loc for loc, _ in starts], [scale for _, scale in starts]


def _failed_row(dataset, split, num_layers, method, settings, err):
    """The row of a fit that raised :class:`NonFiniteLossError` (``settings``: the row's)."""
    return {"dataset": dataset, "split": split, "layers": num_layers, "method": method,
            "failed": str(err).split(". ")[0], "nonfinite_sites": err.sites,
            "nonfinite_params": err.params, "nonfinite_gradients": err.gradients, **settings}


@jax.jit
def _finite_per_split(tree):
    """(K,) booleans: is every floating leaf of split k's slice of ``tree`` finite?"""
    leaves = [jnp.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
              for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return jnp.stack(leaves).all(axis=0)


def run_settings(method, *, steps=5000, learning_rate=None, batch_size=256, num_inducing=100,
                 num_samples=100, seed=0, guide_options=None, clip_norm=None):
    """The settings that make two rows of one (dataset, layers, split, method) comparable.

    Stored in every row, so a row log (``rows.jsonl``) can be resumed or merged only with
    rows fitted the same way.
    """
    return {"steps": int(steps), "lr": float(learning_rate or LEARNING_RATES[method]),
            "batch": None if batch_size is None else int(batch_size),
            "inducing": int(num_inducing), "samples": int(num_samples), "seed": int(seed),
            "guide_options": dict(guide_options or {}),
            "clip_norm": None if clip_norm is None else float(clip_norm)}


#: rows from before a key existed read it as None, the setting's default
_SETTING_KEYS = ("steps", "lr", "batch", "inducing", "samples", "seed", "guide_options",
                 "clip_norm")


def row_key(row):
    """What identifies one fit: the cell, the split and the settings."""
    return (row["dataset"], int(row["layers"]), row["method"], int(row["split"]),
            tuple((k, json.dumps(row.get(k), sort_keys=True)) for k in _SETTING_KEYS))


def fit_checkpoint_path(folder, row):
    """Where the study keeps the checkpoint of the fit a row (or its key fields) names.

    One file per :func:`row_key` (the settings enter as a short digest), so a variant never
    resumes another's fit: ``<folder>/<dataset>-L<layers>-split<k>-<method>-<digest>.ckpt``.
    """
    digest = hashlib.sha1(json.dumps(row_key(row)).encode()).hexdigest()[:12]
    name = f"{row['dataset']}-L{row['layers']}-split{row['split']}-{row['method']}-{digest}"
    return os.path.join(folder, name + ".ckpt")


def method_label(row):
    """The method of a row, with its guide options and gradient clipping when it has any:
    ``'dbvi'``, ``'dbvi {"log_snr_min": -10.0}'``, ``'dbvi clip=10'``. Tables and pairings
    keep such variants apart."""
    opts = row.get("guide_options") or {}
    label = row["method"] + (f" {json.dumps(opts, sort_keys=True)}" if opts else "")
    clip = row.get("clip_norm")
    return label + (f" clip={clip:g}" if clip is not None else "")


def read_rows(paths):
    """Rows from ``rows.jsonl`` logs (one JSON object a line), in order, without repeats.

    A later row with the same :func:`row_key` replaces an earlier one (a re-run of that
    fit). A line that does not parse, such as one cut short when a run was killed mid-write,
    raises with the file and line number.
    """
    rows = {}
    for path in paths:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno} is not a JSON row ({err.msg}); delete "
                                     "that line and resume to re-run its fit") from None
                rows[row_key(row)] = row
    return list(rows.values())


def write_rows(rows, path):
    """Write ``rows`` to the JSON-lines file ``path`` (replacing it) in a stable order: by
    dataset, depth, split, method (in :data:`METHODS` order), guide options and clipping
    (the rows without either first). With :func:`read_rows` this merges the logs of a study
    shared out over processes or sessions into the one log a cell ships with (``bayesgen
    bench-dgp --from-rows ... --write-rows PATH``)."""
    def order(row):
        method = METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS)
        clip, options = row.get("clip_norm"), row.get("guide_options") or {}
        return (row["dataset"], int(row["layers"]), int(row["split"]), method, row["method"],
                bool(options), json.dumps(options, sort_keys=True), clip is not None,
                clip or 0.0)

    rows = sorted(rows, key=order)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)  # a kill mid-write leaves the old file, not half of the new one
    return rows


def dgp_uci_study(datasets, layers=(2,), methods=METHODS, *, num_splits=None, split_ids=None,
                  log=print, rows_path=None, resume=False, method_options=None,
                  batch_splits=False, checkpoint_every=1000, **options):
    """Every method, depth and split; returns the per-split rows.

    ``num_splits`` runs the first N splits of each dataset (default all); ``split_ids`` runs
    the listed split indices instead (to finish or share out a study), not both.

    ``rows_path``: append each row to this JSON-lines file as soon as its fit ends, so a
    study that is stopped loses at most the fit in progress (its steps since its last
    checkpoint, with ``checkpoint_every``). With ``resume=True`` the fits
    already finished in that file with the same settings (:func:`row_key`) are not run
    again; their rows are returned with the new ones. Failed fits are run again (after a
    fix, say); the new row replaces the failed one in :func:`read_rows`. A study split over
    processes or sessions (``split_ids``) is put together with :func:`read_rows` and
    :func:`summarise`.

    ``method_options``: ``{method: guide options}`` for :func:`make_dgp_guide`, e.g.
    ``{"dbvi": {"log_snr_min": -10.0}}`` (stored in each row; tables label the variant).

    ``checkpoint_every``: with ``rows_path``, each one-at-a-time fit also checkpoints its
    state every so many steps into ``checkpoints/`` beside the row log
    (:func:`fit_checkpoint_path`), and a resumed study goes on from the checkpoint of the
    fit that was in progress, so a stop loses at most that many steps. The checkpoint is
    deleted once the fit's row is logged. A multiple of 100 (the fit's chunk), so the rows
    are the uninterrupted fits'; ``None`` or 0: no checkpoints.

    ``batch_splits=True`` fits the splits of each (dataset, layers, method) together
    (:func:`run_dgp_splits`, one vmapped fit; for a GPU, without checkpoints); their rows
    are the rows the one-at-a-time fits give up to round-off, so both kinds resume and
    merge alike.
    """
    from bayesgen.datasets.uci import uci_splits

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    if num_splits is not None and split_ids is not None:
        raise ValueError("pass num_splits (the first N splits) or split_ids, not both")
    if resume and rows_path is None:
        raise ValueError("resume=True needs rows_path, the row log to resume from")
    check_positive("clip_norm", options.get("clip_norm"), allow_none=True)
    check_int("checkpoint_every", checkpoint_every, minimum=0, allow_none=True)
    if checkpoint_every and checkpoint_every % CHUNK_SIZE:
        raise ValueError(f"checkpoint_every must be a positive multiple of {CHUNK_SIZE} (the "
                         f"fit's chunk) or 0 for none, got {checkpoint_every!r}")
    checkpoints = None
    if checkpoint_every and rows_path is not None:
        checkpoints = os.path.join(os.path.dirname(rows_path) or ".", "checkpoints")
    method_options = method_options or {}
    if not (isinstance(method_options, dict)
            and all(isinstance(v, dict) for v in method_options.values())):
        raise ValueError("method_options must be a dict {method: {option: value}}, got "
                         f"{method_options!r}")
    unknown = sorted(set(method_options) - set(methods))
    if unknown:
        raise ValueError(f"method_options names methods not in methods: {', '.join(unknown)}")
    if method_options and options.get("guide_options"):
        raise ValueError("pass guide_options (every method) or method_options, not both")
    done = {}
    if resume and os.path.exists(rows_path):
        done = {row_key(r): r for r in read_rows([rows_path]) if "failed" not in r}
    rows = []

    def record(row):
        rows.append(row)
        if rows_path is not None:
            with open(rows_path, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")

    common = {k: options[k] for k in ("steps", "learning_rate", "batch_size", "num_inducing",
                                      "num_samples", "seed", "guide_options", "clip_norm")
              if k in options}

    def method_settings(method):
        settings = dict(common)
        if method in method_options:
            settings["guide_options"] = method_options[method]
        return settings

    def fit_fields(dataset, num_layers, method, split, settings):
        """The fields of a row that identify its fit (:func:`row_key`)."""
        return {"dataset": dataset, "layers": num_layers, "method": method, "split": split,
                **run_settings(method, **settings)}

    def reuse(dataset, num_layers, method, split, settings):
        """Is this fit in the resumed row log? (Then its row is kept and logged.)"""
        key = row_key(fit_fields(dataset, num_layers, method, split, settings))
        if key not in done:
            return False
        log(f"[bench-dgp] {dataset} L={num_layers} split {split} {method}: "
            f"in {rows_path} already")
        rows.append(done[key])
        return True

    def report(row):
        head = f"[bench-dgp] {row['dataset']} L={row['layers']} split {row['split']} "
        if "failed" in row:
            where = ", ".join(row["nonfinite_sites"] + row["nonfinite_params"] + [
                f"gradient of {g}" for g in row["nonfinite_gradients"]]) or "no site named"
            log(head + f"{method_label(row)}: FAILED ({row['failed']}; nonfinite: {where})")
        else:
            stuck = ("" if "correction_saturation" not in row else
                     f", correction at its bound: {row['correction_saturation']:.0%}")
            log(head + f"{method_label(row)}: RMSE {_value(row['rmse'])}, "
                f"test LL {_value(row['test_ll'])}, {row['wall_s']:.0f} s{stuck}")
        record(row)

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
            if batch_splits:
                for method in methods:
                    settings = method_settings(method)
                    todo = [split for split in splits
                            if not reuse(dataset, num_layers, method, split, settings)]
                    if todo:
                        for row in run_dgp_splits(dataset, todo, num_layers, method, log=log,
                                                  **{**options, **settings}):
                            report(row)
                continue
            for split in splits:
                for method in methods:
                    settings = method_settings(method)
                    if reuse(dataset, num_layers, method, split, settings):
                        continue
                    ckpt = None
                    if checkpoints is not None:
                        ckpt = fit_checkpoint_path(checkpoints, fit_fields(
                            dataset, num_layers, method, split, settings))
                    try:
                        row = run_dgp_split(dataset, split, num_layers, method,
                                            checkpoint=ckpt, checkpoint_every=checkpoint_every,
                                            resume=resume, **{**options, **settings})
                    except NonFiniteLossError as err:  # one diverged fit: count it, go on
                        row = _failed_row(dataset, split, num_layers, method,
                                          run_settings(method, **settings), err)
                    report(row)
                    if ckpt is not None and os.path.exists(ckpt):
                        os.remove(ckpt)  # the row holds the fit now (a failed one re-runs)
    return rows


def summarise(rows):
    """Mean and standard error over the finished splits per (dataset, layers, method, steps, lr);
    a method's variants with guide options or clipping (:func:`method_label`) are separate.

    Splits whose fit failed (rows with ``"failed"``) are counted in ``failed``, not averaged.
    Rows fitted with other steps or learning rates form their own groups. ``noise_variance``
    is the median over the splits of the learned likelihood noise (standardised units; nan
    for rows from before it was recorded).
    """
    groups = {}
    for r in rows:
        key = (r["dataset"], r["layers"], method_label(r), r.get("steps"), r.get("lr"))
        groups.setdefault(key, []).append(r)
    out = []
    for (dataset, layers, method, steps, lr), all_rs in groups.items():
        rs = [r for r in all_rs if "failed" not in r]
        failed = len(all_rs) - len(rs)
        head = {"dataset": dataset, "layers": layers, "method": method, "steps": steps,
                "lr": lr, "splits": len(rs), "failed": failed}
        if not rs:
            nan = (float("nan"), float("nan"))
            out.append({**head, "rmse": nan, "test_ll": nan, "wall_s": float("nan")})
            continue

        def mse(key, rs=rs):
            v = np.array([r[key] for r in rs])
            se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            return float(v.mean()), float(se)

        noise = [r["noise_variance"] for r in rs if "noise_variance" in r]
        out.append({**head, "rmse": mse("rmse"), "test_ll": mse("test_ll"),
                    "wall_s": float(np.mean([r["wall_s"] for r in rs])),
                    "noise_variance": float(np.median(noise)) if noise else float("nan")})
    return out


#: the published claims the study checks: (better, worse) = "better beats worse".
CLAIMS = (("ddvi", "dsvi"), ("dbvi", "ddvi"))


def paired_differences(rows, pairs=CLAIMS):
    """Per (dataset, layers) and claim ``(a, b)``: ``a - b`` over the splits both finished.

    Returns rows with the mean and standard error of the RMSE and test-LL differences and
    how many splits ``a`` won on each (lower RMSE, higher LL). Pairing by split removes the
    split-to-split spread that dominates the unpaired standard errors. Rows are paired
    within one learning rate per method as given: pass rows of one setting per method.
    Variants with guide options or clipping (:func:`method_label`) are paired as methods of
    their own: each variant of ``a`` against each of ``b``.

    Where both rows carry ``final_loss`` (the training loss, minus the bound, averaged over
    the fit's last tenth), ``bound`` is the median over splits of ``a``'s bound minus
    ``b``'s and ``bound_wins`` the splits where ``a``'s bound is higher: whether the
    objective each guide maximises ranks the methods as the test metrics do. The median,
    because one loss spike in the last tenth (3e5 nats on one concrete AutoDBVI fit whose
    test metrics were ordinary) swamps a mean.

    Where both carry ``noise_variance`` (the learned likelihood noise), ``noise_ratio`` is
    the median over splits of ``a``'s over ``b``'s and ``noise_lower`` the splits where
    ``a``'s is lower: a guide that leaves more of the data to the noise predicts wider.
    """
    cells, base = {}, {}
    for r in rows:
        if "failed" not in r:
            label = method_label(r)
            base[label] = r["method"]
            cells.setdefault((r["dataset"], r["layers"]), {}).setdefault(label, {})[
                r["split"]] = r
    out = []
    for (dataset, layers), by_method in cells.items():
        for method_a, method_b in pairs:
            for a in [x for x in by_method if base[x] == method_a]:
                for b in [x for x in by_method if base[x] == method_b]:
                    row = _paired_row(dataset, layers, a, b, by_method)
                    if row is not None:
                        out.append(row)
    return out


def _paired_row(dataset, layers, a, b, by_method):
    """The paired row of ``a - b`` over the splits both finished (``None`` if none)."""
    splits = sorted(set(by_method[a]) & set(by_method[b]))
    if not splits:
        return None
    row = {"dataset": dataset, "layers": layers, "claim": f"{a} - {b}", "splits": len(splits)}
    for key, better in (("rmse", np.less), ("test_ll", np.greater)):
        va = np.array([by_method[a][i][key] for i in splits])
        vb = np.array([by_method[b][i][key] for i in splits])
        diff = va - vb
        se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        row[key] = (float(diff.mean()), float(se))
        row[f"{key}_wins"] = int(better(va, vb).sum())
    if all("final_loss" in by_method[m][i] for m in (a, b) for i in splits):
        bound = np.array([by_method[b][i]["final_loss"] - by_method[a][i]["final_loss"]
                          for i in splits])
        row["bound"] = float(np.median(bound))
        row["bound_wins"] = int((bound > 0).sum())
    if all("noise_variance" in by_method[m][i] for m in (a, b) for i in splits):
        na = np.array([by_method[a][i]["noise_variance"] for i in splits])
        nb = np.array([by_method[b][i]["noise_variance"] for i in splits])
        row["noise_ratio"] = float(np.median(na / nb))
        row["noise_lower"] = int((na < nb).sum())
    return row


def _decimals(*values):
    """Decimals to print ``values`` with: 3, or enough for two significant digits of the
    smallest nonzero magnitude below 1e-3 (naval's test RMSE is about 2e-4 in its units)."""
    out = 3
    for v in values:
        m = abs(float(v))
        if 0 < m < 1e-3:  # nan and inf fail the comparison
            out = max(out, min(10, 1 - math.floor(math.log10(m))))
    return out


def _mean_se(pair, signed=False):
    """``mean ± se`` at :func:`_decimals` of both."""
    d = _decimals(*pair)
    sign = "+" if signed else ""
    return f"{pair[0]:{sign}.{d}f} ± {pair[1]:.{d}f}"


def _value(v):
    return f"{v:.{_decimals(v)}f}"


def format_paired_table(paired):
    lines = ["| dataset | layers | difference | splits | RMSE diff | lower RMSE on | LL diff | "
             "higher LL on | training bound diff (median) | higher bound on | "
             "noise variance ratio (median) | lower noise on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in paired:
        bound = (f"{p['bound']:+.1f} | {p['bound_wins']}" if "bound" in p else " | ")
        noise = (f"{p['noise_ratio']:.2f} | {p['noise_lower']}" if "noise_ratio" in p
                 else " | ")
        lines.append(
            f"| {p['dataset']} | {p['layers']} | {p['claim']} | {p['splits']} | "
            f"{_mean_se(p['rmse'], signed=True)} | {p['rmse_wins']} | "
            f"{_mean_se(p['test_ll'], signed=True)} | {p['test_ll_wins']} | {bound} | "
            f"{noise} |")
    return "\n".join(lines)


def format_dgp_table(summary):
    lines = ["| dataset | layers | method | steps | lr | splits | test RMSE | test LL | fit s | "
             "noise variance (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        splits = f"{s['splits']} ({s['failed']} failed)" if s.get("failed") else f"{s['splits']}"
        steps = "" if s.get("steps") is None else f"{s['steps']}"
        lr = "" if s.get("lr") is None else f"{s['lr']:g}"
        lines.append(
            f"| {s['dataset']} | {s['layers']} | {s['method']} | {steps} | {lr} | {splits} | "
            f"{_mean_se(s['rmse'])} | {_mean_se(s['test_ll'])} | {s['wall_s']:.0f} | "
            f"{s.get('noise_variance', float('nan')):.3g} |")
    return "\n".join(lines)


def _method_order(label):
    """Sort key of a :func:`method_label`: the study's method order, then the variant."""
    method = label.split()[0]
    return (METHODS.index(method) if method in METHODS else len(METHODS), label)


def format_split_table(rows):
    """Per (dataset, layers): one line a split, ``RMSE / test LL`` of each method (variants
    with guide options or clipping as their own columns, :func:`method_label`), ``failed``
    for a fit that diverged and a blank where that fit was not run; a bounded diffusion
    guide's fit with 1% or more of its correction at the bound says how much (a fit that
    has lost that gradient, :meth:`~bayesgen.guides.AutoDDVI.correction_saturation`). The
    tables above are means over these lines; this is where one bad split shows."""
    cells = {}
    for r in rows:
        cell = cells.setdefault((r["dataset"], r["layers"]), {})
        cell.setdefault(r["split"], {})[method_label(r)] = r
    blocks = []
    for (dataset, layers), by_split in cells.items():
        labels = sorted({m for s in by_split.values() for m in s}, key=_method_order)
        lines = [f"{dataset}, {layers} layers:", "",
                 "| split | " + " | ".join(f"{m} RMSE / LL" for m in labels) + " |",
                 "|---|" + "---|" * len(labels)]
        for split in sorted(by_split):
            cols = []
            for m in labels:
                r = by_split[split].get(m)
                cols.append("" if r is None else "failed" if "failed" in r
                            else f"{_value(r['rmse'])} / {_value(r['test_ll'])}"
                            + _saturation_note(r))
            lines.append(f"| {split} | " + " | ".join(cols) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _saturation_note(row):
    stuck = row.get("correction_saturation", 0.0)
    return f" (correction at its bound: {stuck:.0%})" if stuck >= 0.01 else ""


#: (label, method, guide options) of ``bayesgen bench-dgp --step-time``: DSVI, and each
#: diffusion guide with the score network's parameter gradient taken per step and batched
STEP_TIME_VARIANTS = (
    ("DSVI", "dsvi", {}),
    ("AutoDDVI, per-step gradient", "ddvi", {"param_grad": "per_step"}),
    ("AutoDDVI, batched gradient", "ddvi", {"param_grad": "batched"}),
    ("AutoDBVI, per-step gradient", "dbvi", {"param_grad": "per_step"}),
    ("AutoDBVI, batched gradient", "dbvi", {"param_grad": "batched"}),
)


def dgp_step_times(dataset, num_layers, variants=STEP_TIME_VARIANTS, *, split=0, steps=50,
                   repeats=5, batch_size=256, num_inducing=100, seed=0):
    """Milliseconds a compiled SVI step of each variant takes on one split of ``dataset``.

    Each variant's update (the study's model, guide, loss and optimiser) is compiled once,
    then timed over ``repeats`` rounds of ``steps`` steps, the variants interleaved within a
    round so that a change of machine load does not favour one; the best round counts.
    Returns one row per variant: label, method, options, latent dimension, ms a step.
    """
    check_int("steps", steps, minimum=1)
    check_int("repeats", repeats, minimum=1)
    timed = []
    for label, method, options in variants:
        settings = run_settings(method, steps=steps * repeats, batch_size=batch_size,
                                num_inducing=num_inducing, seed=seed, guide_options=options)
        data, model, guide, batch = _split_setup(dataset, split, num_layers, method, settings)
        svi = SVI(model, guide, _optimizer(settings), default_loss(guide))
        x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        state = svi.init(jax.random.key(seed), x, y, batch_size=batch)
        update = jax.jit(functools.partial(svi.update, batch_size=batch))
        state = jax.block_until_ready(update(state, x, y))[0]  # compiles
        timed.append([label, method, options, getattr(guide, "latent_dim", None), update,
                      state, (x, y), math.inf])
    for _ in range(repeats):
        for entry in timed:
            update, state, xy = entry[4:7]
            start = time.perf_counter()
            for _ in range(steps):
                state, loss_value = update(state, *xy)
            jax.block_until_ready(loss_value)
            entry[5] = state
            entry[7] = min(entry[7], (time.perf_counter() - start) / steps * 1e3)
    return [{"dataset": dataset, "layers": num_layers, "split": split, "variant": label,
             "method": method, "guide_options": options, "latent_dim": d, "ms_per_step": ms,
             "steps": steps, "repeats": repeats}
            for label, method, options, d, _, _, _, ms in timed]


def format_step_times(rows):
    """Markdown table of :func:`dgp_step_times` rows, with each time as a ratio to the
    first row's of its (dataset, layers)."""
    lines = ["| dataset | layers | variant | latent d | ms / step | vs first |",
             "|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        base = first.setdefault((r["dataset"], r["layers"]), r["ms_per_step"])
        d = "-" if r["latent_dim"] is None else r["latent_dim"]
        lines.append(f"| {r['dataset']} | {r['layers']} | {r['variant']} | {d} | "
                     f"{r['ms_per_step']:.1f} | {r['ms_per_step'] / base:.2f}x |")
    return "\n".join(lines)
