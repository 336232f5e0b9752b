"""Peer methods for the benchmark: numpyro's own autoguides and blackjax NUTS.

NUTS runs blackjax's ``nuts`` kernel with ``window_adaptation`` on the model's potential
in the unconstrained space (``numpyro.infer.util.initialize_model``), chains vectorised with
``jax.vmap``; draws are mapped back to the constrained space with the model's
``postprocess_fn``. This is the reference sampler of the benchmark tables; the general MCMC
front end of bayesgen (``bayesgen.mcmc``) is a separate piece of work.
"""

from __future__ import annotations

import time

import blackjax
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from numpyro.infer import autoguide
from numpyro.infer.util import initialize_model

NUMPYRO_GUIDES = {
    "numpyro-normal": lambda model, **kw: autoguide.AutoNormal(model),
    "numpyro-mvn": lambda model, **kw: autoguide.AutoMultivariateNormal(model),
    "numpyro-iaf": lambda model, num_flows=3, hidden_dims=None, **kw: autoguide.AutoIAFNormal(
        model, num_flows=num_flows, hidden_dims=hidden_dims
    ),
    "numpyro-bnaf": lambda model, **kw: autoguide.AutoBNAFNormal(model),
}


def run_nuts(model, args=(), kwargs=None, *, key, num_warmup=1000, num_samples=1000,
             num_chains=4, target_accept=0.8):
    """Blackjax NUTS with window adaptation on a numpyro model.

    Returns ``(samples, info)``: ``samples`` maps each latent site (and deterministic site)
    to an array of shape ``(num_chains, num_samples, ...)``; ``info`` has ``divergences``,
    ``acceptance``, ``wall_time`` and ``num_grad_evals``.
    """
    kwargs = kwargs or {}
    k_init, k_warm, k_draw = jr.split(key, 3)
    init_keys = jr.split(k_init, num_chains)
    inits, potential_gen, postprocess_gen, _ = initialize_model(
        init_keys, model, model_args=args, model_kwargs=kwargs, dynamic_args=True
    )
    potential = potential_gen(*args, **kwargs)
    postprocess = postprocess_gen(*args, **kwargs)

    def logdensity(z):
        return -potential(z)

    def one_chain(init, kw, kd):
        warmup = blackjax.window_adaptation(
            blackjax.nuts, logdensity, target_acceptance_rate=target_accept
        )
        (state, params), _ = warmup.run(kw, init, num_steps=num_warmup)
        step = blackjax.nuts(logdensity, **params).step

        def body(state, k):
            state, info = step(k, state)
            return state, (state.position, info.is_divergent, info.acceptance_rate,
                           info.num_integration_steps)

        _, (pos, div, acc, nsteps) = jax.lax.scan(body, state, jr.split(kd, num_samples))
        return pos, div, acc, nsteps

    run = jax.jit(jax.vmap(one_chain))
    start = time.perf_counter()
    pos, div, acc, nsteps = run(inits.z, jr.split(k_warm, num_chains), jr.split(k_draw, num_chains))
    jax.block_until_ready(pos)
    wall = time.perf_counter() - start
    constrained = jax.vmap(jax.vmap(postprocess))(pos)
    samples = {k: np.asarray(v) for k, v in constrained.items()}
    info = {
        "divergences": int(jnp.sum(div)),
        "acceptance": float(jnp.mean(acc)),
        "wall_time": wall,
        "num_grad_evals": int(jnp.sum(nsteps)),
    }
    return samples, info
