"""Run blackjax kernels on numpyro models: :func:`run` and :class:`MCMCResult`.

The chain lives on the model's flat unconstrained latent (:mod:`bayesgen.mcmc.potential`),
the same vector the variational families use; draws are mapped back to the constrained
sites (and deterministic sites) at the end, and :meth:`MCMCResult.to_arviz` lays them out
exactly as ``arviz.from_numpyro`` lays out ``numpyro.infer.MCMC``.

Kernels by name (options through ``kernel_options``):

* ``"nuts"``, ``"hmc"``: blackjax's NUTS / HMC with its window adaptation (Stan's
  schedule: step size by dual averaging towards ``target_accept``, diagonal or dense mass
  matrix from the warmup draws).
* ``"mala"``: MALA with the same window adaptation, through a mass-matrix MALA kernel
  (:mod:`bayesgen.mcmc.mala`) built on blackjax's; target acceptance 0.574.
* ``"sgld"``, ``"sghmc"``: SG-MCMC with minibatch gradients (blackjax's SGLD; SGHMC with
  a persistent momentum, :mod:`bayesgen.mcmc.sghmc`, friction ``alpha`` default 0.1 / h). The
  minibatch is a fresh uniform draw, without replacement, of the indices of every
  subsampled plate at each step (``batch_size``); numpyro's plate rescales the
  likelihood to the full data. ``step_size`` is a number or a schedule ``t -> h``.
* ``"cyclical_sgld"``, ``"cyclical_sghmc"``: the same with Zhang et al.'s cyclical cosine
  step size h_t = h0/2 (cos(pi (t mod C) / C) + 1): each cycle explores (no injected noise)
  for its first ``exploration`` fraction and samples for the rest; draws come only from
  the sampling stages.
* ``"entropy_sgld"``: Entropy-MCMC (:mod:`bayesgen.mcmc.entropy_mcmc`), returning draws of
  θ and of the guiding variable θ_a (:attr:`MCMCResult.guide_samples`).
* A callable ``logdensity_fn -> blackjax.SamplingAlgorithm`` (e.g.
  ``lambda ld: blackjax.rmh(ld, ...)``): run as given, without adaptation.

Chains run in one compiled program, vectorised (``jax.vmap``; with several devices split
across them with ``jax.sharding``) or, for NUTS and HMC on one device by default, one after
another (``jax.lax.map``: no lock-step, where vmapped trajectories wait for the longest).

References
----------
Hoffman, M. D. and Gelman, A. (2014). The No-U-Turn sampler. *JMLR* 15, 1593-1623.
Welling, M. and Teh, Y. W. (2011). Bayesian learning via stochastic gradient Langevin
dynamics. *ICML*.
Chen, T., Fox, E. and Guestrin, C. (2014). Stochastic gradient Hamiltonian Monte Carlo.
*ICML*.
Zhang, R., Li, C., Zhang, J., Chen, C. and Wilson, A. G. (2020). Cyclical stochastic
gradient MCMC for Bayesian deep learning. *ICLR*.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import blackjax
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from blackjax.base import SamplingAlgorithm

from bayesgen.errors import check_int, check_positive
from bayesgen.mcmc import mala as _mala
from bayesgen.mcmc import sghmc as _sghmc
from bayesgen.mcmc.potential import ModelLogDensity, model_log_density

__all__ = ["KERNELS", "MCMCResult", "run"]

_FULL_BATCH = ("nuts", "hmc", "mala")
_SG = ("sgld", "sghmc", "cyclical_sgld", "cyclical_sghmc", "entropy_sgld")
KERNELS = _FULL_BATCH + _SG

_OPTIONS = {
    "nuts": {"target_accept": 0.8, "max_tree_depth": 10, "dense_mass": False, "initial_step_size": 1.0},
    "hmc": {"target_accept": 0.8, "num_integration_steps": 16, "dense_mass": False,
            "initial_step_size": 1.0},
    "mala": {"target_accept": 0.574, "dense_mass": False, "initial_step_size": 1.0},
    "sgld": {"step_size": None, "temperature": 1.0, "thin": 1},
    "sghmc": {"step_size": None, "temperature": 1.0, "thin": 1, "alpha": None, "beta": 0.0},
    "cyclical_sgld": {"step_size": None, "temperature": 1.0, "num_cycles": 4, "exploration": 0.8},
    "cyclical_sghmc": {"step_size": None, "temperature": 1.0, "num_cycles": 4, "exploration": 0.8,
                       "alpha": None, "beta": 0.0},
    "entropy_sgld": {"step_size": None, "eta": None, "temperature": 1.0, "thin": 1,
                     "num_cycles": None, "exploration": 0.8},
}


@dataclasses.dataclass(eq=False)
class MCMCResult:
    """The outcome of :func:`run`.

    Attributes
    ----------
    samples : dict of str to numpy.ndarray
        Constrained draws of every latent and deterministic site, shape
        ``(num_chains, num_samples, ...)``.
    guide_samples : dict or None
        For ``"entropy_sgld"``: the draws of the guiding variable θ_a, same layout.
    positions : numpy.ndarray
        The flat unconstrained draws, ``(num_chains, num_samples, d)``.
    sample_stats : dict of str to numpy.ndarray
        Per-draw statistics in arviz's names (``lp``, ``acceptance_rate``, ``diverging``,
        ``energy``, ``n_steps``, ``tree_depth``, ``step_size``), ``(num_chains,
        num_samples)``, where the kernel has them.
    kernel : str
        The kernel's name (or ``"custom"``).
    adaptation : dict
        Adapted parameters per chain (``step_size``, ``inverse_mass_matrix``) for the
        adapted kernels.
    wall_time : float
        Seconds for warmup and sampling, compilation included.
    num_grad_evals : int
        Gradient evaluations over all chains, warmup included (minibatch gradients for
        the SG kernels).
    model, args, kwargs
        The model and its arguments; ``model`` is the model as sampled (every subsampled
        plate given all its indices).
    """

    samples: dict
    positions: np.ndarray
    sample_stats: dict
    kernel: str
    adaptation: dict
    wall_time: float
    num_grad_evals: int
    model: Any
    args: tuple
    kwargs: dict
    num_chains: int
    num_samples: int
    guide_samples: dict | None = None
    guide_positions: np.ndarray | None = None

    def __repr__(self):
        div = self.sample_stats.get("diverging")
        extra = f", divergences={int(np.sum(div))}" if div is not None else ""
        return (
            f"MCMCResult(kernel={self.kernel}, chains={self.num_chains}, draws={self.num_samples}, "
            f"wall_time={self.wall_time:.2f}s, grad_evals={self.num_grad_evals}{extra})"
        )

    def get_samples(self, group_by_chain: bool = False) -> dict:
        """Draws by site, ``(chain, draw, ...)`` or flattened to ``(chain * draw, ...)``."""
        if group_by_chain:
            return dict(self.samples)
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.samples.items()}

    def to_arviz(self, *, guide: bool = False, **kwargs):
        """The draws as an arviz ``DataTree`` (the layout of ``arviz.from_numpyro``).

        Parameters
        ----------
        guide : bool, default False
            For ``"entropy_sgld"``: convert the guiding variable θ_a instead of θ.
        **kwargs
            Passed to :func:`bayesgen.diagnostics.arviz.vi_to_datatree` (``coords``,
            ``dims``, ``log_likelihood``, ...).
        """
        from bayesgen.diagnostics.arviz import vi_to_datatree

        if guide and self.guide_samples is None:
            raise ValueError(f"kernel '{self.kernel}' has no guiding variable; guide=True is for 'entropy_sgld'")
        draws = self.guide_samples if guide else self.samples
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}
        stats = {k: v.reshape(-1) for k, v in self.sample_stats.items()}
        attrs = {"inference_method": "mcmc", "kernel": self.kernel, "wall_time": self.wall_time,
                 "num_grad_evals": self.num_grad_evals}
        if guide:
            attrs["variable"] = "guiding variable theta_a"
        attrs.update(kwargs.pop("attrs", {}) or {})
        return vi_to_datatree(
            self.model, flat, self.args, self.kwargs, num_chains=self.num_chains,
            sample_stats=stats or None, attrs=attrs, **kwargs,
        )


# ----------------------------------------------------------------------------- options


def _options(name: str, given: Mapping[str, Any] | None) -> dict:
    opts = dict(_OPTIONS[name])
    given = dict(given or {})
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise ValueError(
            f"kernel_options {unknown} are not options of kernel '{name}'; its options are "
            f"{sorted(opts)}"
        )
    opts.update(given)
    if name in _SG and opts["step_size"] is None:
        raise ValueError(
            f"kernel '{name}' needs kernel_options={{'step_size': ...}}: SG-MCMC has no step-size "
            "adaptation. A stable Langevin step is below 2 / (largest curvature of -log p) (for "
            "SGLD the step is in variance units, about the square of the smallest posterior sd; "
            "for SGHMC about the smallest sd); start small (e.g. 1e-5 for a BNN on 1e4 data "
            "points) and check the draws against a full-batch run. A callable t -> step size "
            "gives a schedule."
        )
    if name == "entropy_sgld" and opts["eta"] is None:
        raise ValueError(
            "kernel 'entropy_sgld' needs kernel_options={'eta': ...}: the variance of the "
            "coupling ||theta - theta_a||^2 / (2 eta) in the units of the full-data log density "
            "(see bayesgen.mcmc.entropy_mcmc for converting the paper's values)."
        )
    for key in ("target_accept", "exploration"):
        if key in opts and not 0.0 < float(opts[key]) < 1.0:
            raise ValueError(f"kernel_options['{key}'] must lie in (0, 1), got {opts[key]!r}")
    return opts


def _schedule(step_size):
    if callable(step_size):
        return step_size
    check_positive("kernel_options['step_size']", step_size)
    value = float(step_size)
    return lambda t: value


# ----------------------------------------------------------------------------- kernels
# Each plan gives per-chain pure functions:
#   warmup(key, position) -> (carry, num_grad_evals)
#   chunk(carry, keys) -> (carry, outputs, num_grad_evals)   one draw (or cycle) per key
# ``outputs`` holds "position" (d,) per draw, optionally "guide" (d,), and stats.


@dataclasses.dataclass
class _Plan:
    warmup: Callable
    chunk: Callable
    adaptation: Callable = lambda carry: {}


def _adapted_plan(name, algorithm, ld: ModelLogDensity, opts, num_warmup):
    extra = {}
    if name == "nuts":
        extra["max_num_doublings"] = int(opts["max_tree_depth"])
    if name == "hmc":
        extra["num_integration_steps"] = int(opts["num_integration_steps"])
    logdensity = ld.logdensity

    def warmup(key, position):
        adapt = blackjax.window_adaptation(
            algorithm,
            logdensity,
            is_mass_matrix_diagonal=not opts["dense_mass"],
            initial_step_size=float(opts["initial_step_size"]),
            target_acceptance_rate=float(opts["target_accept"]),
            adaptation_info_fn=lambda state, info, adapt_state: _grad_count(name, info, extra),
            **extra,
        )
        if num_warmup > 0:
            (state, params), counts = adapt.run(key, position, num_steps=num_warmup)
            params = {k: params[k] for k in ("step_size", "inverse_mass_matrix")}
            grads = jnp.sum(counts)
        else:
            state = algorithm.init(position, logdensity)
            d = position.shape[0]
            params = {
                "step_size": jnp.asarray(float(opts["initial_step_size"])),
                "inverse_mass_matrix": jnp.eye(d) if opts["dense_mass"] else jnp.ones(d),
            }
            grads = jnp.zeros((), jnp.int32)
        return (state, params), grads

    def chunk(carry, keys):
        state, params = carry
        step = algorithm(logdensity, **params, **extra).step

        def body(s, k):
            s, info = step(k, s)
            out = {"position": s.position, "lp": s.logdensity,
                   "acceptance_rate": info.acceptance_rate,
                   "step_size": params["step_size"]}
            if name in ("nuts", "hmc"):
                out["diverging"] = info.is_divergent
                out["energy"] = info.energy
                out["n_steps"] = info.num_integration_steps
            if name == "nuts":
                out["tree_depth"] = info.num_trajectory_expansions
            return s, out

        state, outs = jax.lax.scan(body, state, keys)
        return (state, params), outs, _grad_count(name, outs, extra, summed=True)

    return _Plan(warmup, chunk, adaptation=lambda carry: dict(carry[1]))


def _grad_count(name, info, extra, summed=False):
    if name == "mala":
        n = jnp.ones_like(info["acceptance_rate"] if summed else info.acceptance_rate, jnp.int32)
    else:
        n = info["n_steps"] if summed else info.num_integration_steps
    return jnp.sum(n) if summed else n


def _custom_plan(factory, ld: ModelLogDensity):
    algorithm = factory(ld.logdensity)
    if not isinstance(algorithm, SamplingAlgorithm) and not (
        hasattr(algorithm, "init") and hasattr(algorithm, "step")
    ):
        raise TypeError(
            "a custom kernel must be a callable logdensity_fn -> blackjax SamplingAlgorithm "
            f"(with init and step); it returned {type(algorithm).__name__}"
        )

    def warmup(key, position):
        return algorithm.init(position), jnp.zeros((), jnp.int32)

    def chunk(state, keys):
        def body(s, k):
            s, info = algorithm.step(k, s)
            out = {"position": s.position}
            if hasattr(s, "logdensity"):
                out["lp"] = s.logdensity
            for field, stat in (("acceptance_rate", "acceptance_rate"), ("is_divergent", "diverging"),
                                ("energy", "energy"), ("num_integration_steps", "n_steps")):
                if hasattr(info, field):
                    out[stat] = getattr(info, field)
            return s, out

        state, outs = jax.lax.scan(body, state, keys)
        grads = jnp.sum(outs["n_steps"]) if "n_steps" in outs else jnp.zeros((), jnp.int32)
        return state, outs, grads

    return _Plan(warmup, chunk)


def _batch_sampler(ld: ModelLogDensity, batch_size):
    """A function key -> {plate: indices}, and the batch size per plate."""
    sizes = {}
    for name, (size, subsample_size) in ld.plates.items():
        if batch_size is None:
            b = subsample_size
        elif isinstance(batch_size, Mapping):
            b = batch_size.get(name, subsample_size)
        else:
            b = batch_size
        check_int(f"batch_size for plate '{name}'", b, maximum=size)
        sizes[name] = int(b)
    names = sorted(sizes)

    def draw(key):
        keys = jr.split(key, max(len(names), 1))
        return {n: jr.choice(k, ld.plates[n][0], (sizes[n],), replace=False)
                for n, k in zip(names, keys)}

    return draw, sizes


def _sg_plan(name, ld: ModelLogDensity, opts, num_warmup, num_samples, batch_size):
    draw_batch, _ = _batch_sampler(ld, batch_size)
    grad_estimator = jax.grad(ld.minibatch_logdensity)
    schedule = _schedule(opts["step_size"])
    temperature = float(opts["temperature"])
    base = name.removeprefix("cyclical_")
    cyclical = name.startswith("cyclical_") or (name == "entropy_sgld" and opts["num_cycles"])
    if base == "sghmc":
        alpha = opts["alpha"]
        if alpha is None:  # per-step friction alpha * h = 0.1
            alpha = 0.1 / float(schedule(0))
        algorithm = _sghmc.as_top_level_api(grad_estimator, alpha=float(alpha), beta=float(opts["beta"]))
        grads_per_step = 1
    elif base == "entropy_sgld":
        from bayesgen.mcmc import entropy_mcmc

        algorithm = entropy_mcmc.as_top_level_api(grad_estimator, eta=float(opts["eta"]))
        grads_per_step = 1
    else:
        algorithm = blackjax.sgld(grad_estimator)
        grads_per_step = 1

    def one_step(state, key, h, temp):
        kb, ks = jr.split(key)
        return algorithm.step(ks, state, draw_batch(kb), h, temp)

    def outputs(state, h):
        if base == "entropy_sgld":
            return {"position": state.position, "guide": state.guide, "step_size": h}
        if base == "sghmc":
            return {"position": state.position, "step_size": h}
        return {"position": state, "step_size": h}

    def warmup(key, position):
        key, k_init = jr.split(key)
        state = algorithm.init(position, k_init)

        def body(s, tk):
            t, k = tk
            return one_step(s, k, schedule(t), temperature), None

        state, _ = jax.lax.scan(body, state, (jnp.arange(num_warmup), jr.split(key, num_warmup)))
        return (state, jnp.asarray(num_warmup, jnp.int32)), jnp.asarray(num_warmup * grads_per_step, jnp.int32)

    if not cyclical:
        check_int("kernel_options['thin']", opts["thin"])
        thin = int(opts["thin"])

        def chunk(carry, keys):
            state, t = carry

            def draw(c, k):
                s, t = c

                def inner(c2, k2):
                    s2, t2 = c2
                    return (one_step(s2, k2, schedule(t2), temperature), t2 + 1), None

                (s, t), _ = jax.lax.scan(inner, (s, t), jr.split(k, thin))
                return (s, t), outputs(s, schedule(t - 1))

            (state, t), outs = jax.lax.scan(draw, (state, t), keys)
            return (state, t), outs, jnp.asarray(keys.shape[0] * thin * grads_per_step, jnp.int32)

        return _Plan(warmup, chunk), num_samples

    num_cycles = int(opts["num_cycles"])
    if num_cycles < 1 or num_samples % num_cycles:
        raise ValueError(
            f"num_samples={num_samples} must be a multiple of kernel_options['num_cycles']="
            f"{num_cycles} (each cycle keeps num_samples / num_cycles draws)"
        )
    keep = num_samples // num_cycles
    beta = float(opts["exploration"])
    explore = int(math.ceil(keep * beta / (1.0 - beta) - 1e-9))  # 0.8 / 0.2 is 4 + 1 ulp
    cycle = explore + keep

    def cyclical_h(i):  # i = step within the cycle
        return 0.5 * schedule(0) * (jnp.cos(jnp.pi * i / cycle) + 1.0)

    def chunk(carry, keys):  # one cycle per key
        state, t = carry

        def one_cycle(s, k):
            k_explore, k_sample = jr.split(k)

            def explore_body(s2, ik):
                i, k2 = ik
                return one_step(s2, k2, cyclical_h(i), 0.0), None

            s, _ = jax.lax.scan(explore_body, s, (jnp.arange(explore), jr.split(k_explore, explore)))

            def sample_body(s2, ik):
                i, k2 = ik
                h = cyclical_h(i)
                s2 = one_step(s2, k2, h, temperature)
                return s2, outputs(s2, h)

            s, outs = jax.lax.scan(sample_body, s, (explore + jnp.arange(keep), jr.split(k_sample, keep)))
            return s, outs

        state, outs = jax.lax.scan(one_cycle, state, keys)
        outs = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), outs)
        return (state, t + keys.shape[0] * cycle), outs, jnp.asarray(keys.shape[0] * cycle * grads_per_step, jnp.int32)

    return _Plan(warmup, chunk), num_cycles


# ----------------------------------------------------------------------------- run


def run(
    model,
    kernel: str | Callable = "nuts",
    *args,
    num_chains: int = 4,
    num_warmup: int = 1000,
    num_samples: int = 1000,
    batch_size: int | Mapping[str, int] | None = None,
    seed: int | jax.Array = 0,
    progress_bar: bool = True,
    kernel_options: Mapping[str, Any] | None = None,
    chain_method: str | None = None,
    init_strategy=None,
    **kwargs,
) -> MCMCResult:
    """Sample the posterior of a numpyro model with a blackjax kernel.

    Parameters
    ----------
    model : callable
        A numpyro model with continuous latent sites.
    kernel : str or callable
        One of ``"nuts"``, ``"hmc"``, ``"mala"``, ``"sgld"``, ``"sghmc"``,
        ``"cyclical_sgld"``, ``"cyclical_sghmc"``, ``"entropy_sgld"`` (see the module
        docstring), or a callable ``logdensity_fn -> blackjax.SamplingAlgorithm`` over the
        flat unconstrained latent.
    *args, **kwargs
        Arguments of the model.
    num_chains, num_warmup, num_samples : int
        Chains, warmup (adaptation or burn-in) steps and kept draws per chain.
    batch_size : int or dict, optional
        Minibatch size of the subsampled plates for the SG kernels (default: each plate's
        own ``subsample_size``); a dict gives one per plate name. Full-batch kernels always
        use all the data.
    seed : int or jax.Array
        Seed (or key) of the run.
    progress_bar : bool
        Show progress over the sampling chunks (tqdm).
    kernel_options : dict, optional
        Options of the named kernel: ``target_accept``, ``max_tree_depth``, ``dense_mass``,
        ``initial_step_size``, ``num_integration_steps`` (nuts/hmc/mala); ``step_size``
        (required), ``temperature``, ``thin``, ``alpha``, ``beta``, ``num_cycles``,
        ``exploration``, ``eta`` (SG kernels; ``eta`` for entropy_sgld, which also takes
        ``num_cycles`` for a cyclical schedule).
    chain_method : ``"vectorized"`` or ``"sequential"``. Default: vectorised with several
        devices (chains sharded across them) and for the fixed-cost kernels; sequential
        for NUTS and HMC on one device, where vmapped trajectories wait for the longest
        chain (measured: 1.9-3.2x the ESS/s of the vectorised run, docs/benchmarks.md).
    init_strategy : numpyro init strategy (default ``init_to_uniform``).

    Returns
    -------
    MCMCResult
    """
    if isinstance(kernel, SamplingAlgorithm):
        raise TypeError(
            "pass a callable logdensity_fn -> SamplingAlgorithm (e.g. "
            "lambda ld: blackjax.rmh(ld, sigma)), not a built SamplingAlgorithm: bayesgen "
            "supplies the model's log density over its flat unconstrained latent"
        )
    if isinstance(kernel, str):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)} or pass a callable")
        name = kernel
    elif callable(kernel):
        name = "custom"
        if kernel_options:
            raise ValueError("kernel_options are for named kernels; configure a custom kernel in its factory")
    else:
        raise TypeError(f"kernel must be a name or a callable, got {type(kernel).__name__}")
    for arg, value, low in (("num_chains", num_chains, 1), ("num_warmup", num_warmup, 0),
                            ("num_samples", num_samples, 1)):
        check_int(arg, value, minimum=low)
    if chain_method is None:
        sequential = name in ("nuts", "hmc") and len(jax.devices()) == 1
        chain_method = "sequential" if sequential else "vectorized"
    if chain_method not in ("vectorized", "sequential"):
        raise ValueError(f"chain_method must be 'vectorized' or 'sequential', got {chain_method!r}")
    opts = _options(name, kernel_options) if name != "custom" else {}
    if batch_size is not None and name not in _SG:
        raise ValueError(
            f"batch_size is for the SG kernels {list(_SG)}; kernel '{name}' uses the full data"
        )

    key = jr.PRNGKey(seed) if isinstance(seed, int | np.integer) else jnp.asarray(seed)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    k_init, k_warm, k_draw = jr.split(key, 3)
    from numpyro.infer.initialization import init_to_uniform

    ld = model_log_density(
        model, args, kwargs, key=k_init, num_chains=num_chains, minibatch=name in _SG,
        kernel_name=name, init_strategy=init_strategy or init_to_uniform,
    )
    if name in _SG and batch_size is not None and not ld.plates:
        raise ValueError(
            "batch_size was given but the model has no subsampled plate: put the observations "
            "in numpyro.plate(name, N, subsample_size=...) and index the data with the plate's "
            "indices, so that the likelihood can be rescaled to the full data"
        )

    if name in ("nuts", "hmc"):
        plan, n_draws = _adapted_plan(name, getattr(blackjax, name), ld, opts, num_warmup), num_samples
    elif name == "mala":
        plan, n_draws = _adapted_plan(name, _mala.preconditioned_mala, ld, opts, num_warmup), num_samples
    elif name == "custom":
        plan, n_draws = _custom_plan(kernel, ld), num_samples
    else:
        plan, n_draws = _sg_plan(name, ld, opts, num_warmup, num_samples, batch_size)

    mapper = jax.vmap if chain_method == "vectorized" else (lambda f: lambda *xs: jax.lax.map(lambda a: f(*a), xs))
    positions = _shard_chains(ld.init_positions)

    start = time.perf_counter()
    warmup = jax.jit(mapper(plan.warmup))
    carry, warm_grads = warmup(jr.split(k_warm, num_chains), positions)
    num_chunks = _num_chunks(n_draws, progress_bar)
    sizes = [n_draws // num_chunks + (1 if i < n_draws % num_chunks else 0) for i in range(num_chunks)]
    chunk = jax.jit(mapper(plan.chunk))
    draw_keys = jr.split(k_draw, num_chains * n_draws).reshape(num_chains, n_draws, -1)
    bar = _progress(progress_bar, n_draws, name)
    outs, grads, offset = [], [warm_grads], 0
    for size in sizes:
        carry, out, g = chunk(carry, draw_keys[:, offset:offset + size])
        outs.append(jax.device_get(out))
        grads.append(g)
        offset += size
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    jax.block_until_ready(carry)
    wall = time.perf_counter() - start
    out = {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}
    num_grad_evals = int(sum(int(np.sum(g)) for g in grads))

    flat = out.pop("position")
    guide_flat = out.pop("guide", None)
    samples = _constrain(ld, flat)
    guide_samples = _constrain(ld, guide_flat) if guide_flat is not None else None
    stats = {k: np.asarray(v) for k, v in out.items()}
    if "diverging" in stats:
        stats["diverging"] = stats["diverging"].astype(bool)
    adaptation = jax.device_get(plan.adaptation(carry))
    return MCMCResult(
        samples=samples,
        positions=np.asarray(flat),
        sample_stats=stats,
        kernel=name,
        adaptation={k: np.asarray(v) for k, v in adaptation.items()},
        wall_time=wall,
        num_grad_evals=num_grad_evals,
        model=ld.full_model,
        args=tuple(args),
        kwargs=dict(kwargs),
        num_chains=num_chains,
        num_samples=int(flat.shape[1]),
        guide_samples=guide_samples,
        guide_positions=None if guide_flat is None else np.asarray(guide_flat),
    )


def _num_chunks(n, progress_bar):
    return min(n, 20) if progress_bar else 1


def _progress(enabled, total, name):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"mcmc {name}", unit="draw", dynamic_ncols=True)


def _shard_chains(positions):
    devices = jax.devices()
    if len(devices) < 2 or positions.shape[0] % len(devices):
        return positions
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("chain",))
    return jax.device_put(positions, NamedSharding(mesh, PartitionSpec("chain")))


def _constrain(ld: ModelLogDensity, flat):
    c, n, d = flat.shape
    post = jax.jit(jax.vmap(ld.postprocess))(jnp.asarray(flat).reshape(c * n, d))
    return {k: np.asarray(v).reshape((c, n) + np.shape(v)[1:]) for k, v in post.items()}
