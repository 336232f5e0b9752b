"""The BNN regression and classification models: sites and shapes, priors, minibatch scaling,
guides on them, classification metrics."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density
from scipy import stats

from bayesgen.models.bnn import (
    bnn_class_probs,
    bnn_classification,
    bnn_forward,
    bnn_layer_shapes,
    bnn_num_weights,
    bnn_predictive_metrics,
    bnn_regression,
    classification_metrics,
    regression_metrics,
)

RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.normal(size=(40, 3)), jnp.float32)
Y = jnp.asarray(np.sin(np.asarray(X[:, 0])) + 0.1 * RNG.normal(size=40), jnp.float32)
HIDDEN = (5, 4)


def trace(model, *args, seed=0, **kwargs):
    return handlers.trace(handlers.seed(model, seed)).get_trace(*args, **kwargs)


def test_sites_shapes_and_priors():
    tr = trace(bnn_regression, X, Y, hidden=HIDDEN, prior_scale=2.0)
    expected = {"w0": (3, 5), "b0": (5,), "w1": (5, 4), "b1": (4,), "w2": (4, 1), "b2": (1,)}
    latent = {k: v for k, v in tr.items() if v["type"] == "sample" and not v["is_observed"]}
    assert set(latent) == set(expected) | {"noise"}
    for name, shape in expected.items():
        assert latent[name]["value"].shape == shape
        fan_in = shape[0] if name.startswith("w") else 1
        fn = latent[name]["fn"]
        np.testing.assert_allclose(np.sqrt(np.asarray(fn.variance)), 2.0 / math.sqrt(fan_in),
                                   rtol=1e-6)
        np.testing.assert_allclose(np.asarray(fn.mean), 0.0)
    assert tr["y"]["value"].shape == (40,) and tr["y"]["is_observed"]
    # without y the observations are sampled (prior predictive)
    assert trace(bnn_regression, X, hidden=HIDDEN)["y"]["value"].shape == (40,)
    # minibatch: the observed site has the batch size and is scaled by n / b
    tr = trace(bnn_regression, X, Y, hidden=HIDDEN, batch_size=8)
    assert tr["y"]["value"].shape == (8,)
    assert tr["y"]["scale"] == pytest.approx(40 / 8)


def test_num_weights_formula_and_latent_dimension():
    assert bnn_layer_shapes(3, HIDDEN) == [(3, 5), (5, 4), (4, 1)]
    assert bnn_num_weights(3, HIDDEN) == (3 + 1) * 5 + (5 + 1) * 4 + (4 + 1) * 1
    assert bnn_num_weights(8, (1000, 1000)) == 1_011_001  # the LIVI benchmark's network
    assert bnn_num_weights(8, (4128, 4128)) > 17_000_000
    tr = trace(bnn_regression, X, Y, hidden=HIDDEN)
    latent_dim = sum(np.size(v["value"]) for v in tr.values()
                     if v["type"] == "sample" and not v["is_observed"])
    assert latent_dim == bnn_num_weights(3, HIDDEN) + 1  # + the noise site
    with pytest.raises(ValueError, match="hidden"):
        bnn_num_weights(3, (5, 0))
    with pytest.raises(ValueError, match="n_features"):
        bnn_num_weights(0, (5,))


def test_forward_matches_a_hand_written_network():
    tr = trace(bnn_regression, X, Y, hidden=HIDDEN, activation="relu")
    p = {k: np.asarray(v["value"], np.float64) for k, v in tr.items() if k[0] in "wb"}
    h = np.maximum(np.asarray(X) @ p["w0"] + p["b0"], 0)
    h = np.maximum(h @ p["w1"] + p["b1"], 0)
    out = (h @ p["w2"] + p["b2"])[:, 0]
    np.testing.assert_allclose(np.asarray(bnn_forward(p, X, "relu")), out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tr["y"]["fn"].loc), out, rtol=1e-4, atol=1e-5)


def test_minibatch_log_likelihood_is_unbiased_for_the_full_data():
    """E over minibatches of (n / b) * minibatch log-likelihood = the full-data log-likelihood."""
    params = {k: v["value"] for k, v in trace(bnn_regression, X, Y, hidden=HIDDEN).items()
              if v["type"] == "sample" and not v["is_observed"]}
    full = functools.partial(bnn_regression, hidden=HIDDEN)
    sub = functools.partial(bnn_regression, hidden=HIDDEN, batch_size=8)
    full_joint = float(log_density(full, (X, Y), {}, params)[0])

    @jax.jit
    @jax.vmap
    def sub_joint(key):
        return log_density(handlers.seed(sub, key), (X, Y), {}, params)[0]

    joints = np.asarray(sub_joint(jr.split(jr.key(1), 4000)))
    se = joints.std() / math.sqrt(joints.size)
    assert joints.std() > 0  # the minibatches differ
    assert abs(joints.mean() - full_joint) < 4 * se, (joints.mean(), full_joint, se)


@pytest.mark.parametrize("guide_name", ["AutoNormal", "AutoLIVI"])
def test_guides_set_up_on_full_data_train_on_minibatches(guide_name):
    """numpyro 0.22: AutoNormal and AutoContinuous guides accept the subsampled observation
    plate (all latents are global). bayesgen guides are set up on the full-data model, so the
    pathfinder start sees a deterministic full-data potential; training uses minibatches."""
    from bayesgen.guides.implicit import AutoLIVI

    full = functools.partial(bnn_regression, hidden=HIDDEN)
    sub = functools.partial(bnn_regression, hidden=HIDDEN, batch_size=8)
    guide = AutoNormal(full) if guide_name == "AutoNormal" else AutoLIVI(full, init_steps=20)
    svi = SVI(sub, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jr.key(0), X, Y)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(20):
        state, loss = update(state, X, Y)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    draws = guide.sample_posterior(jr.key(1), svi.get_params(state), sample_shape=(5,))
    assert draws["w1"].shape == (5, 5, 4) and np.all(np.asarray(draws["noise"]) > 0)


@pytest.mark.slow
def test_guides_also_accept_the_subsampled_model_directly():
    """Set up on the minibatch model itself, a bayesgen guide still works (numpyro's
    initialisation seeds the plate) but its pathfinder potential is then one fixed
    minibatch scaled to n, which is why the full-data set-up above is the documented way."""
    from bayesgen.guides.implicit import AutoLIVI

    sub = functools.partial(bnn_regression, hidden=HIDDEN, batch_size=8)
    guide = AutoLIVI(sub, init_steps=5)
    svi = SVI(sub, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jr.key(0), X, Y)
    state, loss = svi.update(state, X, Y)
    assert np.isfinite(float(loss))


def test_predictive_metrics():
    f = jnp.asarray(RNG.normal(size=(6, 40)), jnp.float32)
    noise = jnp.asarray(np.exp(RNG.normal(size=6)), jnp.float32)
    rmse, loglik = regression_metrics(f, noise, Y, y_scale=2.0)
    y = np.asarray(Y)
    np.testing.assert_allclose(rmse, 2.0 * np.sqrt(np.mean((y - np.asarray(f).mean(0)) ** 2)),
                               rtol=1e-5)
    dens = np.mean([stats.norm(np.asarray(f)[s], float(noise[s])).pdf(y) for s in range(6)], 0)
    np.testing.assert_allclose(loglik, np.mean(np.log(dens)) - math.log(2.0), rtol=1e-4)
    samples = {k: jnp.stack([trace(bnn_regression, X, Y, hidden=HIDDEN, seed=s)[k]["value"]
                             for s in range(3)]) for k in ("w0", "b0", "w1", "b1", "w2", "b2",
                                                           "noise")}
    rmse, loglik = bnn_predictive_metrics(samples, X, Y)
    assert np.isfinite(rmse) and np.isfinite(loglik)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="batch_size"):
        trace(bnn_regression, X, Y, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        trace(bnn_regression, X, Y, batch_size=41)
    with pytest.raises(ValueError, match="y must have shape"):
        trace(bnn_regression, X, Y[:-1])
    with pytest.raises(ValueError, match="x must be"):
        trace(bnn_regression, X[:, 0], Y)
    with pytest.raises(ValueError, match="activation"):
        trace(bnn_regression, X, Y, activation="swishy")
    with pytest.raises(ValueError, match="prior_scale"):
        trace(bnn_regression, X, Y, prior_scale=0.0)
    with numpyro.handlers.seed(rng_seed=0), pytest.raises(ValueError, match="hidden"):
        bnn_regression(X, Y, hidden=(3, "wide"))


# ----------------------------------------------------------------------------- classification

YC = jnp.asarray((np.asarray(X[:, 0]) + 0.3 * RNG.normal(size=40) > 0).astype(np.int32))
YC3 = jnp.asarray(RNG.integers(0, 3, size=40).astype(np.int32))


def _latent_values(tr):
    return {k: v["value"] for k, v in tr.items() if v["type"] == "sample" and not v["is_observed"]}


def test_classification_sites_shapes_and_priors():
    tr = trace(bnn_classification, X, YC, hidden=HIDDEN, prior_scale=2.0)
    latent = _latent_values(tr)
    expected = {"w0": (3, 5), "b0": (5,), "w1": (5, 4), "b1": (4,), "w2": (4, 1), "b2": (1,)}
    assert {k: v.shape for k, v in latent.items()} == expected  # the regression weights, no noise
    for name, shape in expected.items():
        fan_in = shape[0] if name.startswith("w") else 1
        np.testing.assert_allclose(np.sqrt(np.asarray(tr[name]["fn"].variance)),
                                   2.0 / math.sqrt(fan_in), rtol=1e-6)
    assert tr["y"]["value"].shape == (40,) and tr["y"]["is_observed"]
    tr3 = trace(bnn_classification, X, YC3, hidden=HIDDEN, num_classes=3)
    assert tr3["w2"]["value"].shape == (4, 3) and tr3["b2"]["value"].shape == (3,)
    # minibatch scaling, and sampled labels without y
    tr = trace(bnn_classification, X, YC, hidden=HIDDEN, batch_size=8)
    assert tr["y"]["value"].shape == (8,) and tr["y"]["scale"] == pytest.approx(40 / 8)
    labels = trace(bnn_classification, X, hidden=HIDDEN, num_classes=3)["y"]["value"]
    assert labels.shape == (40,) and set(np.unique(np.asarray(labels))) <= {0, 1, 2}
    assert bnn_layer_shapes(3, HIDDEN, num_outputs=3)[-1] == (4, 3)
    with pytest.raises(ValueError, match="num_classes"):
        trace(bnn_classification, X, YC, num_classes=1)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_log_density_matches_a_hand_written_one(num_classes):
    y = YC if num_classes == 2 else YC3
    model = functools.partial(bnn_classification, hidden=(4,), num_classes=num_classes,
                              activation="tanh", prior_scale=1.5)
    params = _latent_values(trace(model, X, y, seed=3))
    got = float(log_density(model, (X, y), {}, params)[0])
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    logits = np.tanh(np.asarray(X, np.float64) @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]
    yy = np.asarray(y)
    if num_classes == 2:
        f = logits[:, 0]
        loglik = np.sum(yy * f - np.logaddexp(0.0, f))
    else:
        loglik = np.sum(logits[np.arange(40), yy] - np.logaddexp.reduce(logits, axis=1))
    logprior = (stats.norm(0, 1.5 / math.sqrt(3)).logpdf(p["w0"]).sum()
                + stats.norm(0, 1.5).logpdf(p["b0"]).sum()
                + stats.norm(0, 1.5 / 2.0).logpdf(p["w1"]).sum()
                + stats.norm(0, 1.5).logpdf(p["b1"]).sum())
    np.testing.assert_allclose(got, loglik + logprior, rtol=1e-5)


def test_class_probs_shapes_and_values():
    draws = {k: jnp.stack([trace(bnn_classification, X, YC, hidden=HIDDEN, seed=s)[k]["value"]
                           for s in range(3)]) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    probs = np.asarray(bnn_class_probs(draws, X))
    assert probs.shape == (3, 40, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    f = np.asarray(jax.vmap(lambda p: bnn_forward(p, X))(draws))
    np.testing.assert_allclose(probs[..., 1], 1 / (1 + np.exp(-f)), rtol=1e-5, atol=1e-6)
    draws3 = {k: jnp.stack([trace(bnn_classification, X, YC3, hidden=HIDDEN, num_classes=3,
                                  seed=s)[k]["value"] for s in range(2)])
              for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
    probs3 = np.asarray(bnn_class_probs(draws3, X, num_classes=3))
    assert probs3.shape == (2, 40, 3)
    np.testing.assert_allclose(probs3.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        bnn_class_probs(draws3, X)  # three outputs read as a binary network


def test_ece_of_calibrated_predictions_is_near_zero():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=200_000)
    y = (rng.uniform(size=p1.size) < p1).astype(int)  # labels drawn from the stated probabilities
    m = classification_metrics(p1, y)
    assert m["ece"] < 0.01
    # the BMA of per-draw probabilities: (S, n, K) is averaged over draws first
    probs = np.stack([1 - p1, p1], -1)
    m3 = classification_metrics(np.stack([probs, probs]), y)
    assert m3 == pytest.approx(m)


def test_classification_metrics_by_hand():
    # confidences 0.9, 0.9, 0.6, 0.6 (predicted classes 1, 1, 0, 0); labels 1, 0, 0, 0
    p1 = np.array([0.9, 0.9, 0.4, 0.4])
    y = np.array([1, 0, 0, 0])
    m = classification_metrics(p1, y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.6, 0.6])))
    # 15 bins: 0.9 in (0.8667, 0.9333], accuracy 1/2; 0.6 in (0.5333, 0.6], accuracy 1
    assert m["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    # with 1 bin the ECE is |accuracy - mean confidence|
    assert classification_metrics(p1, y, num_bins=1)["ece"] == pytest.approx(0.0)
    assert classification_metrics(p1, np.array([1, 0, 0, 1]), num_bins=1)["ece"] == pytest.approx(
        abs(0.5 - 0.75))
    # three classes, (n, K) input
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    m = classification_metrics(probs, np.array([0, 1]))
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.7, 0.3])))
    assert m["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.6)
    with pytest.raises(ValueError, match="probs"):
        classification_metrics(probs, np.array([0, 1, 2]))
