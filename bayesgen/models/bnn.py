"""Bayesian neural network regression as a numpyro model, with minibatch subsampling.

The model, for inputs ``x`` (n, p) and targets ``y`` (n,),

    W_l ~ N(0, (prior_scale / sqrt(fan_in_l))^2)  elementwise,  shape (fan_in_l, fan_out_l),
    b_l ~ N(0, prior_scale^2)                       elementwise,  shape (fan_out_l,),
    noise ~ HalfNormal(noise_prior_scale),
    h_0 = x,  h_l = act(h_{l-1} W_l + b_l)  (hidden layers),  f(x) = h_{L-1} W_L + b_L,
    y_i | x_i ~ N(f(x_i), noise^2),

with sites ``w0, b0, w1, b1, ..., noise`` (layer ``l`` maps ``fan_in_l -> fan_out_l``; the
last layer has one output). The ``1 / sqrt(fan_in)`` prior scale keeps the prior
pre-activations at unit scale whatever the width (Neal, 1996), so a 1000-wide
network has the same prior function scale as a 50-wide one; biases have fan-in 1 and get
``prior_scale``. ``tanh`` is the default activation (smooth, which suits gradient-based
samplers used as references and keeps the likelihood differentiable everywhere);
``relu`` (the UCI protocol of Hernandez-Lobato & Adams) and any callable are accepted.
The noise prior is weakly informative for standardised targets (``HalfNormal(1)``).

Minibatches: the observations sit in ``numpyro.plate("data", n, subsample_size=batch_size)``
and the inputs and targets are taken with ``numpyro.subsample``, so under ``SVI`` every step
sees a fresh random minibatch and numpyro scales its log-likelihood by ``n / batch_size``:
the minibatch ELBO is an unbiased estimate of the full-data ELBO. Pass the *full* data every
step (it stays on the device); the plate draws the indices from the step's key.

Guides and the subsampled plate (numpyro 0.22, checked in ``tests/models/test_bnn.py``):
all the latent sites are global (outside the plate), so numpyro's ``AutoNormal`` and every
``AutoContinuous`` guide (hence every bayesgen guide) set up and train with ``batch_size``
set: numpyro's initialisation runs the model under a seed handler, and its refusal of
subsampled plates concerns *local* latents only. What a subsampled model cannot give is a
deterministic full-data potential. Inside a guide's set-up the plate draws one fixed
minibatch, so bayesgen's pathfinder start (``init_scale="pathfinder"``) would fit the
curvature of that one minibatch scaled to n; outside it, ``guide.flat_potential()`` raises
numpyro's "Missing random key to generate subsample indices". The documented recipe is to
build the guide on the full-data model and train on the minibatch model::

    full = functools.partial(bnn_regression, hidden=(50,))
    batched = functools.partial(bnn_regression, hidden=(50,), batch_size=256)
    guide = AutoLIVI(full)                                # set-up sees all the data
    svi = SVI(batched, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(key, x, y)                           # the guide keys its params by
    state, loss = svi.update(state, x, y)                 # the latent layout only

References
----------
Neal, "Bayesian learning for neural networks", 1996 (the 1/sqrt(fan_in) prior scaling).
Hernandez-Lobato & Adams, "Probabilistic backpropagation for scalable learning of Bayesian
neural networks", ICML 2015 (the UCI regression protocol).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

__all__ = [
    "bnn_forward",
    "bnn_layer_shapes",
    "bnn_num_weights",
    "bnn_predictive_metrics",
    "bnn_regression",
    "regression_metrics",
]

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "elu": jax.nn.elu}


def _check_hidden(hidden) -> tuple[int, ...]:
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}") from None
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
    return hidden


def _activation(activation) -> Callable:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(_ACTIVATIONS)} or a callable, got {activation!r}"
        )
    return _ACTIVATIONS[activation]


def bnn_layer_shapes(n_features: int, hidden: Sequence[int] = (50,)) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each layer of a regression network ``n_features -> hidden -> 1``."""
    if not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features must be a positive int, got {n_features!r}")
    sizes = [n_features, *_check_hidden(hidden), 1]
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def bnn_num_weights(n_features: int, hidden: Sequence[int] = (50,)) -> int:
    """Number of weights and biases, ``sum_l (fan_in_l + 1) fan_out_l`` (the noise site excluded).

    The flat latent of :func:`bnn_regression` has one more coordinate (``noise``).
    """
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in bnn_layer_shapes(n_features, hidden))


def bnn_forward(params: dict, x, activation="tanh"):
    """Network output ``f(x)`` (n,) for one set of weights ``{"w0", "b0", ...}``.

    Batched weights (a leading sample axis on every entry) give (S, n); use ``jax.vmap``
    for anything fancier.
    """
    act = _activation(activation)
    num_layers = sum(1 for k in params if k.startswith("w") and k[1:].isdigit())
    if num_layers == 0:
        raise ValueError(f"params has no weight sites w0, w1, ...; got keys {sorted(params)}")
    h = x
    for layer in range(num_layers):
        w, b = params[f"w{layer}"], params[f"b{layer}"]
        h = h @ w + b[..., None, :]
        if layer < num_layers - 1:
            h = act(h)
    return h[..., 0]


def bnn_regression(
    x,
    y=None,
    *,
    hidden: Sequence[int] = (50,),
    prior_scale: float = 1.0,
    noise_prior_scale: float = 1.0,
    activation="tanh",
    batch_size: int | None = None,
):
    """numpyro model of a fully connected regression BNN (see the module docstring).

    Parameters
    ----------
    x : (n, p) inputs (the full data set, also when subsampling).
    y : (n,) targets, or ``None`` to sample them (prior/posterior predictive).
    hidden : widths of the hidden layers, e.g. ``(50,)`` or ``(1000, 1000)``.
    prior_scale : s in ``W_l ~ N(0, s^2 / fan_in)`` and ``b_l ~ N(0, s^2)``.
    noise_prior_scale : scale of the ``HalfNormal`` prior on the noise sd.
    activation : ``"tanh"`` (default), ``"relu"``, ``"gelu"``, ``"elu"`` or a callable.
    batch_size : minibatch size for the ``"data"`` plate (``None``: all the data each step).
        The log-likelihood of a minibatch is scaled by ``n / batch_size``.
    """
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (n, p) array, got shape {x.shape}")
    n = x.shape[0]
    if y is not None and jnp.shape(y) != (n,):
        raise ValueError(f"y must have shape ({n},) to match x, got {jnp.shape(y)}")
    if batch_size is not None and (
        not isinstance(batch_size, int) or not 1 <= batch_size <= n
    ):
        raise ValueError(f"batch_size must be None or an int in [1, {n}], got {batch_size!r}")
    if not prior_scale > 0 or not noise_prior_scale > 0:
        raise ValueError(
            f"prior_scale and noise_prior_scale must be positive, got {prior_scale!r} and "
            f"{noise_prior_scale!r}"
        )
    act = _activation(activation)
    params = {}
    for layer, (fan_in, fan_out) in enumerate(bnn_layer_shapes(x.shape[1], hidden)):
        params[f"w{layer}"] = numpyro.sample(
            f"w{layer}",
            dist.Normal(0.0, prior_scale / math.sqrt(fan_in)).expand([fan_in, fan_out]).to_event(2),
        )
        params[f"b{layer}"] = numpyro.sample(
            f"b{layer}", dist.Normal(0.0, prior_scale).expand([fan_out]).to_event(1)
        )
    noise = numpyro.sample("noise", dist.HalfNormal(noise_prior_scale))
    with numpyro.plate("data", n, subsample_size=batch_size):
        x_batch = numpyro.subsample(x, event_dim=1)
        y_batch = None if y is None else numpyro.subsample(y, event_dim=0)
        mean = bnn_forward(params, x_batch, act)
        numpyro.sample("y", dist.Normal(mean, noise), obs=y_batch)


def regression_metrics(f, noise, y_test, *, y_scale=1.0):
    """Test RMSE of the predictive mean and mean test log-likelihood of the mixture predictive.

    With S posterior draws of the network output ``f_s(x_i)`` and noise sd ``noise_s``,

        rmse = sqrt(mean_i (y_i - mean_s f_s(x_i))^2) * y_scale,
        loglik = mean_i log (1/S) sum_s N(y_i; f_s(x_i), noise_s^2) - log y_scale,

    ``y_scale`` maps standardised targets back to the original units (pass ``y_std``).

    Parameters
    ----------
    f : (S, n) network outputs at the test inputs.
    noise : (S,) noise sds.
    y_test : (n,) test targets on the scale the model was fitted on.
    """
    f = jnp.asarray(f)
    noise = jnp.reshape(jnp.asarray(noise), (-1, 1))
    rmse = jnp.sqrt(jnp.mean((y_test - f.mean(0)) ** 2)) * y_scale
    log_lik = dist.Normal(f, noise).log_prob(y_test)  # (S, n)
    loglik = jnp.mean(jax.nn.logsumexp(log_lik, 0) - math.log(f.shape[0])) - math.log(y_scale)
    return float(rmse), float(loglik)


def bnn_predictive_metrics(samples: dict, x_test, y_test, *, activation="tanh", y_scale=1.0):
    """:func:`regression_metrics` from posterior draws of the sites (``w0, b0, ..., noise``).

    ``samples`` has a leading sample axis on every entry (e.g. ``guide.sample_posterior``).
    """
    weights = {k: v for k, v in samples.items() if k != "noise"}
    f = jax.vmap(lambda p: bnn_forward(p, x_test, activation))(weights)  # (S, n)
    return regression_metrics(f, samples["noise"], y_test, y_scale=y_scale)
