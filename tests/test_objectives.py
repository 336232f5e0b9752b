"""The score-based objectives (KSIVI, SIVI-SM) against closed-form Gaussian cases.

A semi-implicit family with a linear mixing map ``mu(eps) = A eps + b`` and a constant
conditional scale ``s`` has the Gaussian marginal ``q(w) = N(b, A A^T + diag s^2)``, so its
marginal score, the Fisher divergence to a Gaussian target and the sign of the KSD's
gradient are known exactly. A diagonal preconditioner ``z = m0 + L0 w`` that is not the
identity checks that the target score is whitened (``s_p(w) = L0 s_p(z)``).
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
from flax import nnx
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from bayesgen.families.semi_implicit import SemiImplicit
from bayesgen.guides.score_based import AutoKSIVI, AutoSIVISM
from bayesgen.nn import MLP, split_params
from bayesgen.objectives import (
    CriticState,
    KernelSteinLoss,
    ScoreMatchingLoss,
    annealing_factor,
    critic_update,
    fisher_critic_value,
    kernel_stein_discrepancy,
    median_bandwidth,
    pairwise_sq_distances,
    whitened_residuals,
)

D, M = 3, 2
A = jnp.array([[1.0, 0.5], [-0.3, 0.8], [0.6, -0.7]])
B_LOC = jnp.array([0.5, -1.0, 2.0])
S = jnp.array([0.6, 0.7, 0.5])
M0 = jnp.array([1.0, -2.0, 0.5])
L0 = jnp.array([0.5, 2.0, 1.0])  # the preconditioner's (diagonal) scale
COV_W = A @ A.T + jnp.diag(S**2)  # q(w) = N(B_LOC, COV_W)


def linear_family(scale=1.0):
    """q(w) = N(B_LOC, scale^2 COV_W): mixing map and conditional sd both scaled."""

    def conditional(eps):
        mu = scale * (eps @ A.T) + B_LOC
        return mu, jnp.broadcast_to(scale * S, mu.shape)

    return SemiImplicit(conditional, M, M0, L0)


def gaussian_score_z(mean_z, cov_z):
    prec = jnp.linalg.inv(cov_z)
    return lambda z: -(z - mean_z) @ prec  # (B, d), prec symmetric


# the family's own marginal, as a target over z
Q_MEAN_Z = M0 + L0 * B_LOC
Q_COV_Z = COV_W * jnp.outer(L0, L0)
SCORE_EXACT = gaussian_score_z(Q_MEAN_Z, Q_COV_Z)
SCORE_WIDER = gaussian_score_z(Q_MEAN_Z, 2.0 * Q_COV_Z)


def marginal_score_w(w):
    return -(w - B_LOC) @ jnp.linalg.inv(COV_W)


def mean_and_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(), x.std(ddof=1) / np.sqrt(x.size)


# --------------------------------------------------------------------------- KSD


@pytest.fixture(scope="module")
def ksd_draws():
    """Replicated KSD estimates (U and V) for q = p and for a wider target."""

    def estimates(score, statistic):
        fn = jax.jit(jax.vmap(
            lambda k: kernel_stein_discrepancy(k, linear_family(), score, 128, statistic=statistic)
        ))
        return np.asarray(fn(jr.split(jr.key(0), 400)))

    return {(name, stat): estimates(score, stat)
            for name, score in (("exact", SCORE_EXACT), ("wider", SCORE_WIDER))
            for stat in ("u", "v")}


@pytest.mark.parametrize("statistic", ["u", "v"])
def test_ksd_is_zero_in_expectation_when_the_family_is_the_target(ksd_draws, statistic):
    mean, se = mean_and_se(ksd_draws[("exact", statistic)])
    assert abs(mean) < 4 * se, (mean, se)
    wrong_mean, wrong_se = mean_and_se(ksd_draws[("wider", statistic)])
    # clearly positive for the wrong target, and far above the exact case's noise
    assert wrong_mean > 10 * wrong_se and wrong_mean > 10 * abs(mean) + 10 * se, (
        wrong_mean, wrong_se, mean, se)


def test_u_statistic_matches_a_direct_sum_over_pairs():
    key = jr.key(7)
    n = 16
    got, (w, r) = jax.jit(lambda k: (
        kernel_stein_discrepancy(k, linear_family(), SCORE_WIDER, n, kernel="imq"),
        whitened_residuals(k, linear_family(), SCORE_WIDER, n),
    ))(key)
    w, r = np.asarray(w, np.float64), np.asarray(r, np.float64)
    sq = np.array([[np.sum((w[i] - w[j]) ** 2) for j in range(n)] for i in range(n)])
    h = np.median([sq[i, j] for i in range(n) for j in range(i + 1, n)]) / np.log(n + 1)
    total = sum((1 + sq[i, j] / h) ** -0.5 * r[i] @ r[j]
                for i in range(n) for j in range(n) if i != j)
    np.testing.assert_allclose(float(got), total / (n * (n - 1)), rtol=2e-4, atol=1e-6)


def test_residuals_whiten_the_target_score():
    """r = L0 s_p(z) - score_w, with score_w the conditional score -(w - mu)/sigma^2."""
    key = jr.key(3)
    fam = linear_family()
    z, w, score_w, eps = fam.sample_with_conditional_score(key, (64,))
    _, r = whitened_residuals(key, fam, SCORE_EXACT, 64)
    mu = eps @ A.T + B_LOC
    np.testing.assert_allclose(score_w, -(w - mu) / S**2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, M0 + L0 * w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, L0 * SCORE_EXACT(z) - score_w, rtol=1e-4, atol=1e-4)
    # in whitened coordinates the target score is the family's marginal score
    np.testing.assert_allclose(L0 * SCORE_EXACT(z), marginal_score_w(w), rtol=1e-3, atol=1e-3)


def test_conditional_score_in_ksd_is_unbiased_for_the_marginal_one():
    """Same draws, marginal vs conditional score: the paired difference has mean zero."""

    def paired(key):
        w, r_cond = whitened_residuals(key, linear_family(), SCORE_WIDER, 64)
        z = M0 + L0 * w
        r_marg = L0 * SCORE_WIDER(z) - marginal_score_w(w)
        sq = pairwise_sq_distances(w, w)
        k = jax.lax.rsqrt(1.0 + sq / median_bandwidth(sq, 64, exclude_diagonal=True))
        off = 1.0 - jnp.eye(64)
        u = lambda r: jnp.sum(k * (r @ r.T) * off) / (64 * 63)  # noqa: E731
        return u(r_cond), u(r_marg)

    cond, marg = jax.jit(jax.vmap(paired))(jr.split(jr.key(11), 400))
    diff_mean, diff_se = mean_and_se(np.asarray(cond) - np.asarray(marg))
    assert abs(diff_mean) < 4 * diff_se, (diff_mean, diff_se)
    assert np.mean(marg) > 10 * diff_se  # the check has power: KSD >> its noise


@pytest.mark.parametrize("scale, sign", [(1.3, 1.0), (0.7, -1.0)])
def test_ksd_gradient_in_the_scale_points_to_the_target(scale, sign):
    """Target = the family at scale 1: d KSD / d scale > 0 above 1 and < 0 below."""

    def grad_at(key):
        return jax.grad(lambda c: kernel_stein_discrepancy(key, linear_family(c), SCORE_EXACT, 128))(
            scale
        )

    grads = jax.jit(jax.vmap(grad_at))(jr.split(jr.key(5), 100))
    mean, se = mean_and_se(grads)
    assert sign * mean > 5 * se, (mean, se)


# --------------------------------------------------------------------------- SIVI-SM


def fisher_divergence_w(score_z):
    """E_q ||s_p(w) - s_q(w)||^2 in whitened coordinates, closed form (both Gaussian)."""
    # s_p(w) = L0 s_p(m0 + L0 w) = -Pp w + cp (affine); s_q(w) = -Pq w + Pq b
    pp = -jax.jacfwd(lambda w: L0 * score_z((M0 + L0 * w)[None])[0])(jnp.zeros(D))
    cp = L0 * score_z(M0[None])[0]
    pq = jnp.linalg.inv(COV_W)
    dm, c = pq - pp, cp - pq @ B_LOC
    return float(jnp.trace(dm @ COV_W @ dm.T) + jnp.sum((dm @ B_LOC + c) ** 2))


def test_sivism_value_at_the_optimal_critic_is_the_fisher_divergence():
    key = jr.key(2)
    fam = linear_family()
    w, r = whitened_residuals(key, fam, SCORE_WIDER, 200_000)
    f_star = L0 * SCORE_WIDER(M0 + L0 * w) - marginal_score_w(w)
    per_draw = 2.0 * jnp.sum(f_star * r, -1) - jnp.sum(f_star**2, -1)
    mean, se = mean_and_se(per_draw)
    np.testing.assert_allclose(float(fisher_critic_value(f_star, r)), mean, rtol=1e-4)
    exact = fisher_divergence_w(SCORE_WIDER)
    assert exact > 0.1
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # a sub-optimal critic gives less (the objective is a lower bound)
    assert float(fisher_critic_value(0.5 * f_star, r)) < exact - 10 * se


def test_sivism_conditional_score_substitution_is_unbiased():
    """For any critic f(w), replacing s_q(w) by the conditional score leaves the mean unchanged."""
    fam = linear_family()
    w, r_cond = whitened_residuals(jr.key(9), fam, SCORE_WIDER, 200_000)
    r_marg = L0 * SCORE_WIDER(M0 + L0 * w) - marginal_score_w(w)
    f = jnp.tanh(w @ jnp.array([[0.5, -1.0, 0.2], [0.3, 0.4, -0.8], [1.0, 0.1, 0.6]])) + 0.3
    value = lambda r: 2.0 * jnp.sum(f * r, -1) - jnp.sum(f * f, -1)  # noqa: E731
    diff = np.asarray(value(r_cond) - value(r_marg))
    mean, se = mean_and_se(diff)
    assert abs(mean) < 4 * se, (mean, se)
    assert np.std(diff) > 0.5  # the conditional score really is noisier per draw
    # and the reported value uses the conditional residual
    np.testing.assert_allclose(float(fisher_critic_value(f, r_cond)),
                               float(jnp.mean(value(r_cond))), rtol=1e-5)


def test_critic_update_learns_the_optimal_critic():
    """Critic steps on a frozen family drive the objective up to the Fisher divergence."""
    net = MLP(D, D, width=32, depth=1, rngs=nnx.Rngs(params=jr.key(0)))
    apply, params = split_params(net)
    opt = optax.adam(1e-2)
    state = CriticState(params, opt.init(params), jnp.zeros((), jnp.int32))

    @jax.jit
    def run(key, state):
        p, o, values = critic_update(key, state, linear_family(), SCORE_WIDER, apply, opt,
                                     num_particles=256, num_steps=500)
        return CriticState(p, o, state.step), values

    state, values = run(jr.key(1), state)
    w, r = whitened_residuals(jr.key(2), linear_family(), SCORE_WIDER, 100_000)
    learned = float(fisher_critic_value(apply(state.params, w), r))
    exact = fisher_divergence_w(SCORE_WIDER)
    assert float(jnp.mean(values[:10])) < 0.5 * exact  # it started far from the optimum
    assert abs(learned / exact - 1.0) < 0.1, (learned, exact)


def test_annealing_factor():
    np.testing.assert_allclose(annealing_factor(0, 100), 0.1)
    np.testing.assert_allclose(annealing_factor(50, 100), 0.55)
    np.testing.assert_allclose(annealing_factor(500, 100), 1.0)
    np.testing.assert_allclose(annealing_factor(0, 0), 1.0)


# --------------------------------------------------------------------------- the loss objects


def gaussian_model():
    numpyro.sample("x", dist.Normal(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0])).to_event(1))


def _init(guide, loss):
    svi = SVI(gaussian_model, guide, optax.adam(1e-3), loss)
    state = svi.init(jr.key(0))
    return svi, state


@pytest.fixture(scope="module")
def ksivi_setup():
    guide = AutoKSIVI(gaussian_model, init_scale=(jnp.zeros(3), jnp.ones(3)), anneal_steps=10,
                      num_mixing=1)
    return (guide, *_init(guide, guide.default_loss(1)))


def test_kernel_stein_loss_uses_the_models_score_in_whitened_coordinates(ksivi_setup):
    guide, svi, state = ksivi_setup
    params = svi.get_params(state)
    loss = KernelSteinLoss(64)
    mean, sd = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0])
    got, want = jax.jit(lambda k, p: (
        loss.loss(k, p, gaussian_model, guide),
        kernel_stein_discrepancy(k, guide.get_posterior(p), lambda z: -(z - mean) / sd**2, 64),
    ))(jr.key(4), params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


def test_annealing_counts_steps_in_mutable_state(ksivi_setup):
    guide, svi, state = ksivi_setup
    assert guide.step_site in state.mutable_state
    update = jax.jit(svi.update)
    for _ in range(3):
        state, value = update(state)
    assert int(state.mutable_state[guide.step_site]) == 3
    assert np.isfinite(float(value))


def test_errors_name_what_is_wrong(ksivi_setup):
    guide, svi, state = ksivi_setup
    params = svi.get_params(state)
    normal_guide = AutoNormal(gaussian_model)
    _init(normal_guide, Trace_ELBO())
    with pytest.raises(TypeError, match="semi-implicit"):
        KernelSteinLoss(8).loss(jr.key(0), params, gaussian_model, normal_guide)
    with pytest.raises(TypeError, match="semi-implicit"):
        ScoreMatchingLoss(8).loss(jr.key(0), params, gaussian_model, lambda: None)
    # annealing without the guide's step counter
    with pytest.raises(ValueError, match="anneal_steps"):
        KernelSteinLoss(8, anneal_steps=5).loss(jr.key(0), params, gaussian_model, guide)
    # SIVI-SM with a guide that has no critic
    with pytest.raises(TypeError, match="AutoSIVISM"):
        ScoreMatchingLoss(8).loss(jr.key(0), params, gaussian_model, guide)
    with pytest.raises(RuntimeError, match="svi.init"):
        KernelSteinLoss(8).loss(jr.key(0), params, gaussian_model, AutoKSIVI(gaussian_model))
    with pytest.raises(ValueError, match="kernel"):
        KernelSteinLoss(8, kernel="rbf")
    with pytest.raises(ValueError, match="statistic"):
        KernelSteinLoss(8, statistic="w")
    with pytest.raises(ValueError, match="num_particles"):
        KernelSteinLoss(1)
    with pytest.raises(ValueError, match="critic_steps"):
        ScoreMatchingLoss(8, critic_steps=-1)
    with pytest.raises(ValueError, match="critic_learning_rate"):
        AutoSIVISM(gaussian_model, critic_learning_rate=0.0)


def test_score_matching_loss_needs_the_critic_state():
    guide = AutoSIVISM(gaussian_model, init_scale=(jnp.zeros(3), jnp.ones(3)), num_mixing=1)
    loss = guide.default_loss(1)
    svi, state = _init(guide, loss)
    params = svi.get_params(state)
    with pytest.raises(ValueError, match="mutable state"):
        loss.loss(jr.key(0), params, gaussian_model, guide)
    with pytest.raises(ValueError, match="mutable state"):
        svi.evaluate(state)
    # with it, the value is the objective at the updated critic, and the state advances
    out = loss.loss_with_mutable_state(jr.key(0), {**params, **state.mutable_state},
                                       gaussian_model, guide)
    new = out["mutable_state"][guide.critic_site]
    assert int(new.step) == 1
    assert np.isfinite(float(out["loss"]))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params,
                         state.mutable_state[guide.critic_site].params)
    assert max(jax.tree.leaves(moved)) > 0
