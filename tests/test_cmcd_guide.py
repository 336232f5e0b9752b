"""AutoCMCD in plain numpyro SVI, in bayesgen.fit, and through diagnose.

As for AutoSNF the fit starts from a deliberately wrong preconditioner (means off by 0.5 sd,
sds 1.6x too wide, no correlations): the annealing starts at that Gaussian, and the control,
schedule and step sizes have to carry it to the 5-d conjugate posterior (mean error < 0.1 sd,
sds within 10%).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from conjugate5 import D, POST_COV, POST_MEAN, Y, model, posterior_errors
from numpyro.infer import SVI, Trace_ELBO

import bayesgen
from bayesgen.guides.cmcd import AutoCMCD

_SD = np.sqrt(np.diag(POST_COV))
WRONG_START = (jnp.asarray(POST_MEAN + 0.5 * _SD, jnp.float32), jnp.asarray(1.6 * _SD, jnp.float32))
NUM_DRAWS = 20_000


@pytest.mark.slow
def test_cmcd_fits_conjugate_gaussian_from_a_wrong_start():
    steps, lr = 1500, 3e-3
    guide = AutoCMCD(model, init_scale=WRONG_START, num_steps=16, step_size=0.1)
    optim = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8))
    state = svi.init(jr.key(0), Y)
    start_params = svi.get_params(state)
    result = svi.run(jr.key(0), steps, Y, progress_bar=False, init_state=state)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    sample = jax.jit(lambda k, p: guide.sample_posterior(k, p, sample_shape=(NUM_DRAWS,)))
    draws = sample(jr.key(1), result.params)["z"]
    assert draws.shape == (NUM_DRAWS, D)
    mean_err, sd_err, corr_err = posterior_errors(draws)
    report = (f"AutoCMCD: mean error / sd {np.round(mean_err, 3)}, sd error "
              f"{np.round(sd_err, 3)}, max corr error {np.abs(corr_err).max():.3f}")
    print(report)
    assert np.all(np.abs(mean_err) < 0.1), report
    assert np.all(np.abs(sd_err) < 0.1), report
    start_err = np.abs(posterior_errors(sample(jr.key(1), start_params)["z"])[0]).max()
    assert start_err > max(0.05, 2.0 * np.abs(mean_err).max()), (start_err, report)
    # training tightened the bound (the loss is minus the path ELBO)
    losses = np.asarray(result.losses)
    assert losses[-100:].mean() < losses[:100].mean() - 0.15  # measured: 0.32


def test_fit_and_diagnose_use_path_weights():
    guide = AutoCMCD(model, num_steps=4, step_size=0.05)
    result = bayesgen.fit(model, guide, Y, steps=50, optimizer=optax.adam(1e-3),
                          progress_bar=False, seed=1)
    assert np.all(np.isfinite(result.losses))
    d = bayesgen.diagnose(result, num_samples=1000)
    # the pathfinder start is close to this Gaussian posterior: near-exact weights
    assert np.isfinite(d.log_evidence) and d.khat < 0.7
    assert d.elbo <= d.log_evidence + 0.05


def _model_with_param(y):
    sd = numpyro.param("noise_sd", 1.0, constraint=dist.constraints.positive)
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("y", dist.Normal(z.sum(), sd), obs=y)


def test_models_whose_density_the_guide_cannot_evaluate_are_refused():
    guide = AutoCMCD(_model_with_param, init_scale=None)
    svi = SVI(_model_with_param, guide, optax.adam(1e-3), Trace_ELBO())
    with pytest.raises(ValueError, match="AutoCMCD cannot fit a model with numpyro.param"):
        svi.init(jr.key(0), jnp.ones(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(num_steps=0), "num_steps"), (dict(step_size=-1.0), "step_size"),
     (dict(schedule="cosine"), "schedule"), (dict(hidden=0), "hidden"),
     (dict(score_clip=0.0), "score_clip")],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoCMCD(model, **kwargs)
