"""Bayesian neural networks (regression and classification) as numpyro models, with
minibatch subsampling.

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

Classification (:func:`bnn_classification`) has the same weights and prior, no noise site,
and a Bernoulli (two classes, one output unit) or Categorical logits likelihood in the same
subsampled plate; :func:`bnn_class_probs` gives per-draw class probabilities and
:func:`classification_metrics` accuracy, NLL and ECE of their model average.

References
----------
Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks", ICML 2017 (ECE
with 15 equal-width bins).
Neal, "Bayesian learning for neural networks", 1996 (the 1/sqrt(fan_in) prior scaling).
Hernandez-Lobato & Adams, "Probabilistic backpropagation for scalable learning of Bayesian
neural networks", ICML 2015 (the UCI regression protocol).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from bayesgen.errors import check_int, check_positive, is_int

__all__ = [
    "bnn_class_probs",
    "bnn_classification",
    "bnn_forward",
    "bnn_logits",
    "bnn_layer_shapes",
    "bnn_num_weights",
    "bnn_predictive_metrics",
    "bnn_regression",
    "classification_metrics",
    "regression_metrics",
]

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "elu": jax.nn.elu}


def _check_hidden(hidden) -> tuple[int, ...]:
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}") from None
    if not all(is_int(h) and h >= 1 for h in hidden):
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


def bnn_layer_shapes(
    n_features: int, hidden: Sequence[int] = (50,), num_outputs: int = 1
) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each layer of a network ``n_features -> hidden -> num_outputs``
    (1 output for regression and binary classification, ``num_classes`` otherwise)."""
    check_int("n_features", n_features)
    check_int("num_outputs", num_outputs)
    sizes = [n_features, *_check_hidden(hidden), num_outputs]
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def bnn_num_weights(n_features: int, hidden: Sequence[int] = (50,)) -> int:
    """Number of weights and biases, ``sum_l (fan_in_l + 1) fan_out_l`` (the noise site excluded).

    The flat latent of :func:`bnn_regression` has one more coordinate (``noise``).
    """
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in bnn_layer_shapes(n_features, hidden))


def bnn_forward(params: dict, x, activation="tanh"):
    """Network output ``f(x)`` (n,) for one set of weights ``{"w0", "b0", ...}``.

    Batched weights (a leading sample axis on every entry) give (S, n); use ``jax.vmap``
    for anything fancier. The first output unit only: :func:`bnn_logits` gives them all.
    """
    return bnn_logits(params, x, activation)[..., 0]


def bnn_logits(params: dict, x, activation="tanh"):
    """All the network's outputs ``(n, num_outputs)`` (or ``(S, n, num_outputs)`` for batched
    weights) for weights ``{"w0", "b0", ...}``: the logits of :func:`bnn_classification`."""
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
    return h


def _weight_sites(n_features, hidden, num_outputs, prior_scale) -> dict:
    """The sites ``w0, b0, w1, b1, ...`` with the 1/sqrt(fan_in) Gaussian prior."""
    params = {}
    for layer, (fan_in, fan_out) in enumerate(bnn_layer_shapes(n_features, hidden, num_outputs)):
        params[f"w{layer}"] = numpyro.sample(
            f"w{layer}",
            dist.Normal(0.0, prior_scale / math.sqrt(fan_in)).expand([fan_in, fan_out]).to_event(2),
        )
        params[f"b{layer}"] = numpyro.sample(
            f"b{layer}", dist.Normal(0.0, prior_scale).expand([fan_out]).to_event(1)
        )
    return params


def _check_data(x, y, batch_size):
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (n, p) array, got shape {x.shape}")
    n = x.shape[0]
    if y is not None and jnp.shape(y) != (n,):
        raise ValueError(f"y must have shape ({n},) to match x, got {jnp.shape(y)}")
    check_int("batch_size", batch_size, maximum=n, allow_none=True)
    return x, n


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
    x, n = _check_data(x, y, batch_size)
    check_positive("prior_scale", prior_scale)
    check_positive("noise_prior_scale", noise_prior_scale)
    act = _activation(activation)
    params = _weight_sites(x.shape[1], hidden, 1, prior_scale)
    noise = numpyro.sample("noise", dist.HalfNormal(noise_prior_scale))
    with numpyro.plate("data", n, subsample_size=batch_size):
        x_batch = numpyro.subsample(x, event_dim=1)
        y_batch = None if y is None else numpyro.subsample(y, event_dim=0)
        mean = bnn_forward(params, x_batch, act)
        numpyro.sample("y", dist.Normal(mean, noise), obs=y_batch)


def bnn_classification(
    x,
    y=None,
    *,
    hidden: Sequence[int] = (50,),
    num_classes: int = 2,
    prior_scale: float = 1.0,
    activation="tanh",
    batch_size: int | None = None,
):
    """numpyro model of a fully connected classification BNN.

    The weights are those of :func:`bnn_regression` (sites ``w0, b0, ..., w_L, b_L``, the
    same ``N(0, prior_scale^2 / fan_in)`` prior), without a noise site. The last layer has
    one output for ``num_classes=2``, the logit of class 1, with ``y_i ~
    Bernoulli(logits=f(x_i))``; otherwise ``num_classes`` outputs and ``y_i ~
    Categorical(logits=f(x_i))``. The observations sit in ``numpyro.plate("data", n,
    subsample_size=batch_size)`` as in :func:`bnn_regression`, so the model runs with
    minibatches under SVI and the SG-MCMC kernels of :func:`bayesgen.mcmc.run`.
    Predictive probabilities of posterior draws: :func:`bnn_class_probs`.

    Parameters
    ----------
    x : (n, p) inputs (the full data set, also when subsampling).
    y : (n,) integer labels in ``[0, num_classes)``, or ``None`` to sample them.
    hidden : widths of the hidden layers.
    num_classes : number of classes (>= 2).
    prior_scale : s in ``W_l ~ N(0, s^2 / fan_in)`` and ``b_l ~ N(0, s^2)``.
    activation : ``"tanh"`` (default), ``"relu"``, ``"gelu"``, ``"elu"`` or a callable.
    batch_size : minibatch size for the ``"data"`` plate (``None``: all the data).
    """
    x, n = _check_data(x, y, batch_size)
    check_int("num_classes", num_classes, minimum=2)
    check_positive("prior_scale", prior_scale)
    act = _activation(activation)
    params = _weight_sites(x.shape[1], hidden, 1 if num_classes == 2 else num_classes,
                           prior_scale)
    with numpyro.plate("data", n, subsample_size=batch_size):
        x_batch = numpyro.subsample(x, event_dim=1)
        y_batch = None if y is None else numpyro.subsample(jnp.asarray(y), event_dim=0)
        logits = bnn_logits(params, x_batch, act)
        if num_classes == 2:
            numpyro.sample("y", dist.Bernoulli(logits=logits[..., 0]), obs=y_batch)
        else:
            numpyro.sample("y", dist.Categorical(logits=logits), obs=y_batch)


def bnn_class_probs(samples: dict, x, *, num_classes: int = 2, activation="tanh"):
    """Class probabilities ``(S, n, num_classes)`` of each posterior draw of
    :func:`bnn_classification` (``samples``: a leading draw axis on ``w0, b0, ...``).

    Average over the first axis for the Bayesian model average (what
    :func:`classification_metrics` does with a 3-d input). Binary: ``softmax([0, f])``,
    i.e. ``(1 - sigmoid(f), sigmoid(f))`` computed stably.
    """
    weights = {k: v for k, v in samples.items() if k[:1] in "wb" and k[1:].isdigit()}
    logits = jax.vmap(lambda p: bnn_logits(p, jnp.asarray(x), activation))(weights)
    if num_classes == 2:
        if logits.shape[-1] != 1:
            raise ValueError(
                f"num_classes=2 expects one output unit, the network has {logits.shape[-1]}")
        logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
    elif logits.shape[-1] != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the network has {logits.shape[-1]} outputs")
    return jax.nn.softmax(logits, axis=-1)


def classification_metrics(probs, y, *, num_bins: int = 15) -> dict:
    """Accuracy, NLL and ECE of predictive class probabilities.

    Parameters
    ----------
    probs : (n, K) predictive probabilities, or (S, n, K) per-draw probabilities, which are
        averaged over draws first (the Bayesian model average), or (n,) probabilities of
        class 1 for a binary problem.
    y : (n,) integer labels.
    num_bins : equal-width confidence bins of the ECE (default 15, as Guo et al. 2017).

    Returns
    -------
    dict with ``accuracy`` (of the argmax class), ``nll`` (mean of ``-log p(y_i | x_i)``
    under the averaged probabilities) and ``ece``: with confidence ``c_i = max_k p_ik``
    and the bins ``(j / M, (j + 1) / M]``, ``ECE = sum_b |B_b| / n |acc(B_b) - conf(B_b)|``
    (Naeini et al. 2015; Guo et al. 2017).
    """
    p = np.asarray(probs, np.float64)
    if p.ndim == 3:
        p = p.mean(0)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=-1)
    y = np.asarray(y).astype(np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (n,), (n, K) or (S, n, K) with n = len(y) = {y.shape[0]}, "
                         f"got shape {np.shape(probs)}")
    check_int("num_bins", num_bins)
    pred = p.argmax(-1)
    correct = (pred == y).astype(np.float64)
    p_true = p[np.arange(y.shape[0]), y]
    nll = -np.mean(np.log(np.maximum(p_true, np.finfo(np.float64).tiny)))
    conf = p.max(-1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": float(ece)}


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
