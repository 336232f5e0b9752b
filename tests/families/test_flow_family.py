"""FlowFamily: the exact-density claim, checked against independent computations.

With a random (perturbed, non-identity) flow, a random learned affine layer and a random,
badly scaled preconditioner:

* the log-density carried along a draw (``log_prob(z, intermediates)``) equals the one
  computed through the inverse (``log_prob(z)``), and that equals the change-of-variables
  formula with ``jax.jacobian`` of the whole ``eps -> z`` map;
* without a flow the family is the Gaussian ``N(m0 + L0 loc, (L0 L)(L0 L)^T)``;
* the pathwise gradient of the carried log-density equals the gradient of the inverse-path
  log-density at ``z(eps, params)`` (the "exact" claim of :mod:`bayesgen.families.base`).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

from bayesgen.families.base import DENSITY_KINDS, Family
from bayesgen.families.flows import FLOW_KINDS, FlowFamily, build_flow
from flow_test_helpers import perturb

DIM = 3


def random_tril(key, d, diag_scale):
    """Lower triangular, positive diagonal ``diag_scale * exp(N(0, 0.3^2))``, unit-ish off-diagonal."""
    k1, k2 = jr.split(key)
    off = jnp.tril(jr.normal(k1, (d, d)), -1)
    diag = diag_scale * jnp.exp(0.3 * jr.normal(k2, (d,)))
    return off * diag[:, None] + jnp.diag(diag)


def random_affines(key, d=DIM, dense=True):
    """Learned (loc, L) near unit scale, and a badly scaled preconditioner (m0, L0)."""
    k1, k2, k3, k4 = jr.split(key, 4)
    loc = 0.5 * jr.normal(k1, (d,))
    pre_loc = 3.0 * jr.normal(k3, (d,))
    pre_diag = jnp.array([0.01, 10.0, 0.7, 2.0, 0.1, 1.0][:d])
    if dense:
        scale = random_tril(k2, d, 1.0)
        pre_scale = random_tril(k4, d, 1.0) * pre_diag[:, None]
    else:
        scale = jnp.exp(0.3 * jr.normal(k2, (d,)))
        pre_scale = pre_diag * jnp.exp(0.3 * jr.normal(k4, (d,)))
    return loc, scale, pre_loc, pre_scale


NOISE = {"nsf": 0.1, "bnaf": 0.2}


def random_flow(kind, key, d=DIM):
    k1, k2 = jr.split(key)
    bij = build_flow(kind, k1, d, num_layers=2, hidden=8)
    return perturb(bij, k2, NOISE.get(kind, 0.3))


@eqx.filter_jit
def _densities(bij, loc, scale, pre_loc, pre_scale, key, eps):
    fam = FlowFamily(bij, loc, scale, pre_loc, pre_scale)
    z, inter = fam.sample_with_intermediates(key, (eps.shape[0],))
    lp_inverse = fam.log_prob(z)

    # change of variables for given base draws, with autodiff's Jacobian of eps -> z
    def cov(e):
        j = jax.jacfwd(lambda v: fam.transform(v))(e)
        return jnp.sum(jax.scipy.stats.norm.logpdf(e)) - jnp.linalg.slogdet(j)[1]

    z_eps = fam.transform(eps)
    return z, inter[0], lp_inverse, z_eps, jax.vmap(cov)(eps), fam.log_prob(z_eps)


def test_density_claim_is_exact():
    assert FlowFamily.density == "exact"
    assert FlowFamily.density in DENSITY_KINDS
    assert issubclass(FlowFamily, Family)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_log_prob_along_draw_inverse_and_change_of_variables_agree(kind):
    key = jr.fold_in(jr.key(2024), FLOW_KINDS.index(kind))
    k_flow, k_aff, k_draw, k_eps = jr.split(key, 4)
    bij = random_flow(kind, k_flow)
    loc, scale, pre_loc, pre_scale = random_affines(k_aff)
    eps = 1.3 * jr.normal(k_eps, (16, DIM))
    z, lp_draw, lp_inv, z_eps, lp_cov, lp_inv_eps = map(
        np.asarray, _densities(bij, loc, scale, pre_loc, pre_scale, k_draw, eps)
    )
    assert z.shape == (16, DIM) and lp_draw.shape == (16,)
    assert np.all(np.isfinite(lp_draw))
    # the flow is far from the identity: its densities differ from the Gaussian's by O(1)
    gauss = np.asarray(_gaussian(loc, scale, pre_loc, pre_scale).log_prob(z))
    assert np.max(np.abs(lp_draw - gauss)) > 0.1
    # BNAF's inverse is numerical (bisection to ~1e-3 in the base space)
    tol = dict(rtol=0, atol=5e-2) if kind == "bnaf" else dict(rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(lp_inv, lp_draw, **tol)
    np.testing.assert_allclose(lp_inv_eps, lp_cov, **tol)


def _gaussian(loc, scale, pre_loc, pre_scale):
    L0 = pre_scale if pre_scale.ndim == 2 else jnp.diag(pre_scale)
    L = scale if scale.ndim == 2 else jnp.diag(scale)
    return dist.MultivariateNormal(pre_loc + L0 @ loc, scale_tril=L0 @ L)


@pytest.mark.parametrize("dense", [True, False], ids=["tril", "diag"])
def test_without_flow_is_the_gaussian_of_the_two_affine_layers(dense):
    loc, scale, pre_loc, pre_scale = random_affines(jr.key(5), d=5, dense=dense)
    fam = FlowFamily(None, loc, scale, pre_loc, pre_scale)
    z, inter = fam.sample_with_intermediates(jr.key(6), (2000,))
    ref = _gaussian(loc, scale, pre_loc, pre_scale)
    # reference log-density in float64 (scipy), at the float32 draws
    z64 = np.asarray(z, np.float64)
    L = np.asarray(ref.scale_tril, np.float64)
    cov = L @ L.T
    ref_lp = stats.multivariate_normal(np.asarray(ref.mean, np.float64), cov).logpdf(z64)
    np.testing.assert_allclose(np.asarray(inter[0]), ref_lp, rtol=1e-5, atol=3e-3)
    np.testing.assert_allclose(np.asarray(fam.log_prob(z)), ref_lp, rtol=1e-5, atol=3e-3)
    # and the draws have that Gaussian's moments (the coordinates' scales span 0.01 .. 10)
    z = z64
    sd = np.sqrt(np.diag(cov))
    assert sd.max() / sd.min() > 100
    assert np.all(np.abs(z.mean(0) - np.asarray(ref.mean)) / sd < 0.12)  # 5.4 / sqrt(2000)
    np.testing.assert_allclose(z.std(0) / sd, 1.0, atol=0.1)


def test_sample_shape_and_batched_log_prob():
    bij = random_flow("maf", jr.key(8))
    loc, scale, pre_loc, pre_scale = random_affines(jr.key(9))

    @eqx.filter_jit
    def run(bij, key):
        fam = FlowFamily(bij, loc, scale, pre_loc, pre_scale)
        z, inter = fam.sample_with_intermediates(key, (3, 4))
        return (z, inter, fam.sample(key, (3, 4)), fam.log_prob(z), fam.log_prob(z[1, 2]),
                fam.log_prob(z[2]))

    z, inter, z_again, lp, lp_one, lp_row = run(bij, jr.key(10))
    assert z.shape == (3, 4, DIM)
    assert len(inter) == 1 and inter[0].shape == (3, 4)
    np.testing.assert_array_equal(np.asarray(z_again), np.asarray(z))  # sample = first output
    assert lp.shape == (3, 4) and lp_one.shape == () and lp_row.shape == (4,)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(inter[0]), rtol=1e-4, atol=2e-3)
    # a single value and a (4, d) batch score as the same entries of the (3, 4) batch
    np.testing.assert_allclose(float(lp_one), float(lp[1, 2]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lp_row), np.asarray(lp[2]), rtol=1e-5)
    fam = FlowFamily(bij, loc, scale, pre_loc, pre_scale)
    assert fam.event_shape == (DIM,) and fam.batch_shape == ()
    with pytest.raises(ValueError, match="trailing dimension"):
        fam.log_prob(jnp.zeros((4, DIM + 1)))


GRAD_KINDS = ("realnvp", "maf", "planar", "radial")


@pytest.mark.parametrize("kind", GRAD_KINDS)
def test_pathwise_gradient_of_carried_density_equals_inverse_path(kind):
    """d/dphi mean log q_phi(z(eps, phi)): carried along the draw vs through the inverse."""
    key = jr.fold_in(jr.key(77), GRAD_KINDS.index(kind))
    k_flow, k_aff, k_draw = jr.split(key, 3)
    bij = random_flow(kind, k_flow)
    loc, scale, pre_loc, pre_scale = random_affines(k_aff)
    params, static = eqx.partition((bij, loc, scale, pre_loc), eqx.is_inexact_array)

    def family(p):
        b, lo, sc, pl = eqx.combine(p, static)
        # the guides keep L lower triangular (a constrained parameter); so does this test
        return FlowFamily(b, lo, jnp.tril(sc), pl, pre_scale)

    def carried(p):
        _, inter = family(p).sample_with_intermediates(k_draw, (8,))
        return jnp.mean(inter[0])

    def through_inverse(p):
        fam = family(p)
        z = fam.sample(k_draw, (8,))  # z(eps, phi), differentiable in phi
        return jnp.mean(fam.log_prob(z))

    (v1, g1), (v2, g2) = eqx.filter_jit(
        lambda p: (jax.value_and_grad(carried)(p), jax.value_and_grad(through_inverse)(p))
    )(params)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-4, atol=1e-3)
    g1, g2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    flat1 = np.concatenate([np.ravel(a) for a in g1])
    flat2 = np.concatenate([np.ravel(a) for a in g2])
    assert np.linalg.norm(flat1) > 0.1  # a real gradient, not zero on both sides
    np.testing.assert_allclose(flat2, flat1, rtol=1e-3, atol=2e-3 * np.abs(flat1).max())
    # the preconditioner is fixed: no gradient reaches its location
    pre_loc_grad = jax.grad(carried)(params)[3]
    np.testing.assert_array_equal(np.asarray(pre_loc_grad), 0.0)

    # the score d/dz log q(z) through the inverse equals J^{-T} d/deps [log N(eps) - log|det J|],
    # computed from the forward map only (J = d z / d eps)
    fam = family(params)
    eps = jr.normal(jr.fold_in(k_draw, 1), (6, DIM))

    @jax.jit
    def scores(eps):
        def log_q_along(e):
            j = jax.jacfwd(fam.transform)(e)
            return jnp.sum(jax.scipy.stats.norm.logpdf(e)) - jnp.linalg.slogdet(j)[1]

        def ref(e):
            j = jax.jacfwd(fam.transform)(e)
            return jnp.linalg.solve(j.T, jax.grad(log_q_along)(e))

        z = fam.transform(eps)
        return jax.vmap(jax.grad(lambda v: fam.log_prob(v)))(z), jax.vmap(ref)(eps)

    got, want = map(np.asarray, scores(eps))
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_family_subclass_with_unknown_density_kind_is_rejected():
    with pytest.raises(TypeError, match="density must be one of"):

        class Plugin(Family):  # noqa: F841
            density = "plugin"

    class Surrogate(Family):  # a declared kind is accepted
        density = "lower_bound"

    assert Surrogate.density == "lower_bound"
