"""Tests of bayesgen.fit: accuracy, checkpoint/resume, early stop, model checks, NaN diagnosis."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from bayesgen.errors import ModelStructureError, NonFiniteLossError, check_model
from bayesgen.fit import EarlyStop, FitResult, fit

Y = np.random.default_rng(0).normal(1.3, 1.0, size=20).astype(np.float32)
PRIOR_SD = 10.0
POST_PREC = 1 / PRIOR_SD**2 + Y.shape[0]
POST_SD = POST_PREC**-0.5
POST_MEAN = float(Y.sum()) / POST_PREC


def conjugate(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with numpyro.plate("N", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


@pytest.fixture(scope="module")
def normal_fit():
    return fit(conjugate, AutoNormal(conjugate), Y, steps=2000, num_particles=4, progress_bar=False)


def test_conjugate_normal_matches_closed_form(normal_fit):
    r = normal_fit
    assert isinstance(r, FitResult)
    assert r.steps == 2000 and r.losses.shape == (2000,) and np.all(np.isfinite(r.losses))
    assert r.wall_time > 0 and not r.stopped_early
    # the variational parameters are the exact posterior for this model
    assert abs(float(r.params["mu_auto_loc"]) - POST_MEAN) < 0.1 * POST_SD
    assert abs(float(r.params["mu_auto_scale"]) / POST_SD - 1) < 0.06
    draws = r.sample(jax.random.PRNGKey(1), num_samples=4000)
    assert draws["mu"].shape == (4000,)
    assert abs(draws["mu"].mean() - POST_MEAN) < 0.15 * POST_SD
    assert abs(draws["mu"].std() / POST_SD - 1) < 0.08


def test_sample_batches_and_keys(normal_fit):
    a = normal_fit.sample(3, num_samples=25, batch_size=10)  # batches 10, 10, 5
    b = normal_fit.sample(3, num_samples=25, batch_size=10)
    assert a["mu"].shape == (25,)
    np.testing.assert_array_equal(a["mu"], b["mu"])
    assert len(np.unique(a["mu"])) == 25
    with pytest.raises(ValueError, match="num_samples"):
        normal_fit.sample(num_samples=0)
    with pytest.raises(TypeError, match="key"):
        normal_fit.sample(key="nope", num_samples=2)


def test_autocontinuous_guide_and_progress_bar():
    r = fit(conjugate, AutoDiagonalNormal(conjugate), Y, steps=2000, num_particles=4, progress_bar=True)
    draws = r.sample(num_samples=2000)
    assert abs(draws["mu"].mean() - POST_MEAN) < 0.15 * POST_SD
    assert abs(draws["mu"].std() / POST_SD - 1) < 0.1


def test_default_loss_hook_is_used():
    calls = []

    class Guide(AutoNormal):
        def default_loss(self, num_particles):
            calls.append(num_particles)
            return Trace_ELBO(num_particles=num_particles)

    r = fit(conjugate, Guide(conjugate), Y, steps=3, num_particles=2, progress_bar=False)
    assert calls == [2] and r.svi.loss.num_particles == 2


# ----------------------------------------------------------------- checkpoint / resume

OPT = optax.adam(1e-2)


def _mvn_fit(steps, **kw):
    return fit(
        conjugate, AutoMultivariateNormal(conjugate), Y, steps=steps, optimizer=OPT,
        progress_bar=False, **kw,
    )


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = _mvn_fit(60)
    first = _mvn_fit(30, checkpoint=tmp_path / "a.ckpt", checkpoint_every=30)
    assert first.steps == 30 and (tmp_path / "a.ckpt").exists()
    resumed = _mvn_fit(60, resume=tmp_path / "a.ckpt", checkpoint=tmp_path / "b.ckpt")
    assert resumed.steps == 60
    # the checkpoint carries the first call's fitting time; the resumed result adds it up
    assert first.resumed_at_step == 0 and first.restored_wall_time == 0.0
    assert resumed.resumed_at_step == 30
    assert 0.0 < resumed.restored_wall_time <= first.wall_time
    np.testing.assert_array_equal(resumed.losses[:30], first.losses)
    for name in straight.params:
        np.testing.assert_allclose(resumed.params[name], straight.params[name], rtol=1e-6, atol=0)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-6)
    # the final checkpoint holds the whole run; resuming it at its end is a no-op
    again = _mvn_fit(60, resume=tmp_path / "b.ckpt")
    assert again.steps == 60
    for name in straight.params:
        np.testing.assert_array_equal(again.params[name], resumed.params[name])
    with pytest.raises(ValueError, match="steps"):
        _mvn_fit(20, resume=tmp_path / "b.ckpt")


class _Interrupt(EarlyStop):
    """Simulate a kill (Ctrl-C) after the chunk that ends at ``at``."""

    def __init__(self, at):
        super().__init__()
        object.__setattr__(self, "at", at)

    def should_stop(self, losses, start_step):
        if len(losses) >= self.at:
            raise KeyboardInterrupt
        return False


def test_interrupted_default_optimizer_resumes_exactly(tmp_path):
    kw = dict(steps=60, checkpoint_every=30, progress_bar=False)
    straight = fit(conjugate, AutoNormal(conjugate), Y, checkpoint=tmp_path / "s.ckpt", **kw)
    path = tmp_path / "k.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(conjugate, AutoNormal(conjugate), Y, checkpoint=path, early_stop=_Interrupt(30), **kw)
    resumed = fit(conjugate, AutoNormal(conjugate), Y, checkpoint=path, resume=path, **kw)
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    np.testing.assert_array_equal(resumed.losses, straight.losses)


def test_resume_refuses_other_latent_layout(tmp_path):
    path = tmp_path / "c.ckpt"
    fit(conjugate, AutoNormal(conjugate), Y, steps=2, checkpoint=path, progress_bar=False)

    def other(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("y", dist.Normal(mu.sum(), 1.0), obs=y)

    with pytest.raises(ModelStructureError, match="'mu'"):
        fit(other, AutoNormal(other), Y, steps=4, resume=path, progress_bar=False)
    with pytest.raises(ModelStructureError, match="guide"):
        fit(conjugate, AutoDiagonalNormal(conjugate), Y, steps=4, resume=path, progress_bar=False)


# ----------------------------------------------------------------- early stop


def test_early_stop_on_flat_loss():
    # a learning rate of zero leaves the parameters (and the mean loss) where they start
    rule = EarlyStop(patience=2, rel_tol=0.05, window=20)
    r = fit(conjugate, AutoNormal(conjugate), Y, steps=1000, optimizer=optax.sgd(0.0),
            early_stop=rule, progress_bar=False)
    assert r.stopped_early and r.stop_step == 100 and r.steps == 100 and r.losses.shape == (100,)
    # a loss that keeps falling fast does not stop
    count, _ = rule.strikes(np.linspace(1000.0, 10.0, 200))
    assert count == 0
    assert not EarlyStop(patience=1, window=10).should_stop(np.linspace(100.0, 1.0, 100), 0)
    assert EarlyStop(patience=1, window=10).should_stop(np.ones(100), 0)
    with pytest.raises(ValueError, match="window"):
        EarlyStop(window=0)


# ----------------------------------------------------------------- model checks


def discrete_model():
    logit = numpyro.sample("logit", dist.Normal(0.0, 1.0))
    numpyro.sample("z", dist.Bernoulli(logits=logit))


def enumerated_model():
    p = numpyro.sample("p", dist.Normal(0.0, 1.0))
    z = numpyro.sample("k", dist.Categorical(jnp.array([0.5, 0.5])), infer={"enumerate": "parallel"})
    numpyro.sample("x", dist.Normal(z * p, 1.0), obs=0.3)


def subsampled_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=4) as idx:
        local = numpyro.sample("local", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(local, 1.0), obs=x[idx])


def observed_only(x):
    numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def test_discrete_latent_is_refused():
    with pytest.raises(ModelStructureError, match=r"'z'.*[Mm]arginalise"):
        fit(discrete_model, AutoNormal(discrete_model), steps=5)
    with pytest.raises(ModelStructureError, match=r"'k'.*enumerate"):
        check_model(enumerated_model)


def test_local_latent_in_subsampled_plate_is_refused():
    with pytest.raises(ModelStructureError, match=r"'local'.*plate 'data'.*subsample"):
        fit(subsampled_model, AutoNormal(subsampled_model), np.zeros(10), steps=5)


def test_model_without_latents_is_refused():
    with pytest.raises(ModelStructureError, match="no latent"):
        fit(observed_only, AutoNormal(observed_only), 1.0, steps=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=True), "steps"),
        (dict(num_particles=0), "num_particles"),
        (dict(checkpoint_every=10), "checkpoint_every.*checkpoint"),
        (dict(checkpoint="x.ckpt", checkpoint_every=0), "checkpoint_every"),
        (dict(resume="/nonexistent/bayesgen.ckpt"), "resume"),
        (dict(early_stop="yes"), "early_stop"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(seed="0"), "seed"),
    ],
)
def test_argument_validation(kwargs, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        fit(conjugate, AutoNormal(conjugate), Y, **{"steps": 10, "progress_bar": False, **kwargs})


# ----------------------------------------------------------------- nonfinite loss


def blows_up():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0))
    numpyro.factor("push", 50.0 * x)  # drives x upward
    numpyro.sample("obs", dist.Normal(0.0, jnp.where(x > 1.0, jnp.nan, 1.0)), obs=0.0)


def test_nonfinite_loss_names_step_and_site(tmp_path):
    opt = optax.adam(0.05)
    path = tmp_path / "nan.ckpt"
    with pytest.raises(NonFiniteLossError) as info:
        fit(blows_up, AutoNormal(blows_up), steps=300, optimizer=opt, progress_bar=False, checkpoint=path)
    err = info.value
    # the last finite state was saved
    with np.load(path) as saved:
        assert json.loads(str(saved["meta"]))["step"] < err.step
    # the same first nonfinite step as a hand-written numpyro loop
    svi = SVI(blows_up, AutoNormal(blows_up), opt, Trace_ELBO())
    state, update = svi.init(jax.random.PRNGKey(0)), jax.jit(svi.update)
    for step in range(1, 301):
        state, loss = update(state)
        if not np.isfinite(loss):
            break
    assert 1 < err.step == step
    assert f"step {step}" in str(err)
    assert err.sites == ["obs"] and "'obs'" in str(err)


def test_nonfinite_gradient_names_params():
    def kink():
        x = numpyro.sample("x", dist.Normal(3.0, 1.0))
        numpyro.factor("f", jnp.sqrt(jnp.maximum(x, 0.0)) - 20.0 * x)  # d/dx is NaN for x < 0

    guide = AutoNormal(kink, init_loc_fn=numpyro.infer.init_to_value(values={"x": 3.0}))
    with pytest.raises(NonFiniteLossError, match="gradient") as info:
        fit(kink, guide, steps=300, optimizer=optax.adam(0.05), progress_bar=False)
    assert "x_auto_loc" in str(info.value) and info.value.step > 1
    assert "x_auto_loc" in info.value.gradients


def test_nonfinite_gradient_names_pytree_params():
    """A param that is a pytree (as bayesgen's flax nnx params are) is checked leaf by leaf."""
    def kink():
        x = numpyro.sample("x", dist.Normal(3.0, 1.0))
        numpyro.factor("f", jnp.sqrt(jnp.maximum(x, 0.0)) - 20.0 * x)  # d/dx is NaN for x < 0

    def guide():
        net = numpyro.param("net", {"loc": jnp.array(3.0), "log_scale": jnp.array(-2.0)})
        numpyro.sample("x", dist.Normal(net["loc"], jnp.exp(net["log_scale"])))

    with pytest.raises(NonFiniteLossError, match="gradient") as info:
        fit(kink, guide, steps=300, optimizer=optax.adam(0.05), progress_bar=False)
    assert info.value.gradients == ["net"] and "net" in str(info.value)


def test_a_finite_gradient_too_large_to_square_is_named():
    """A finite gradient above sqrt(float32 max) overflows Adam's second moment: the state
    turns nonfinite while every replayed gradient is finite (AutoDBVI deep-GP fits hit this
    with |g| ~ 1e21-1e24), and the error says so and names the param."""
    def steep():
        x = numpyro.sample("x", dist.Normal(0.0, 100.0))
        numpyro.factor("f", -jnp.exp(x))  # at x = 46: |d/dx| ~ 1e20, finite; its square is not

    def guide():
        loc = numpyro.param("loc", jnp.array(46.0))
        numpyro.sample("x", dist.Normal(loc, 1e-3))

    with pytest.raises(NonFiniteLossError, match="Adam's second moment overflowed") as info:
        fit(steep, guide, steps=5, optimizer=optax.adam(0.01), progress_bar=False)
    assert info.value.gradients == ["loc"] and "loc (" in str(info.value)
    assert "look for sqrt" not in str(info.value)  # not a 0/0: the hint would mislead


def test_a_single_overflowing_update_mid_chunk_is_found_and_named():
    """A rare draw gives one gradient too large to square (|g| ~ 1e21) in the middle of a
    chunk; the later gradients are ordinary. The error names the update that overflowed
    (the one a hand-written loop finds) and the params, not the chunk's last update, where
    nothing is wrong any more (an AutoDDVI deep-GP fit on energy was reported that way)."""
    def rare_spike():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.factor("spike", jnp.where(x > 0.25, 1e21 * x, 0.0))  # AutoNormal: sd 0.1

    opt = optax.adam(1e-3)
    svi = SVI(rare_spike, AutoNormal(rare_spike), opt, Trace_ELBO())
    state, update = svi.init(jax.random.PRNGKey(0)), jax.jit(svi.update)
    for step in range(1, 301):
        state, _ = update(state)
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.optim_state)):
            break
    assert step % 100 not in (0, 99)  # mid-chunk, with ordinary updates after it
    with pytest.raises(NonFiniteLossError, match="second moment overflowed") as info:
        fit(rare_spike, AutoNormal(rare_spike), steps=300, optimizer=opt, progress_bar=False)
    assert info.value.step == step and f"step {step}:" in str(info.value)
    assert "x_auto_loc" in info.value.gradients


def test_check_int_names_the_argument_and_refuses_bools():
    from bayesgen.errors import check_int

    check_int("depth", 0, minimum=0)
    check_int("hidden", None, allow_none=True)
    check_int("width", np.int64(3))
    with pytest.raises(ValueError, match=r"depth must be an int >= 0, got True"):
        check_int("depth", True, minimum=0)
    with pytest.raises(ValueError, match=r"hidden must be a positive int, got None"):
        check_int("hidden", None)
    with pytest.raises(ValueError, match=r"num_mixing must be an int >= 0 or None, got 2.5"):
        check_int("num_mixing", 2.5, minimum=0, allow_none=True)
    check_int("batch_size", 50, maximum=50)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 50\], got 51"):
        check_int("batch_size", 51, maximum=50)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 50\] or None, got 0"):
        check_int("batch_size", 0, maximum=50, allow_none=True)


def test_data_size_bounds_on_batch_size_name_the_training_size():
    from bayesgen.models.bnn import bnn_regression
    from bayesgen.models.deep_gp import DeepGP

    x, y = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32), np.zeros(6)
    for batch in (7, True, 2.0):
        with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 6\] or None"):
            bnn_regression(x, y, batch_size=batch)
        with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 6\] or None"):
            DeepGP(x, num_layers=1, num_inducing=3)(x, y, batch_size=batch)


def test_check_positive_refuses_bools_nan_inf_and_names_the_argument():
    from bayesgen.errors import check_positive

    check_positive("step_size", 0.1)
    check_positive("jitter", np.float32(1e-6))
    check_positive("score_clip", None, allow_none=True)
    check_positive("min_start_scale", 0.5, below=1.0)
    for bad in (True, 0, -1.0, float("nan"), float("inf"), "0.1", None):
        with pytest.raises(ValueError, match=r"step_size must be a positive finite number, got"):
            check_positive("step_size", bad)
    with pytest.raises(ValueError, match=r"min_start_scale must be a number in \(0, 1\)"):
        check_positive("min_start_scale", 1.0, below=1.0)
    # the guides and models use it: a bool is refused where an int/float check let it pass
    from bayesgen.models.deep_gp import DeepGP

    with pytest.raises(ValueError, match="jitter must be a positive finite number"):
        DeepGP(np.zeros((4, 2), np.float32), jitter=True)


def test_check_positive_reads_0d_arrays_and_lets_traced_values_through():
    import jax
    import jax.numpy as jnp

    from bayesgen.errors import check_positive

    check_positive("prior_scale", jnp.asarray(0.5))
    check_positive("prior_scale", np.asarray(2))
    for bad in (jnp.asarray(0.0), np.asarray(-1.0), jnp.asarray(jnp.inf), jnp.asarray(True),
                jnp.ones(2)):
        with pytest.raises(ValueError, match="prior_scale must be a positive finite number"):
            check_positive("prior_scale", bad)
    # under jit the value is unknown: the check passes, the traced computation goes on
    assert float(jax.jit(lambda s: (check_positive("prior_scale", s), s * 2)[1])(-1.0)) == -2.0


def test_hand_written_positive_checks_now_refuse_bools_and_nonfinite_values():
    from bayesgen.mcmc.sampling import _schedule
    from bayesgen.models.bnn import bnn_regression
    from bayesgen.objectives import KernelSteinLoss

    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="noise_prior_scale must be a positive finite number"):
        bnn_regression(x, y, noise_prior_scale=float("inf"))
    with pytest.raises(ValueError, match="bandwidth must be a positive finite number or None"):
        KernelSteinLoss(bandwidth=True)
    with pytest.raises(ValueError, match=r"kernel_options\['step_size'\] must be a positive"):
        _schedule(float("nan"))
    assert _schedule(np.float32(0.1))(3) == pytest.approx(0.1)


def test_integer_settings_refuse_bools_where_int_checks_let_them_pass():
    """``isinstance(True, int)`` holds: each of these sites took ``True`` for 1 before."""
    from bayesgen.families.diffusion import linear_beta_schedule, log_snr_schedule
    from bayesgen.guides.flows import AutoFlow
    from bayesgen.models.bnn import bnn_regression

    def model():
        pass

    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.float32)
    cases = [
        (lambda: linear_beta_schedule(True), "num_steps must be a positive int, got True"),
        (lambda: log_snr_schedule(True), "num_steps must be a positive int, got True"),
        (lambda: AutoFlow(model, flow="realnvp", num_layers=True),
         "num_layers must be a positive int or None, got True"),
        (lambda: AutoFlow(model, init_steps=True), "init_steps must be a positive int, got True"),
        (lambda: bnn_regression(x, y, batch_size=True),
         r"batch_size must be an int in \[1, 4\] or None, got True"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    assert len(linear_beta_schedule(np.int64(4)).times) == 5
