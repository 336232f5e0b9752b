"""diagnose(): PSIS k-hat, importance-weighted evidence and refusal of surrogate densities."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.autoguide import AutoMultivariateNormal

from bayesgen import SurrogateDensityError, diagnose
from bayesgen.families.base import Family

SIGMA = jnp.array([1.0, 2.0, 0.5])
LOG_Z = 1.7  # the model's density integrates to exp(LOG_Z)


def model():
    numpyro.sample("z", dist.Normal(0.0, SIGMA).to_event(1))
    numpyro.factor("const", LOG_Z)


def _result(scale_factor):
    guide = AutoMultivariateNormal(model)
    handlers.seed(guide, 0)()  # set up the prototype
    params = {"auto_loc": jnp.zeros(3), "auto_scale_tril": jnp.diag(SIGMA * scale_factor)}
    return SimpleNamespace(model=model, guide=guide, params=params, args=(), kwargs={})


def test_exact_guide_gives_exact_evidence_and_small_khat():
    d = diagnose(_result(1.0), num_samples=1000, key=jax.random.key(1))
    assert d.khat < 0.3
    np.testing.assert_allclose(d.log_evidence, LOG_Z, atol=1e-4)
    np.testing.assert_allclose(d.elbo, LOG_Z, atol=1e-4)
    assert d.ess == pytest.approx(1000, rel=1e-3)
    assert d.reliable and not d.warnings


def test_too_narrow_guide_is_flagged():
    d = diagnose(_result(0.3), num_samples=2000, key=jax.random.key(2))
    assert d.khat > 0.7
    assert not d.reliable
    assert any("k-hat" in w for w in d.warnings)
    assert d.elbo < LOG_Z - 0.5  # KL(q || p) > 0 shows in the ELBO
    assert d.log_evidence < LOG_Z  # IW estimate is biased low for a narrow proposal


def test_wide_guide_evidence_is_close_and_khat_moderate():
    d = diagnose(_result(1.5), num_samples=4000, key=jax.random.key(3))
    assert d.khat < 0.7
    np.testing.assert_allclose(d.log_evidence, LOG_Z, atol=0.05)


class _LowerBoundFamily(Family):
    density = "lower_bound"

    def sample_with_intermediates(self, key, sample_shape=()):
        z = jax.random.normal(key, tuple(sample_shape) + (self.latent_dim,))
        return z, []

    def log_prob(self, value, intermediates=None):
        return -0.5 * jnp.sum(value**2, -1)


def test_surrogate_density_is_refused():
    def guide():
        numpyro.sample("z", _LowerBoundFamily(3))

    res = SimpleNamespace(model=model, guide=guide, params={}, args=(), kwargs={})
    with pytest.raises(SurrogateDensityError, match="'z'.*lower_bound"):
        diagnose(res, num_samples=200)


def test_bad_num_samples():
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(_result(1.0), num_samples=10)


def _semi_implicit_guide(spread):
    """Semi-implicit guide whose marginal is N(0, (spread * SIGMA)^2): mixing sd 0.8, noise 0.6."""
    from bayesgen.families.semi_implicit import SemiImplicit

    def conditional(eps):
        mu = eps * (0.8 * spread * SIGMA)
        return mu, jnp.broadcast_to(0.6 * spread * SIGMA, mu.shape)

    def guide():
        numpyro.sample("z", SemiImplicit(conditional, 3, jnp.zeros(3), jnp.ones(3)))

    return guide


def test_semi_implicit_guide_gets_extended_space_weights():
    """Exact marginal: unbiased evidence, small k-hat; the report says which weights it used."""
    res = SimpleNamespace(model=model, guide=_semi_implicit_guide(1.0), params={}, args=(),
                          kwargs={})
    d = diagnose(res, num_samples=4000, key=jax.random.key(4), num_mixing=200)
    assert "extended space" in d.weights and "K=200" in d.weights
    assert d.khat < 0.5
    np.testing.assert_allclose(d.log_evidence, LOG_Z, atol=0.02)
    # the weights are not those of the exact marginal (K is finite) but close to them
    assert 0 < np.std(d.log_weights) < 0.5
    # a too-narrow semi-implicit guide is flagged as the exact one is
    narrow = SimpleNamespace(model=model, guide=_semi_implicit_guide(0.3), params={}, args=(),
                             kwargs={})
    assert diagnose(narrow, num_samples=2000, key=jax.random.key(5), num_mixing=200).khat > 0.7
