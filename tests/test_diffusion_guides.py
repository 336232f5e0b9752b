"""AutoDDVI and AutoDBVI in plain numpyro SVI, in bayesgen.fit, and through diagnose.

The guides start at their preconditioner's Gaussian, which on a Gaussian posterior is already
exact; so these fits start from a deliberately wrong preconditioner (means off by 0.5 sd, sds
1.6x too wide and no correlations) and the diffusion has to learn the posterior (mean error
< 0.1 sd, sds within 10%).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from conjugate5 import D, N, POST_COV, POST_MEAN, Y, model, posterior_errors
import numpyro
from numpyro.infer import SVI, Predictive, Trace_ELBO

import bayesgen
from bayesgen.guides import AutoDBVI, AutoDDVI

STEPS, LR, PARTICLES = 3000, 3e-3, 8
NUM_DRAWS = 20_000

_SD = np.sqrt(np.diag(POST_COV))
WRONG_START = (jnp.asarray(POST_MEAN + 0.5 * _SD, jnp.float32), jnp.asarray(1.6 * _SD, jnp.float32))


@pytest.mark.parametrize("guide_cls, options",
                         [(AutoDDVI, {}), (AutoDBVI, {}),
                          pytest.param(AutoDDVI, {"flow": "affine"}, marks=pytest.mark.slow)],
                         ids=["AutoDDVI", "AutoDBVI", "AutoDDVI-affine"])
def test_diffusion_guide_fits_conjugate_gaussian_from_a_wrong_start(guide_cls, options):
    guide = guide_cls(model, init_scale=WRONG_START, num_steps=16, **options)
    optim = optax.adam(optax.cosine_decay_schedule(LR, STEPS, alpha=0.1))
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
    result = svi.run(jr.key(0), STEPS, Y, progress_bar=False)
    assert np.all(np.isfinite(np.asarray(result.losses)))
    draws = guide.sample_posterior(jr.key(1), result.params, sample_shape=(NUM_DRAWS,))
    assert draws["z"].shape == (NUM_DRAWS, D)
    mean_err, sd_err, corr_err = posterior_errors(draws["z"])
    report = (f"{guide_cls.__name__}: mean error / sd {np.round(mean_err, 3)}, "
              f"sd error {np.round(sd_err, 3)}, max corr error {np.abs(corr_err).max():.3f}")
    print(report)
    assert np.all(np.abs(mean_err) < 0.1), report
    assert np.all(np.abs(sd_err) < 0.1), report
    # the start was wrong: the fit moved it
    start = guide.sample_posterior(jr.key(1), svi.get_params(svi.init(jr.key(0), Y)),
                                   sample_shape=(4000,))
    assert np.any(np.abs(posterior_errors(start["z"])[0]) > 0.4)
    pred = Predictive(model, guide=guide, params=result.params, num_samples=16)(jr.key(2))
    assert pred["y"].shape == (16, N, D)


def test_fit_to_arviz_and_diagnose_use_path_weights():
    guide = AutoDDVI(model, num_steps=8)
    result = bayesgen.fit(model, guide, Y, steps=100, optimizer=optax.adam(1e-3),
                          progress_bar=False, seed=1)
    idata = result.to_arviz(num_samples=100)
    assert "z" in idata.posterior.data_vars
    d = bayesgen.diagnose(result, num_samples=1000)
    # the start is the exact posterior here (pathfinder on a Gaussian): near-exact weights
    assert np.isfinite(d.log_evidence) and d.khat < 0.5
    assert abs(d.log_evidence - d.elbo) < 0.1


def test_realnvp_final_layer_trains_and_gives_an_eubo():
    """flow="realnvp": the couplings and the affine map are registered and trained, start at
    a volume-preserving map (identity couplings and their permutations), so the untrained
    guide is the preconditioner's Gaussian with its exact density on every path, and the
    family's reference paths invert the flow (finite EUBO terms on exact posterior draws)."""
    guide = AutoDDVI(model, num_steps=8, flow="realnvp", flow_layers=2)
    opt = optax.adam(1e-3)
    svi = SVI(model, guide, opt, Trace_ELBO())
    start = svi.get_params(svi.init(jr.key(0), Y))
    z, (log_q,) = guide.get_posterior(start).sample_with_intermediates(jr.key(3), (5,))
    loc, scale = guide.preconditioner
    exact = jax.scipy.stats.multivariate_normal.logpdf(z, loc, scale @ scale.T)
    np.testing.assert_allclose(log_q, exact, rtol=1e-4, atol=2e-3)
    result = bayesgen.fit(model, guide, Y, steps=50, optimizer=opt, progress_bar=False, seed=1)
    assert np.all(np.isfinite(result.losses))
    assert {"auto_flow", "auto_flow_loc", "auto_flow_scale_tril"} <= set(result.params)
    family = guide.get_posterior(result.params)
    exact = jr.multivariate_normal(jr.key(2), jnp.asarray(POST_MEAN, jnp.float32),
                                   jnp.asarray(POST_COV, jnp.float32), (64,))
    assert np.all(np.isfinite(np.asarray(family.reference_log_ratio(jr.key(4), exact))))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="flow"):
        AutoDDVI(model, flow="maf")
    with pytest.raises(ValueError, match="flow_layers"):
        AutoDDVI(model, flow="realnvp", flow_layers=0)
    with pytest.raises(ValueError, match="num_steps"):
        AutoDDVI(model, num_steps=0)
    with pytest.raises(ValueError, match="hidden"):
        AutoDDVI(model, hidden=-1)
    with pytest.raises(ValueError, match="depth"):
        AutoDBVI(model, depth=-1)
    with pytest.raises(ValueError, match="log_snr_max"):
        AutoDDVI(model, log_snr_max=-20.0)


def test_dbvi_start_scale_floor_keeps_the_gradient_finite():
    """A start scale driven to ~0 (yacht deep-GP fits reached 1e-19) made the stick-the-landing
    term's gradient 0/0 in float32; the floor ``min_start_scale`` keeps it finite."""
    def scales_and_grads(floor, raw_values):  # one guide set-up, a collapsed scale per value
        guide = AutoDBVI(model, num_steps=8, hidden=16, min_start_scale=floor or 1e-3)
        if floor is None:  # no floor at all (the constructor refuses one that is no floor)
            guide.min_start_scale = 0.0
        svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
        params = svi.get_params(svi.init(jr.key(0), Y))

        def scales(p):
            with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=p):
                return np.asarray(guide._start()[1])

        np.testing.assert_allclose(scales(params), 1.0, rtol=1e-6)  # the untrained start
        grad = jax.grad(lambda q: Trace_ELBO().loss(jr.key(3), q, model, guide, Y))
        out = []
        for raw_value in raw_values:
            raw = params["auto_start_raw_scale_z"]
            p = {**params, "auto_start_raw_scale_z": raw.at[0].set(raw_value)}
            finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad(p)))
            out.append((scales(p)[0], finite))
        return out

    for collapsed, finite in scales_and_grads(1e-3, (-60.0, -90.0)):
        assert collapsed == pytest.approx(1e-3, rel=1e-4) and finite
    # without a floor the scale collapses with the parameter: at raw -60 to 1.5e-26 (whether
    # that gradient is finite has changed between jax releases), at raw -90 softplus
    # underflows, the scale is exactly 0 and the gradient is 0/0, the failure the floor is for
    (at_60, _), (at_90, finite_90) = scales_and_grads(None, (-60.0, -90.0))
    assert 0 < at_60 < 1e-20
    assert at_90 == 0.0 and not finite_90
    # a tiny normal floor holds the scale there and keeps the gradient finite
    [(collapsed, finite)] = scales_and_grads(1e-30, (-90.0,))
    assert collapsed == pytest.approx(1e-30, rel=1e-4) and finite
    for bad in (0.0, 1.0, -1e-3, True, "1e-3", 1e-39):  # 1e-39 is subnormal in float32
        with pytest.raises(ValueError, match="min_start_scale"):
            AutoDBVI(model, min_start_scale=bad)


def _guide_with_random_score(bound, weight_scale, num_steps=16):
    """An AutoDDVI at ``max_correction=bound`` and its set-up params with the score network's
    weights drawn at sd ``weight_scale`` (its last layer starts at 0, so it puts out 0)."""
    guide = AutoDDVI(model, num_steps=num_steps, hidden=16, max_correction=bound,
                     init_scale=WRONG_START)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jr.key(0), Y))
    leaves, tree = jax.tree.flatten(params["auto_score"])
    keys = jr.split(jr.key(5), len(leaves))
    score = jax.tree.unflatten(tree, [weight_scale * jr.normal(k, a.shape, a.dtype)
                                      for k, a in zip(keys, leaves)])
    return guide, {**params, "auto_score": score}


def test_max_correction_bounds_the_drift_and_keeps_an_expansive_sampler_finite():
    """A score network with large weights makes each reverse step expansive and the path runs
    off (AutoDDVI on naval's deep GP reached |u| ~ 1e9); ``max_correction`` bounds the
    correction softly, so the path grows at most additively, and leaves small outputs as
    they were."""
    def max_abs_draw(bound, weight_scale):
        guide, params = _guide_with_random_score(bound, weight_scale)
        draws = guide.sample_posterior(jr.key(1), params, sample_shape=(64,))["z"]
        return float(jnp.max(jnp.abs(draws)))

    wild = max_abs_draw(None, 1.0)  # 1.9e10 (unit-variance weights, 16 hidden units)
    tamed = max_abs_draw(1.0, 1.0)  # 531
    assert not np.isfinite(wild) or wild > 1e6  # the unbounded sampler runs off
    assert np.isfinite(tamed) and tamed < 1e3  # 16 steps of bounded drift and noise
    # the bound is soft: outputs well inside it pass almost unchanged
    guide, params = _guide_with_random_score(1e4, 0.1)
    free, _ = _guide_with_random_score(None, 0.1)
    np.testing.assert_allclose(
        free.sample_posterior(jr.key(2), params, sample_shape=(256,))["z"],
        guide.sample_posterior(jr.key(2), params, sample_shape=(256,))["z"], rtol=1e-4,
        atol=1e-4)
    with pytest.raises(ValueError, match="max_correction"):
        AutoDDVI(model, max_correction=0.0)


def test_dbvi_start_amortised_from_deep_gp_inducing_inputs():
    """AutoDBVI(context=model.start_context) on a deep GP: the start is a function of the
    model's inducing inputs, which the guide shares (gradients reach Z from the guide)."""
    import jax
    from numpyro.infer import Trace_ELBO

    from bayesgen.models.deep_gp import DeepGP

    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(40, 2)).astype(np.float32)
    y = np.sin(x[:, 0]) + 0.1 * rng.normal(size=40).astype(np.float32)
    model = DeepGP(x, num_layers=2, num_inducing=6)
    assert model.start_context == {"v0": "Z0", "v1": "Z1"}
    guide = AutoDBVI(model, context=model.start_context, num_steps=4, hidden=16,
                     init_scale=None)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    params = svi.get_params(svi.init(jr.key(0), x, y))
    assert "auto_start_v0" in params and "Z0" in params
    # the start network starts at zero output; move it off zero as training would
    leaves, tree = jax.tree.flatten(params["auto_start_v0"])
    keys = jr.split(jr.key(1), len(leaves))
    moved_net = jax.tree.unflatten(
        tree, [a + 0.3 * jr.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])
    p1 = {**params, "auto_start_v0": moved_net}

    def start_loc(p):
        with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=p):
            return guide._start()[0]

    moved = jax.tree.map(lambda a: a + 0.5, {"Z0": p1["Z0"]})
    assert not np.allclose(start_loc(p1), start_loc({**p1, **moved}))  # depends on Z0
    grads = jax.grad(lambda z0: jnp.sum(start_loc({**p1, "Z0": z0})))(p1["Z0"])
    assert np.any(np.abs(np.asarray(grads)) > 0)
    with pytest.raises(ValueError, match="not a numpyro.param"):
        numpyro.handlers.seed(AutoDBVI(model, context={"v0": "nope"}, num_steps=2,
                                       init_scale=None), 0)(x, y)
    with pytest.raises(ValueError, match="latent site 'w'"):
        numpyro.handlers.seed(AutoDBVI(model, context={"w": "Z0"}, num_steps=2,
                                       init_scale=None), 0)(x, y)
    with pytest.raises(ValueError, match="context must be a dict"):
        AutoDBVI(model, context=["Z0"])


@pytest.mark.parametrize("dense", [True, False])
def test_dbvi_start_mean_in_unwhitened_inducing_outputs(dense):
    """With start_whitening the start network gives the mean of U = L v row by row: the
    start's mean of v is m0 + L^-1 (network output), in the preconditioner's coordinates."""
    import jax
    from flax import nnx
    from numpyro.infer import Trace_ELBO

    from bayesgen.models.deep_gp import DeepGP

    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(40, 2)).astype(np.float32)
    y = np.sin(x[:, 0]) + 0.1 * rng.normal(size=40).astype(np.float32)
    model = DeepGP(x, num_layers=2, num_inducing=6)
    d = 6 * 2 + 6 * 1
    a = np.tril(rng.normal(size=(d, d)) * 0.1) + np.diag(rng.uniform(0.5, 2.0, size=d))
    pre = (np.zeros(d), a if dense else np.diag(a).copy())
    guide = AutoDBVI(model, context=model.start_context, start_whitening=model.start_whitening,
                     num_steps=4, hidden=16, init_scale=pre)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    params = svi.get_params(svi.init(jr.key(0), x, y))
    moved = {}
    for site in ("v0", "v1"):
        leaves, tree = jax.tree.flatten(params[f"auto_start_{site}"])
        keys = jr.split(jr.key(1), len(leaves))
        moved[f"auto_start_{site}"] = jax.tree.unflatten(
            tree, [a + 0.3 * jr.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])
    p1 = {**params, **moved}

    def start_loc(p):
        with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=p):
            return guide._start()[0]

    loc = start_loc(p1)
    shift = (jnp.asarray(a) @ loc) if dense else jnp.diag(jnp.asarray(a)) * loc  # L0 u = v - m0
    parts = [shift[:12].reshape(6, 2), shift[12:].reshape(6, 1)]
    for l, (site, part) in enumerate(zip(("v0", "v1"), parts, strict=True)):
        graph, _ = nnx.split(guide._context_templates[site])  # the network at p1's weights
        out = nnx.merge(graph, p1[f"auto_start_{site}"])(p1[f"Z{l}"])[:, : part.shape[1]]
        factor = model.start_whitening[site](lambda n: p1[n])
        np.testing.assert_allclose(factor @ part, out, rtol=2e-4, atol=2e-5)
        assert float(jnp.max(jnp.abs(out))) > 0.1  # the check is not 0 = 0
    # the start now depends on the kernel's lengthscales, through L
    p2 = {**p1, "lengthscales0": p1["lengthscales0"] * 2.0}
    assert not np.allclose(start_loc(p2), loc)
    # at the start network's initial (zero) output the start is the preconditioner's centre
    np.testing.assert_allclose(start_loc(params), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="context does not amortise"):
        AutoDBVI(model, context={"v0": "Z0"}, start_whitening=model.start_whitening)
    with pytest.raises(ValueError, match="start_whitening must be a dict"):
        AutoDBVI(model, context=model.start_context, start_whitening={"v0": 3})
    with pytest.raises(ValueError, match="'nope'.*not a numpyro.param"):
        numpyro.handlers.seed(AutoDBVI(model, context=model.start_context, num_steps=2,
                                       start_whitening={"v0": lambda param: param("nope")},
                                       init_scale=None), 0)(x, y)


def test_correction_saturation_reads_how_much_of_the_correction_sits_at_its_bound():
    """At a bound far below the network's outputs every correction sits at it (tanh is flat
    there: the fit has lost that gradient); far above them, none does. The family's
    ``corrections`` run the reverse path with the network the sampler uses."""
    guide, params = _guide_with_random_score(1e-6, 0.1, num_steps=8)
    g = guide.get_posterior(params).corrections(jr.key(1), num_paths=3)
    assert g.shape == (3, 8, D)
    assert float(jnp.max(jnp.abs(g))) <= 1e-6 * (1 + 1e-5)
    assert guide.correction_saturation(params) > 0.99
    guide, params = _guide_with_random_score(1e6, 0.1, num_steps=8)
    assert guide.correction_saturation(params) == 0.0
    g = np.abs(np.asarray(guide.get_posterior(params).corrections(jr.key(0), num_paths=8)))
    level = float(np.median(g)) / 1e6  # the same paths: half of |g| is at least the median
    assert guide.correction_saturation(params, level=level) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="max_correction=None"):
        AutoDDVI(model).correction_saturation(params)
    with pytest.raises(ValueError, match="level"):
        guide.correction_saturation(params, level=1.0)
