"""Deep Gaussian processes with inducing points, as numpyro models whose latents are the
(whitened) inducing outputs, plus the doubly stochastic variational guide of Salimbeni &
Deisenroth (2017).

The model
---------
A deep GP with ``L`` layers maps ``x = F_0`` (n, D_0) through ``F_l = f_l(F_{l-1})`` with
``f_l = (f_l^1, ..., f_l^{D_l})`` independent GPs that share one kernel ``k_l`` (ARD RBF or
Matérn 1/2, 3/2, 5/2) and a mean function ``m_l``. Layer ``l`` has ``M`` inducing inputs
``Z_l`` (M, D_{l-1}) and inducing outputs ``U_l = f_l(Z_l)`` (M, D_l). The inducing outputs
are *whitened*:

    V_l ~ N(0, I)  (site ``v{l}``, shape (M, D_l)),    U_l = m_l(Z_l) + L_l V_l,
    L_l = chol(K_{Z_l Z_l} + jitter * variance_l * I),

so every latent site of the model has a standard normal prior, and ``U_l[:, d] ~ N(m_l(Z_l),
K_ZZ)`` is the GP prior. (For bayesgen's diffusion guides this makes the Gaussian reference
process, started at ``N(0, I)``, equal to the GP prior of the inducing outputs.) Everything
else, ``Z_l``, the kernel lengthscales and variances and the Gaussian noise variance, are
``numpyro.param`` sites, fitted by maximising the ELBO as in DSVI (type-II maximum
likelihood on the bound).

Given ``V_l`` the layer output at one input ``x`` is the GP conditional ``f_l(x) | U_l``,
the same for every output column up to the mean:

    a(x) = L_l^{-1} k_{Z_l}(x)                         (M,)
    mean_l(x) = m_l(x) + a(x)^T V_l                    (D_l,)   [= m(x) + k_xZ K^{-1} (U - m(Z))]
    var_l(x) = k_l(x, x) - ||a(x)||^2                  (scalar, one per datum)

Propagation is doubly stochastic (Salimbeni & Deisenroth 2017, sec. 3): each datum carries
its own reparameterised sample ``F_l^n = mean_l(F_{l-1}^n) + sqrt(var_l(F_{l-1}^n)) eps_n``
through the inner layers; ``eps`` comes from ``numpyro.prng_key()`` (under ``SVI`` a fresh
key each step). When the model runs without a seed (an unseeded potential evaluation, as in
an init search) the key is the fixed ``jax.random.PRNGKey(0)``, so the potential is a
deterministic function of the latents there. Trace_ELBO on this model then estimates

    ELBO = sum_n E_{q(V)} E_eps[ log-lik term of y_n given F_{L-1}^n ] + E_q[log p(V) - log q(V)],

which is DSVI's bound (with the KL estimated by Monte Carlo or, with
``TraceMeanField_ELBO`` and :class:`AutoDSVI`, in closed form).

Likelihoods
-----------
* ``"gaussian"``: ``f_L`` is integrated out analytically *inside the expectation*, as in
  the variational bound: the observation site scores

      E_{f ~ N(mean_L, var_L)} log N(y_n; f, s^2) = log N(y_n; mean_L, s^2) - var_L / (2 s^2)

  (:class:`GaussianExpectedLogLikelihood`). This is the variational-expectation term of
  Titsias (2009) and DSVI, a lower bound on ``log N(y_n; mean_L, var_L + s^2)``; it is what
  makes the ELBO of a one-layer model under the optimal Gaussian ``q(V)`` equal the collapsed
  Titsias bound. Sampling the site (``y=None``) draws from the predictive ``N(mean_L, var_L +
  s^2)``. A one-layer Gaussian model therefore has a deterministic log joint given ``V``.
* ``"bernoulli"``: ``y_n ~ Bernoulli(logits=f_L^n)`` (logit link, as
  :func:`bayesgen.models.bnn.bnn_classification`), at one reparameterised sample of ``f_L``.
* ``"categorical"``: ``num_classes`` outputs in the last layer, ``y_n ~
  Categorical(logits=f_L^n)`` (softmax), at one sample of ``f_L``.

Defaults, following the DSVI setup (Salimbeni & Deisenroth 2017, sec. 5): inner widths
``min(30, D_0)``; inner mean functions linear and fixed, the identity when the width is
kept and otherwise the projection on the top right singular vectors of the training inputs
(a widening layer, not covered there, gets ``[I, 0]``), zero mean in the last layer;
``Z_0`` by k-means on the training inputs and later layers' ``Z_l`` the earlier ones
pushed through the mean functions; Gaussian noise variance 0.01 for standardised targets
(with a floor of 1e-6). Ours: kernel variance 1 and lengthscales ``sqrt(D_in)`` per input
dimension, a heuristic for standardised inputs, whose typical pairwise distance grows like
``sqrt(D)``.

Minibatches: the observations sit in ``numpyro.plate("data", n, subsample_size=batch_size)``
and ``x``, ``y`` are taken with ``numpyro.subsample``, as in :mod:`bayesgen.models.bnn`, so
the minibatch ELBO is unbiased for the full-data ELBO. All latent sites are global. The
cost per step is ``O(B M^2 D + L M^3)``.

Typical use::

    model = DeepGP(x_train, num_layers=2, num_inducing=100)
    guide = AutoDSVI(model)
    result = bayesgen.fit(model, guide, x_train, y_train, steps=5000, batch_size=256)
    draws = result.sample(num_samples=100)
    pred = deep_gp_predict(model, draws, result.params, x_test, rng_key=jax.random.PRNGKey(1))
    rmse, loglik = deep_gp_regression_metrics(pred, y_test, y_scale=split.y_std)

References
----------
Salimbeni, H. and Deisenroth, M. P. (2017). Doubly stochastic variational inference for deep
Gaussian processes. *NeurIPS*.
Titsias, M. (2009). Variational learning of inducing variables in sparse Gaussian processes.
*AISTATS*.
Hensman, J., Fusi, N. and Lawrence, N. D. (2013). Gaussian processes for big data. *UAI*
(the uncollapsed bound with an explicit ``q(U)``).
Damianou, A. and Lawrence, N. D. (2013). Deep Gaussian processes. *AISTATS*.
Rasmussen, C. E. and Williams, C. K. I. (2006). *Gaussian Processes for Machine Learning*,
ch. 4 (the Matérn kernels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.util import promote_shapes
from numpyro.infer import TraceMeanField_ELBO
from numpyro.infer.autoguide import AutoGuide
from numpyro.util import not_jax_tracer

from bayesgen.errors import check_int, check_positive, is_int

__all__ = [
    "AutoDSVI",
    "ColumnwiseMultivariateNormal",
    "DeepGP",
    "DeepGPPrediction",
    "GaussianExpectedLogLikelihood",
    "KERNELS",
    "LIKELIHOODS",
    "deep_gp_log_predictive_density",
    "deep_gp_predict",
    "deep_gp_regression_metrics",
    "kernel_diag",
    "kmeans_inducing_inputs",
    "matern12_kernel",
    "matern32_kernel",
    "matern52_kernel",
    "rbf_kernel",
]

#: Key of the inner-layer noise when the model runs without a seed handler.
UNSEEDED_KEY_SEED = 0
#: Floor of the Gaussian noise variance (its constraint is ``greater_than(NOISE_FLOOR)``).
NOISE_FLOOR = 1e-6
#: Largest number of rows k-means looks at (a seeded random subset of bigger data sets).
KMEANS_MAX_ROWS = 20_000


# --------------------------------------------------------------------------- kernels


def _scaled_sq_dist(x1, x2, lengthscales):
    """``r^2_ij = sum_d ((x1_id - x2_jd) / l_d)^2`` from explicit differences (exact zeros on
    coincident points, which the ``|a|^2 + |b|^2 - 2ab`` form loses in float32)."""
    diff = (x1[..., :, None, :] - x2[..., None, :, :]) / lengthscales
    return jnp.sum(diff * diff, axis=-1)


def _safe_dist(r2):
    """``sqrt(r2)`` with a zero (not NaN) gradient at ``r2 = 0``."""
    positive = r2 > 0.0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


def rbf_kernel(x1, x2, lengthscales, variance):
    """ARD squared-exponential kernel ``k(x, x') = variance * exp(-r^2 / 2)``, with
    ``r^2 = sum_d (x_d - x'_d)^2 / l_d^2``.

    Parameters
    ----------
    x1 : (n1, D) and x2 : (n2, D) inputs; lengthscales : (D,) or scalar; variance : scalar.

    Returns
    -------
    (n1, n2) Gram matrix.
    """
    return variance * jnp.exp(-0.5 * _scaled_sq_dist(x1, x2, lengthscales))


def matern12_kernel(x1, x2, lengthscales, variance):
    """ARD Matérn 1/2 (exponential) kernel ``variance * exp(-r)`` (Rasmussen & Williams,
    eq. 4.14 with nu = 1/2)."""
    return variance * jnp.exp(-_safe_dist(_scaled_sq_dist(x1, x2, lengthscales)))


def matern32_kernel(x1, x2, lengthscales, variance):
    """ARD Matérn 3/2 kernel ``variance * (1 + sqrt(3) r) exp(-sqrt(3) r)``."""
    s = math.sqrt(3.0) * _safe_dist(_scaled_sq_dist(x1, x2, lengthscales))
    return variance * (1.0 + s) * jnp.exp(-s)


def matern52_kernel(x1, x2, lengthscales, variance):
    """ARD Matérn 5/2 kernel ``variance * (1 + sqrt(5) r + 5 r^2 / 3) exp(-sqrt(5) r)``."""
    r2 = _scaled_sq_dist(x1, x2, lengthscales)
    s = math.sqrt(5.0) * _safe_dist(r2)
    return variance * (1.0 + s + (5.0 / 3.0) * r2) * jnp.exp(-s)


def kernel_diag(x, variance):
    """Diagonal ``k(x_i, x_i) = variance`` of any of the stationary kernels here, (n,)."""
    return jnp.full(jnp.shape(x)[:-1], variance, dtype=jnp.result_type(x, variance))


#: Kernel name to Gram function ``(x1, x2, lengthscales, variance) -> (n1, n2)``.
KERNELS: dict[str, Callable] = {
    "rbf": rbf_kernel,
    "matern12": matern12_kernel,
    "matern32": matern32_kernel,
    "matern52": matern52_kernel,
}

#: Likelihoods :class:`DeepGP` accepts.
LIKELIHOODS = ("gaussian", "bernoulli", "categorical")


@functools.partial(jax.jit, static_argnums=(0, 6))
def _whitened_conditional(kernel_fn, x, z, lengthscales, variance, v, jitter):
    """Moments of ``f(x) | U`` for whitened inducing outputs, without the mean function.

    ``a = L^{-1} k_Z(x)`` with ``L = chol(K_ZZ + j * variance * I)`` (``j`` from
    :func:`_jittered_cholesky`: ``jitter``, raised where round-off needs it); returns the mean
    ``a^T V`` (n, D) and the variance ``k(x, x) - ||a||^2`` (n,), floored at ``j *
    variance`` (the conditional variance of the jittered prior at an inducing input; the
    floor keeps ``sqrt(var)`` differentiable where round-off drives it to 0).
    """
    chol, used = _jittered_cholesky(kernel_fn(z, z, lengthscales, variance), jitter, variance)
    a = jsl.solve_triangular(chol, kernel_fn(z, x, lengthscales, variance), lower=True)  # (M, n)
    mean = a.T @ v
    var = jnp.maximum(kernel_diag(x, variance) - jnp.sum(a * a, axis=0), used * variance)
    return mean, var


#: factors by which the jitter is raised, in turn, when the Cholesky factor is not finite.
JITTER_ESCALATION = (10.0, 100.0)


def _jittered_cholesky(kzz, jitter, variance):
    """``chol(K_ZZ + j * variance * I)`` and ``j``: ``jitter``, else 10x, else 100x it.

    Inducing inputs that drift close together make ``K_ZZ`` singular to float32 round-off,
    and the factor comes back with NaNs (seen on yacht, where the inputs sit on a grid: two
    inducing inputs 0.08 lengthscales apart after 9900 DSVI steps with ``jitter`` 1e-6). As
    GPyTorch's ``psd_safe_cholesky`` does, the jitter is then raised tenfold, twice at most.
    The jitter is chosen on gradient-stopped factors and the one differentiated factor uses
    it: a NaN factor that is only tried never reaches the gradient (a zero cotangent through
    a NaN Cholesky is still NaN). A factor still not finite at 100x is returned as is and
    the loss turns nonfinite, which :func:`bayesgen.fit` reports.
    """
    eye = jnp.eye(kzz.shape[-1], dtype=kzz.dtype)
    fixed = jax.lax.stop_gradient(kzz)
    fixed_variance = jax.lax.stop_gradient(variance)

    def choose(factors):  # the first jitter whose trial factor is finite (the last if none)
        j = jnp.asarray(jitter * factors[0], kzz.dtype)
        if len(factors) == 1:
            return j
        works = jnp.all(jnp.isfinite(jnp.linalg.cholesky(fixed + (j * fixed_variance) * eye)))
        # only a failed trial pays for the next (a real cond: the predicate is parameter-only)
        return jax.lax.cond(works, lambda: j, lambda: choose(factors[1:]))

    used = choose((1.0, *JITTER_ESCALATION))
    return jnp.linalg.cholesky(kzz + (used * variance) * eye), used


# --------------------------------------------------------------------------- inducing inputs


def kmeans_inducing_inputs(x, num_inducing: int, *, seed: int = 0, num_iters: int = 25):
    """Inducing inputs by k-means (Lloyd's algorithm) on the rows of ``x``.

    Starts from ``num_inducing`` distinct rows drawn without replacement (seeded), then
    alternates nearest-centre assignment and centre means ``num_iters`` times; a centre that
    loses all its points stays where it was. Data sets with more than ``KMEANS_MAX_ROWS``
    rows are clustered on a seeded random subset of that many rows.

    Returns
    -------
    (num_inducing, D) float32 numpy array.
    """
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if x.shape[0] > KMEANS_MAX_ROWS:
        x = x[rng.choice(x.shape[0], KMEANS_MAX_ROWS, replace=False)]
    distinct = np.unique(x, axis=0)
    if num_inducing > distinct.shape[0]:
        raise ValueError(
            f"num_inducing={num_inducing} is larger than the {distinct.shape[0]} distinct rows of "
            "the training inputs; use fewer inducing points or pass inducing_init=(M, D) array"
        )
    centres = distinct[rng.choice(distinct.shape[0], num_inducing, replace=False)]
    if num_inducing == distinct.shape[0]:
        return centres.astype(np.float32)
    for _ in range(num_iters):
        d2 = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        nearest = d2.argmin(1)
        counts = np.bincount(nearest, minlength=num_inducing)
        sums = np.zeros_like(centres)
        np.add.at(sums, nearest, x)
        filled = counts > 0
        new = centres.copy()
        new[filled] = sums[filled] / counts[filled, None]
        if np.allclose(new, centres):
            centres = new
            break
        centres = new
    return centres.astype(np.float32)


def _mean_weights(x, dims_in, dims_out):
    """Fixed linear mean functions of the inner layers (Salimbeni & Deisenroth 2017, sec. 5):
    identity if the width is kept, the top right singular vectors of the (uncentred) inputs
    reaching the layer if it narrows, ``[I, 0]`` if it widens. Returns the matrices and the
    training inputs pushed through them."""
    weights = []
    running = np.asarray(x, dtype=np.float64)
    for d_in, d_out in zip(dims_in, dims_out, strict=True):
        if d_in == d_out:
            w = np.eye(d_in)
        elif d_in > d_out:
            _, _, vt = np.linalg.svd(running, full_matrices=False)
            w = vt[:d_out].T
        else:
            w = np.concatenate([np.eye(d_in), np.zeros((d_in, d_out - d_in))], axis=1)
        weights.append(w.astype(np.float32))
        running = running @ w
    return weights


# --------------------------------------------------------------------------- likelihood site


class GaussianExpectedLogLikelihood(dist.Distribution):
    """Observation site of the Gaussian DGP: a Gaussian likelihood with ``f`` integrated out
    inside the log, as the variational bound does.

    For ``f ~ N(loc, f_variance)`` and noise variance ``s^2``,

        log_prob(y) = E_f log N(y; f, s^2)
                    = -0.5 log(2 pi s^2) - ((y - loc)^2 + f_variance) / (2 s^2),

    which is not a normalised density in ``y`` but a lower bound on the log predictive
    density ``log N(y; loc, f_variance + s^2)``. :meth:`sample` draws from that predictive,
    ``y = loc + sqrt(f_variance + s^2) eps``, so ``Predictive`` gives posterior predictive ``y``.
    """

    arg_constraints = {
        "loc": constraints.real,
        "f_variance": constraints.nonnegative,
        "noise_variance": constraints.positive,
    }
    support = constraints.real
    reparametrized_params = ["loc", "f_variance", "noise_variance"]

    def __init__(self, loc, f_variance, noise_variance, *, validate_args=None):
        self.loc, self.f_variance, self.noise_variance = promote_shapes(
            loc, f_variance, noise_variance
        )
        batch_shape = jax.lax.broadcast_shapes(
            jnp.shape(loc), jnp.shape(f_variance), jnp.shape(noise_variance)
        )
        super().__init__(batch_shape=batch_shape, validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        eps = jax.random.normal(key, sample_shape + self.batch_shape)
        return self.loc + jnp.sqrt(self.f_variance + self.noise_variance) * eps

    def log_prob(self, value):
        return -0.5 * (
            jnp.log(2.0 * jnp.pi * self.noise_variance)
            + ((value - self.loc) ** 2 + self.f_variance) / self.noise_variance
        )

    @property
    def mean(self):
        return jnp.broadcast_to(self.loc, self.batch_shape)

    @property
    def variance(self):
        """Variance ``f_variance + s^2`` of the predictive that :meth:`sample` draws from."""
        return jnp.broadcast_to(self.f_variance + self.noise_variance, self.batch_shape)


# --------------------------------------------------------------------------- the model


class DeepGPStructure(NamedTuple):
    """What the jitted propagation and prediction depend on statically: models that share it
    (the splits of one dataset) share their compilations; the rest are arguments."""

    num_layers: int
    kernel_fn: Callable
    jitter: float
    likelihood: str


class DeepGP:
    """A deep GP with whitened inducing outputs as a numpyro model: ``model(x, y=None, *,
    batch_size=None)`` (see the module docstring for the math).

    Built once from the training inputs, which fix the inner mean functions (SVD of ``x``)
    and the initial inducing inputs (k-means). The instance is the model callable; use it
    with any guide: :class:`AutoDSVI` (DSVI's Gaussian ``q``), numpyro's autoguides, or
    bayesgen's guides. Latent sites ``v0, ..., v{L-1}`` of shape ``(M, D_l)``, prior
    ``N(0, I)``. Parameters: ``Z{l}`` (M, D_{l-1}), ``lengthscales{l}`` (D_{l-1},),
    ``kernel_variance{l}`` (scalar) per layer and ``noise_variance`` (Gaussian likelihood).

    Parameters
    ----------
    x : (n, D) training inputs (standardised, as the initial lengthscales assume).
    num_layers : number of GP layers ``L >= 1`` (1 is a sparse variational GP).
    num_inducing : inducing points per layer ``M`` (default 100, or the rows of an array
        ``inducing_init``); must not exceed the number of distinct training rows unless
        ``inducing_init`` is an array.
    hidden_dim : width of the inner layers: an int for all of them, a sequence of
        ``num_layers - 1`` ints, or ``None`` for ``min(30, D)``.
    kernel : ``"rbf"`` (default), ``"matern12"``, ``"matern32"`` or ``"matern52"``; the same
        kind in every layer, with its own parameters per layer.
    likelihood : ``"gaussian"`` (default), ``"bernoulli"`` (labels 0/1, logit link) or
        ``"categorical"`` (labels ``0..num_classes-1``, softmax).
    num_classes : number of classes for ``"categorical"`` (>= 2); not used otherwise.
    inducing_init : ``"kmeans"`` (default), ``"random"`` (distinct training rows drawn at
        random) or an ``(M, D)`` array of initial inducing inputs of the first layer.
    jitter : added to the diagonal of ``K_ZZ`` as ``jitter * kernel variance`` before the
        Cholesky factorisation (default 1e-6); where round-off makes the factor nonfinite
        (a near-singular ``K_ZZ`` in float32) it is raised to 10x, then 100x, for that
        evaluation (``_jittered_cholesky``).
    noise_init : initial Gaussian noise variance (default 0.01).
    lengthscale_init : initial lengthscale of every input dimension, or ``None`` for
        ``sqrt(D_in)`` of each layer.
    kernel_variance_init : initial kernel variance (default 1.0), all layers.
    param_init : ``{name: value}`` initial values (constrained) of some of the parameters,
        ``Z{l}``, ``lengthscales{l}``, ``kernel_variance{l}``, ``noise_variance``, in place
        of the defaults above: to warm-start from another fit, pass
        ``{k: result.params[k] for k in model.param_names}`` of a fitted DeepGP of the same
        layout.
    seed : seed of the k-means / random initialisation of the inducing inputs.
    """

    def __init__(
        self,
        x,
        *,
        num_layers: int = 2,
        num_inducing: int | None = None,
        hidden_dim: int | Sequence[int] | None = None,
        kernel: str = "rbf",
        likelihood: str = "gaussian",
        num_classes: int | None = None,
        inducing_init="kmeans",
        jitter: float = 1e-6,
        noise_init: float = 0.01,
        lengthscale_init: float | None = None,
        kernel_variance_init: float = 1.0,
        param_init: dict | None = None,
        seed: int = 0,
    ):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"x must be a non-empty (n, D) array of training inputs, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x contains NaN or infinite values; clean or impute them first")
        check_int("num_layers", num_layers)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "categorical":
            if num_classes is None:
                raise ValueError(
                    "likelihood='categorical' needs num_classes (the number of labels, >= 2)"
                )
            check_int("num_classes", num_classes, minimum=2)
        elif num_classes is not None and not (likelihood == "bernoulli" and num_classes == 2):
            raise ValueError(
                f"num_classes is only used with likelihood='categorical', got num_classes="
                f"{num_classes!r} with likelihood={likelihood!r}"
            )
        for name, value in (("jitter", jitter), ("noise_init", noise_init),
                            ("kernel_variance_init", kernel_variance_init)):
            check_positive(name, value)
        if noise_init <= NOISE_FLOOR:
            raise ValueError(
                f"noise_init must exceed the noise floor {NOISE_FLOOR}, got {noise_init!r}")
        check_positive("lengthscale_init", lengthscale_init, allow_none=True)

        n, d_in = x.shape
        out_dim = num_classes if likelihood == "categorical" else 1
        if hidden_dim is None:
            hidden = (min(30, d_in),) * (num_layers - 1)
        elif is_int(hidden_dim):
            hidden = (int(hidden_dim),) * (num_layers - 1)
        else:
            try:
                hidden = tuple(hidden_dim)
            except TypeError:
                raise ValueError(
                    f"hidden_dim must be None, an int or a sequence of ints, got {hidden_dim!r}"
                ) from None
            if len(hidden) != num_layers - 1:
                raise ValueError(
                    f"hidden_dim has {len(hidden)} entries but num_layers={num_layers} has "
                    f"{num_layers - 1} inner layers"
                )
        if not all(is_int(h) and h >= 1 for h in hidden):
            raise ValueError(f"hidden_dim must give positive int widths, got {hidden_dim!r}")

        if isinstance(inducing_init, str):
            if inducing_init not in ("kmeans", "random"):
                raise ValueError(
                    "inducing_init must be 'kmeans', 'random' or an (M, D) array, got "
                    f"{inducing_init!r}"
                )
            m = 100 if num_inducing is None else num_inducing
            check_int("num_inducing", m)
            if m > n:
                raise ValueError(
                    f"num_inducing={m} exceeds the {n} training points; pass num_inducing <= {n} "
                    "or an explicit inducing_init=(M, D) array"
                )
            if inducing_init == "kmeans":
                z0 = kmeans_inducing_inputs(x, m, seed=seed)
            else:
                z0 = kmeans_inducing_inputs(x, m, seed=seed, num_iters=0)
        else:
            z0 = np.asarray(inducing_init, dtype=np.float32)
            if z0.ndim != 2 or z0.shape[1] != d_in or z0.shape[0] < 1:
                raise ValueError(
                    f"inducing_init must be an (M, {d_in}) array matching x's {d_in} columns, "
                    f"got shape {z0.shape}"
                )
            if num_inducing is not None and num_inducing != z0.shape[0]:
                raise ValueError(
                    f"num_inducing={num_inducing!r} disagrees with the {z0.shape[0]} rows of "
                    "inducing_init; leave num_inducing unset or make them match"
                )
        m = z0.shape[0]

        self.input_dim = d_in
        self.num_layers = num_layers
        self.num_inducing = m
        self.layer_dims: tuple[int, ...] = (*hidden, out_dim)
        self.input_dims: tuple[int, ...] = (d_in, *hidden)
        self.kernel = kernel
        self.kernel_fn = KERNELS[kernel]
        self.likelihood = likelihood
        self.num_classes = num_classes if likelihood == "categorical" else (
            2 if likelihood == "bernoulli" else None)
        self.jitter = float(jitter)
        self.noise_init = float(noise_init)
        self.kernel_variance_init = float(kernel_variance_init)
        self.lengthscale_init = lengthscale_init
        #: fixed (not learned) mean-function matrices of the inner layers
        self.mean_weights: tuple[np.ndarray, ...] = tuple(
            _mean_weights(x, self.input_dims[:-1], self.layer_dims[:-1])
        )
        inducing = [z0]
        for w in self.mean_weights:
            inducing.append((inducing[-1] @ w).astype(np.float32))
        #: initial inducing inputs of each layer
        self.inducing_init: tuple[np.ndarray, ...] = tuple(inducing)
        self.param_init: dict[str, np.ndarray] = self._checked_param_init(param_init)

    def __repr__(self):
        widths = " -> ".join(str(d) for d in (self.input_dim, *self.layer_dims))
        return (f"DeepGP({widths}, M={self.num_inducing}, kernel={self.kernel!r}, "
                f"likelihood={self.likelihood!r})")

    # --- layout -------------------------------------------------------------------------
    @property
    def structure(self) -> DeepGPStructure:
        """The static part of the model, by which its jitted functions are cached."""
        return DeepGPStructure(self.num_layers, self.kernel_fn, self.jitter, self.likelihood)

    @property
    def start_context(self) -> dict[str, str]:
        """``{"v{l}": "Z{l}"}``: each layer's inducing inputs as the context of its inducing
        outputs, for :class:`bayesgen.AutoDBVI`'s amortised start (``context=...``)."""
        return {f"v{l}": f"Z{l}" for l in range(self.num_layers)}

    @property
    def start_whitening(self) -> dict:
        """``{"v{l}": f}`` with ``f(param)`` the factor ``L = chol(K_ZZ + j I)`` of layer
        ``l`` at its current parameters (``param(name)`` returns a model parameter's value),
        so that ``L v_l`` are the layer's unwhitened inducing outputs: for
        :class:`bayesgen.AutoDBVI`'s start in those coordinates (``start_whitening=...``)."""

        def factor(l):
            def chol(param):
                z, var = param(f"Z{l}"), param(f"kernel_variance{l}")
                kzz = self.kernel_fn(z, z, param(f"lengthscales{l}"), var)
                return _jittered_cholesky(kzz, self.jitter, var)[0]
            return chol

        return {f"v{l}": factor(l) for l in range(self.num_layers)}

    @property
    def latent_shapes(self) -> dict[str, tuple[int, int]]:
        """``{"v0": (M, D_0), ...}``: the latent sites and their shapes."""
        return {f"v{l}": (self.num_inducing, d) for l, d in enumerate(self.layer_dims)}

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the model's ``numpyro.param`` sites."""
        names = []
        for l in range(self.num_layers):
            names += [f"Z{l}", f"lengthscales{l}", f"kernel_variance{l}"]
        if self.likelihood == "gaussian":
            names.append("noise_variance")
        return tuple(names)

    def init_params(self) -> dict[str, np.ndarray]:
        """Initial values of the ``numpyro.param`` sites (constrained)."""
        return {**self._default_params(), **self.param_init}

    def _default_params(self) -> dict[str, np.ndarray]:
        out = {}
        for l in range(self.num_layers):
            d = self.input_dims[l]
            ls = math.sqrt(d) if self.lengthscale_init is None else self.lengthscale_init
            out[f"Z{l}"] = self.inducing_init[l]
            out[f"lengthscales{l}"] = np.full((d,), ls, dtype=np.float32)
            out[f"kernel_variance{l}"] = np.asarray(self.kernel_variance_init, dtype=np.float32)
        if self.likelihood == "gaussian":
            out["noise_variance"] = np.asarray(self.noise_init, dtype=np.float32)
        return out

    def _checked_param_init(self, param_init) -> dict[str, np.ndarray]:
        """``param_init`` as float32 arrays, checked against the parameters' names, shapes
        and constraints (positive lengthscales and variances, noise above the floor)."""
        if param_init is None:
            return {}
        if not isinstance(param_init, dict):
            raise ValueError(f"param_init must be a dict {{name: value}}, got "
                             f"{type(param_init).__name__}")
        defaults = self._default_params()
        unknown = sorted(set(param_init) - set(defaults))
        if unknown:
            raise ValueError(
                f"param_init names {unknown}, which are not parameters of this DeepGP (it has "
                f"{', '.join(defaults)}); from a fit's params take "
                "{k: result.params[k] for k in model.param_names}")
        out = {}
        for name, value in param_init.items():
            value = np.asarray(value, dtype=np.float32)
            if value.shape != np.shape(defaults[name]):
                raise ValueError(f"param_init[{name!r}] has shape {value.shape}; this DeepGP's "
                                 f"{name} has shape {np.shape(defaults[name])}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"param_init[{name!r}] has NaN or infinite values")
            floor = NOISE_FLOOR if name == "noise_variance" else 0.0
            if not name.startswith("Z") and not np.all(value > floor):
                raise ValueError(f"param_init[{name!r}] must be above {floor:g}, got {value}")
            out[name] = value
        return out

    # --- pure pieces shared by the model and the predictions ---------------------------
    def _layer_params(self, params: dict) -> list[tuple]:
        missing = [k for k in self.param_names if k not in params]
        if missing:
            raise ValueError(
                f"params lacks the DeepGP parameters {missing}; pass the fitted params "
                "(result.params or svi.get_params(state)), which hold the model's Z{l}, "
                "lengthscales{l}, kernel_variance{l} and noise_variance"
            )
        return [
            (params[f"Z{l}"], params[f"lengthscales{l}"], params[f"kernel_variance{l}"])
            for l in range(self.num_layers)
        ]

    def propagate(self, layer_params, vs, x, keys):
        """Push inputs through the layers given one set of whitened inducing outputs.

        Inner layers draw one reparameterised sample per row (keys[l] for layer l); the
        last layer's conditional is returned in moments.

        Parameters
        ----------
        layer_params : per layer ``(Z, lengthscales, kernel_variance)``.
        vs : per layer ``V_l`` (M, D_l).
        x : (n, D_0) inputs.
        keys : ``num_layers - 1`` PRNG keys for the inner-layer noise.

        Returns
        -------
        mean (n, D_L) and variance (n,) of ``f_L | F_{L-1}, V``.
        """
        return _propagate(self.structure, layer_params, self.mean_weights, vs, x, keys)

    # --- the numpyro model ----------------------------------------------------------------
    def _check_data(self, x, y, batch_size):
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"x must be a non-empty (n, {self.input_dim}) array (the model was built for "
                f"{self.input_dim} input columns), got shape {x.shape}"
            )
        n = x.shape[0]
        if y is not None:
            if jnp.shape(y) != (n,):
                raise ValueError(f"y must have shape ({n},) to match x, got {jnp.shape(y)}")
            if self.likelihood != "gaussian" and not_jax_tracer(y):
                labels = np.asarray(y)
                k = self.num_classes
                if not (np.all(labels == np.round(labels)) and labels.min() >= 0
                        and labels.max() < k):
                    raise ValueError(
                        f"y must hold integer labels in [0, {k}) for likelihood="
                        f"{self.likelihood!r}, got values in [{labels.min()}, {labels.max()}]; "
                        "recode the labels as 0..num_classes-1"
                    )
        check_int("batch_size", batch_size, maximum=n, allow_none=True)
        return x, n

    def __call__(self, x, y=None, *, batch_size: int | None = None):
        """The numpyro model: ``x`` (n, D) inputs (all of them, also with minibatches),
        ``y`` (n,) targets or labels (``None`` samples them), ``batch_size`` the minibatch
        size of the ``"data"`` plate (``None``: all the data)."""
        x, n = self._check_data(x, y, batch_size)
        init = self.init_params()
        layer_params, vs = [], []
        for l, d_out in enumerate(self.layer_dims):
            z = numpyro.param(f"Z{l}", init[f"Z{l}"])
            ls = numpyro.param(f"lengthscales{l}", init[f"lengthscales{l}"],
                               constraint=constraints.positive)
            var = numpyro.param(f"kernel_variance{l}", init[f"kernel_variance{l}"],
                                constraint=constraints.positive)
            layer_params.append((z, ls, var))
            vs.append(numpyro.sample(
                f"v{l}", dist.Normal(0.0, 1.0).expand([self.num_inducing, d_out]).to_event(2)))
        if self.likelihood == "gaussian":
            noise = numpyro.param("noise_variance", init["noise_variance"],
                                  constraint=constraints.greater_than(NOISE_FLOOR))
        with numpyro.plate("data", n, subsample_size=batch_size):
            x_batch = numpyro.subsample(x, event_dim=1)
            y_batch = None if y is None else numpyro.subsample(jnp.asarray(y), event_dim=0)
            keys = []
            for _ in range(self.num_layers - 1):
                key = numpyro.prng_key()
                keys.append(jax.random.PRNGKey(UNSEEDED_KEY_SEED) if key is None else key)
            mean, var = self.propagate(layer_params, vs, x_batch, keys)
            if self.likelihood == "gaussian":
                numpyro.sample("y", GaussianExpectedLogLikelihood(mean[:, 0], var, noise),
                               obs=y_batch)
                return
            key = numpyro.prng_key()
            key = jax.random.PRNGKey(UNSEEDED_KEY_SEED + 1) if key is None else key
            f = mean + jnp.sqrt(var)[:, None] * jax.random.normal(key, mean.shape, mean.dtype)
            if self.likelihood == "bernoulli":
                numpyro.sample("y", dist.Bernoulli(logits=f[:, 0]), obs=y_batch)
            else:
                numpyro.sample("y", dist.Categorical(logits=f), obs=y_batch)


@functools.partial(jax.jit, static_argnums=0)
def _propagate(model: DeepGPStructure, layer_params, mean_weights, vs, x, keys):
    """:meth:`DeepGP.propagate`, jitted so that eager runs of the model (``svi.init``,
    ``Predictive``, model checks) compile it once rather than op by op. The mean functions'
    weights are an argument, not read from the (static) model, so that fits of several
    splits at once (:func:`bayesgen.bench.dgp.run_dgp_splits`) can pass each its own."""
    h = x
    for l in range(model.num_layers):
        z, ls, var = layer_params[l]
        mean, fvar = _whitened_conditional(model.kernel_fn, h, z, ls, var, vs[l], model.jitter)
        if l == model.num_layers - 1:
            return mean, fvar
        mean = mean + h @ jnp.asarray(mean_weights[l])
        eps = jax.random.normal(keys[l], mean.shape, dtype=mean.dtype)
        h = mean + jnp.sqrt(fvar)[:, None] * eps
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- predictions


class DeepGPPrediction(NamedTuple):
    """Predictions of a :class:`DeepGP` at new inputs from ``S`` posterior draws.

    Attributes
    ----------
    mean, variance : (n,) moment-matched predictive mean and variance of ``y`` (Gaussian
        likelihood; the law of total variance over draws, noise included), or of the latent
        ``f_L`` (n, D_L) for classification.
    samples : (S, n) posterior predictive draws of ``y`` (labels for classification).
    probs : (n, K) predictive class probabilities (classification), else ``None``.
    f_mean, f_var : (S, n, D_L) and (S, n): per-draw moments of ``f_L`` given that draw's
        ``V`` and inner-layer sample.
    noise_variance : the Gaussian noise variance (``None`` for classification).
    """

    mean: jax.Array
    variance: jax.Array
    samples: jax.Array
    probs: jax.Array | None
    f_mean: jax.Array
    f_var: jax.Array
    noise_variance: jax.Array | None


def _stack_draws(model: DeepGP, samples: dict):
    names = list(model.latent_shapes)
    missing = [k for k in names if k not in samples]
    if missing:
        raise ValueError(
            f"samples lacks the latent sites {missing}; pass posterior draws of "
            f"{names} with a leading draw axis (e.g. guide.sample_posterior(key, params, "
            "sample_shape=(S,)) or result.sample(num_samples=S))"
        )
    vs = [jnp.asarray(samples[k]) for k in names]
    s = vs[0].shape[0]
    for k, v in zip(names, vs, strict=True):
        if v.shape != (s, *model.latent_shapes[k]):
            raise ValueError(
                f"samples[{k!r}] must have shape (S, {', '.join(map(str, model.latent_shapes[k]))})"
                f" with the same S for every site, got {v.shape}"
            )
    return vs


def deep_gp_predict(model: DeepGP, samples: dict, params: dict, x_new, *, rng_key,
                    num_propagations: int = 1) -> DeepGPPrediction:
    """Posterior predictive of a fitted :class:`DeepGP` at ``x_new``.

    For each draw ``V^(s)`` (and ``num_propagations`` inner-layer samples per draw; the
    mixture has ``S' = S * num_propagations`` components) the last layer gives
    ``f_L | . ~ N(mu_s(x), v_s(x))``. With a Gaussian likelihood the predictive is the
    mixture ``(1/S') sum_s N(y; mu_s, v_s + s^2)``, summarised by

        mean = (1/S') sum_s mu_s,    variance = (1/S') sum_s (v_s + s^2) + Var_s(mu_s).

    For classification, per-component probabilities at one sample of ``f_L`` (sigmoid or
    softmax) averaged over components.

    Parameters
    ----------
    model : the :class:`DeepGP`.
    samples : latent draws ``{"v0": (S, M, D_0), ...}`` (extra keys are ignored).
    params : fitted parameters holding the model's ``Z{l}``, ``lengthscales{l}``,
        ``kernel_variance{l}`` (and ``noise_variance``), e.g. ``result.params``.
    x_new : (n, D) inputs.
    rng_key : key for the inner-layer samples and the predictive draws.
    num_propagations : inner-layer samples per draw.
    """
    x_new = jnp.asarray(x_new)
    if x_new.ndim != 2 or x_new.shape[1] != model.input_dim:
        raise ValueError(f"x_new must be an (n, {model.input_dim}) array, got shape {x_new.shape}")
    check_int("num_propagations", num_propagations)
    layer_params = model._layer_params(params)
    vs = _stack_draws(model, samples)
    if num_propagations > 1:
        vs = [jnp.repeat(v, num_propagations, axis=0) for v in vs]
    noise = jnp.asarray(params["noise_variance"]) if model.likelihood == "gaussian" else None
    return _predict(model.structure, layer_params, tuple(model.mean_weights), vs, x_new,
                    rng_key, noise)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: DeepGPStructure, layer_params, mean_weights, vs, x_new, rng_key,
             noise) -> DeepGPPrediction:
    """The jitted body of :func:`deep_gp_predict` (one compilation per structure and shape)."""
    s = vs[0].shape[0]
    k_prop, k_obs = jax.random.split(rng_key)
    keys = jax.random.split(k_prop, (s, model.num_layers - 1))  # (S, L - 1) keys

    def one(v_list, k):
        return _propagate(model, layer_params, mean_weights, v_list, x_new, list(k))

    f_mean, f_var = jax.vmap(one)(vs, keys)  # (S, n, D_L), (S, n)
    if model.likelihood == "gaussian":
        mu = f_mean[..., 0]
        mean = mu.mean(0)
        variance = (f_var + noise).mean(0) + mu.var(0)
        y = mu + jnp.sqrt(f_var + noise) * jax.random.normal(k_obs, mu.shape, mu.dtype)
        return DeepGPPrediction(mean, variance, y, None, f_mean, f_var, noise)
    k_f, k_y = jax.random.split(k_obs)
    f = f_mean + jnp.sqrt(f_var)[..., None] * jax.random.normal(k_f, f_mean.shape, f_mean.dtype)
    if model.likelihood == "bernoulli":
        f = jnp.concatenate([jnp.zeros_like(f), f], axis=-1)
    labels = jax.random.categorical(k_y, f, axis=-1)
    f_avg = f_mean.mean(0)
    f_variance = (f_var[..., None] + f_mean**2).mean(0) - f_avg**2
    probs = jax.nn.softmax(f, axis=-1).mean(0)
    return DeepGPPrediction(f_avg, f_variance, labels, probs, f_mean, f_var, None)


def deep_gp_log_predictive_density(prediction: DeepGPPrediction, y_new, *, y_scale: float = 1.0):
    """Per-point log density of the Gaussian predictive mixture at ``y_new`` (n,):

        log p(y_i) = logsumexp_s log N(y_i; mu_s(x_i), v_s(x_i) + s^2) - log S - log(y_scale),

    ``y_scale`` (e.g. ``split.y_std``) gives the density in the original units of
    standardised targets. Classification: ``log p(y_i)`` of the predictive class
    probabilities.
    """
    y_new = jnp.asarray(y_new)
    if y_new.shape != prediction.f_var.shape[1:]:
        raise ValueError(
            f"y_new must have shape {prediction.f_var.shape[1:]} to match the prediction, "
            f"got {y_new.shape}"
        )
    if prediction.noise_variance is None:
        p = jnp.take_along_axis(prediction.probs, y_new.astype(jnp.int32)[:, None], axis=1)[:, 0]
        return jnp.log(p)
    mu = prediction.f_mean[..., 0]
    var = prediction.f_var + prediction.noise_variance
    log_p = -0.5 * (jnp.log(2.0 * jnp.pi * var) + (y_new - mu) ** 2 / var)  # (S, n)
    return jax.nn.logsumexp(log_p, axis=0) - math.log(mu.shape[0]) - math.log(y_scale)


def deep_gp_regression_metrics(prediction: DeepGPPrediction, y_new, *, y_scale: float = 1.0):
    """Test RMSE of the predictive mean and mean test log-likelihood, in original units.

    ``rmse = sqrt(mean_i (y_i - mean_i)^2) * y_scale`` and ``loglik = mean_i`` of
    :func:`deep_gp_log_predictive_density` (UCI protocol: Hernandez-Lobato & Adams 2015;
    Salimbeni & Deisenroth 2017, table 1). Returns ``(rmse, loglik)`` as floats.
    """
    if prediction.noise_variance is None:
        raise ValueError("deep_gp_regression_metrics needs a Gaussian-likelihood prediction")
    loglik = deep_gp_log_predictive_density(prediction, y_new, y_scale=y_scale)
    rmse = jnp.sqrt(jnp.mean((jnp.asarray(y_new) - prediction.mean) ** 2)) * y_scale
    return float(rmse), float(jnp.mean(loglik))


# --------------------------------------------------------------------------- the DSVI guide


class ColumnwiseMultivariateNormal(dist.Distribution):
    """Independent multivariate normals on the columns of an ``(M, D)`` matrix.

    ``V[:, d] ~ N(loc[d], scale_tril[d] scale_tril[d]^T)`` for ``d = 1..D``; ``loc`` is
    ``(..., D, M)`` and ``scale_tril`` ``(..., D, M, M)`` lower triangular, and the event
    is the ``(M, D)`` matrix. Reparameterised sampling ``V[:, d] = loc[d] + L_d eps_d``;
    exact log density ``sum_d log N(V[:, d]; loc[d], L_d L_d^T)``.
    """

    arg_constraints = {"loc": constraints.real_vector, "scale_tril": constraints.lower_cholesky}
    support = constraints.independent(constraints.real, 2)
    reparametrized_params = ["loc", "scale_tril"]

    def __init__(self, loc, scale_tril, *, validate_args=None):
        if jnp.ndim(loc) < 2 or jnp.shape(scale_tril)[-3:] != (*jnp.shape(loc)[-2:],
                                                               jnp.shape(loc)[-1]):
            raise ValueError(
                f"loc must be (..., D, M) and scale_tril (..., D, M, M), got {jnp.shape(loc)} "
                f"and {jnp.shape(scale_tril)}"
            )
        self.loc, self.scale_tril = loc, scale_tril
        d, m = jnp.shape(loc)[-2:]
        batch_shape = jax.lax.broadcast_shapes(jnp.shape(loc)[:-2], jnp.shape(scale_tril)[:-3])
        super().__init__(batch_shape=batch_shape, event_shape=(m, d),
                         validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        shape = sample_shape + self.batch_shape + self.loc.shape[-2:]
        eps = jax.random.normal(key, shape, dtype=self.loc.dtype)
        return _columns_from_white(self.loc, self.scale_tril, eps)

    def log_prob(self, value):
        return _columns_log_prob(self.loc, self.scale_tril, value)

    @property
    def mean(self):
        return jnp.broadcast_to(jnp.swapaxes(self.loc, -1, -2), self.batch_shape + self.event_shape)

    @property
    def variance(self):
        v = jnp.sum(self.scale_tril**2, axis=-1)  # (..., D, M)
        return jnp.broadcast_to(jnp.swapaxes(v, -1, -2), self.batch_shape + self.event_shape)

    def kl_to_standard_normal(self):
        """``KL(q || N(0, I))`` in closed form: ``sum_d 0.5 (tr S_d + |m_d|^2 - M - log|S_d|)``."""
        m = self.loc.shape[-1]
        tr = jnp.sum(self.scale_tril**2, axis=(-2, -1))
        log_det = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1))),
                                axis=-1)
        return jnp.sum(0.5 * (tr + jnp.sum(self.loc**2, -1) - m - log_det), axis=-1)


@jax.jit
def _columns_from_white(loc, scale_tril, eps):
    """``V[:, d] = loc[d] + L_d eps[d]``, returned as the (..., M, D) matrix."""
    return jnp.swapaxes(loc + jnp.einsum("...ij,...j->...i", scale_tril, eps), -1, -2)


@jax.jit
def _columns_log_prob(loc, scale_tril, value):
    """``sum_d log N(value[:, d]; loc[d], L_d L_d^T)``."""
    cols = jnp.swapaxes(value, -1, -2) - loc  # (..., D, M)
    tril = jnp.broadcast_to(scale_tril, cols.shape + cols.shape[-1:])
    white = jsl.solve_triangular(tril, cols[..., None], lower=True)[..., 0]
    m = cols.shape[-1]
    half_log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(scale_tril, axis1=-2, axis2=-1))), -1)
    per_col = -0.5 * jnp.sum(white**2, -1) - half_log_det - 0.5 * m * math.log(2 * math.pi)
    return jnp.sum(per_col, axis=-1)


def _is_standard_normal_matrix(p) -> bool:
    """Whether ``p`` is ``Normal(0, 1).expand([M, D]).to_event(2)`` (the DGP's whitened prior)."""
    if not isinstance(p, dist.Independent) or p.reinterpreted_batch_ndims != 2:
        return False
    base = p.base_dist
    if isinstance(base, dist.ExpandedDistribution):
        base = base.base_dist
    if not isinstance(base, dist.Normal):
        return False
    if not (not_jax_tracer(base.loc) and not_jax_tracer(base.scale)):
        return False
    return bool(np.all(np.asarray(base.loc) == 0) and np.all(np.asarray(base.scale) == 1))


@kl_divergence.register(ColumnwiseMultivariateNormal, dist.Independent)
def _kl_columnwise_standard(q, p):
    if not _is_standard_normal_matrix(p) or q.event_shape != p.event_shape:
        raise NotImplementedError(
            "closed-form KL of ColumnwiseMultivariateNormal is implemented against "
            "Normal(0, 1).expand([M, D]).to_event(2) only"
        )
    return q.kl_to_standard_normal()


class AutoDSVI(AutoGuide):
    """DSVI's Gaussian guide for a :class:`DeepGP`: full-covariance Gaussians per layer and
    output column of the whitened inducing outputs (Salimbeni & Deisenroth 2017, sec. 3).

    For every latent matrix site ``v{l}`` (M, D_l),

        q(V_l[:, d]) = N(m_{l,d}, L_{l,d} L_{l,d}^T),  independent over layers and columns,

    with params ``{site}_{prefix}_loc`` (D, M), initialised to 0, and
    ``{site}_{prefix}_scale_tril`` (D, M, M), lower triangular with a positive diagonal.
    The triangle uses numpyro's ``scaled_unit_lower_cholesky`` parameterisation, ``L =
    diag(s) U`` with ``U`` unit lower triangular and ``s`` through a softplus, so the
    optimiser moves off-diagonal entries relative to their row's scale; this matters when
    the posterior covariance has eigenvalues orders of magnitude apart, as it does for
    well-determined inducing outputs. ``L`` starts at ``init_scale * I`` for the inner
    layers (1e-5, Salimbeni & Deisenroth's choice: the inner layers start as their mean
    functions plus the GP's conditional noise, not as random functions) and at
    ``last_init_scale * I`` for the last layer (1.0, the whitened prior).

    The log density is exact, so ``Trace_ELBO`` gives the DSVI bound with a Monte Carlo KL;
    :meth:`default_loss` (what :func:`bayesgen.fit` uses) is ``TraceMeanField_ELBO``, which
    takes ``KL(q || N(0, I))`` in closed form as DSVI does.

    Works with any model whose latent sites are real ``(M, D)`` matrices outside all
    plates; the "last layer" is the last such site in the model's order.

    Parameters
    ----------
    model : the :class:`DeepGP` (or a ``functools.partial`` of it).
    prefix : prefix of the guide's param names.
    init_scale : initial ``L`` diagonal of the inner layers.
    last_init_scale : initial ``L`` diagonal of the last layer.
    """

    def __init__(self, model, *, prefix: str = "dsvi", init_scale: float = 1e-5,
                 last_init_scale: float = 1.0):
        check_positive("init_scale", init_scale)
        check_positive("last_init_scale", last_init_scale)
        self.init_scale = float(init_scale)
        self.last_init_scale = float(last_init_scale)
        self._site_shapes: dict[str, tuple[int, int]] = {}
        super().__init__(model, prefix=prefix)

    def default_loss(self, num_particles: int = 1):
        """``TraceMeanField_ELBO``: the ELBO with the KL to the prior in closed form."""
        return TraceMeanField_ELBO(num_particles=num_particles)

    def _setup_prototype(self, *args, **kwargs):
        key = numpyro.prng_key()
        key = jax.random.PRNGKey(0) if key is None else key
        with handlers.block():
            self.prototype_trace = handlers.trace(handlers.seed(self.model, key)).get_trace(
                *args, **kwargs)
        shapes = {}
        for name, site in self.prototype_trace.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if site.get("infer", {}).get("is_auxiliary"):
                continue
            fn = site["fn"]
            shape = tuple(fn.event_shape)
            support = fn.support
            real_matrix = (
                isinstance(support, constraints.independent)
                and support.base_constraint is constraints.real
                and support.reinterpreted_batch_ndims == 2
            )
            if len(shape) != 2 or tuple(fn.batch_shape) != () or not real_matrix:
                raise ValueError(
                    f"AutoDSVI covers real (M, D) matrix sites outside plates (the whitened "
                    f"inducing outputs of a DeepGP); site '{name}' has batch shape "
                    f"{tuple(fn.batch_shape)}, event shape {shape} and support {support}. "
                    "Use another guide for this model."
                )
            shapes[name] = shape
        if not shapes:
            raise ValueError("AutoDSVI found no latent site in the model")
        self._site_shapes = shapes

    def _init_scale_of(self, name) -> float:
        return self.last_init_scale if name == list(self._site_shapes)[-1] else self.init_scale

    def _posterior_of(self, name, params=None):
        m, d = self._site_shapes[name]
        loc_name, tril_name = f"{name}_{self.prefix}_loc", f"{name}_{self.prefix}_scale_tril"
        if params is None:
            loc = numpyro.param(loc_name, jnp.zeros((d, m)))
            tril = numpyro.param(
                tril_name, jnp.broadcast_to(self._init_scale_of(name) * jnp.eye(m), (d, m, m)),
                constraint=constraints.scaled_unit_lower_cholesky)
        else:
            loc, tril = params[loc_name], params[tril_name]
        return ColumnwiseMultivariateNormal(loc, tril)

    def __call__(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return {name: numpyro.sample(name, self._posterior_of(name)) for name in self._site_shapes}

    def _check_ready(self):
        if self.prototype_trace is None:
            raise RuntimeError(
                "AutoDSVI has not seen the model yet: run svi.init (or bayesgen.fit) first")

    def get_posterior(self, params) -> dict[str, ColumnwiseMultivariateNormal]:
        """Site name to its fitted ``q`` (a :class:`ColumnwiseMultivariateNormal`)."""
        self._check_ready()
        return {name: self._posterior_of(name, params) for name in self._site_shapes}

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        self._check_ready()
        keys = jax.random.split(rng_key, len(self._site_shapes))
        return {
            name: self._posterior_of(name, params).sample(k, tuple(sample_shape))
            for name, k in zip(self._site_shapes, keys, strict=True)
        }

    def median(self, params):
        self._check_ready()
        return {name: self._posterior_of(name, params).mean for name in self._site_shapes}

    def quantiles(self, params, quantiles):
        self._check_ready()
        q = jnp.asarray(quantiles)
        out = {}
        for name in self._site_shapes:
            post = self._posterior_of(name, params)
            z = jax.scipy.stats.norm.ppf(q).reshape((-1, 1, 1))
            out[name] = post.mean + z * jnp.sqrt(post.variance)
        return out
