"""LIVI: an implicit generator family with a linearised entropy (Uppal et al., NeurIPS 2023).

The family, in the whitened coordinates ``w`` of a fixed preconditioner (``z = m0 + L0 w``),

    eps ~ N(0, I_m),   xi ~ N(0, I_d),   w = g(eps) + sigma xi,   m <= d,

pushes low-dimensional noise through a generator network ``g: R^m -> R^d`` and adds a small
isotropic output noise ``sigma`` (the paper's default 1e-3 relative to the unit whitened
scale). Its density ``q(w) = E_eps N(w; g(eps), sigma^2 I)`` has no closed form.

The surrogate log-density (LIVI's local linearisation)
    Around a draw, ``g(eps') ~ g(eps) + J (eps' - eps)`` with ``J = dg/deps`` (d x m), so
    locally ``w`` is Gaussian with covariance ``J J^T + sigma^2 I_d``. By Sylvester's
    determinant identity ``det(J J^T + sigma^2 I_d) = sigma^{2(d-m)} det(J^T J + sigma^2 I_m)``,
    and the surrogate of a draw is

        log q~(z) = log N(eps; 0, I_m) - 1/2 log det(J^T J + sigma^2 I_m)
                    - (d - m) (log sigma + 1/2 log(2 pi e)) - sum log|diag L0|.

    *Exact special case.* For a linear generator ``g(eps) = A eps + b`` the family is
    ``N(b, A A^T + sigma^2 I)`` and ``E[-log q~] = m/2 log(2 pi e) + 1/2 log det(A^T A +
    sigma^2 I_m) + (d - m)(log sigma + 1/2 log(2 pi e)) + log|det L0|``, which by the identity
    above is exactly ``1/2 log det(2 pi e (A A^T + sigma^2 I_d)) + log|det L0| = H[q]``, for any
    ``m <= d`` (the value of the surrogate varies per draw, its mean is the entropy; for
    ``m = d`` and ``sigma -> 0`` the log-determinant term itself is the same for every draw).
    *In general* the surrogate ignores the curvature of ``g`` and its folds (a non-injective
    ``g`` double-counts density), and is good only for small ``sigma``: it gives **no bound**
    on the entropy or the ELBO, hence ``density = "approximate"``. Anything that needs log q
    itself must use :meth:`LinearisedImplicit.log_importance_density`.

Two ways to compute ``1/2 log det(J^T J + sigma^2 I_m) = 1/2 sum_i log(s_i^2 + sigma^2)``
    (``s_i`` the singular values of J):

    ``"exact"``
        forms J by forward mode (m Jacobian-vector products) and takes its singular values.
        The values-only SVD has a well-defined gradient also for repeated singular values.
    ``"matrix_free"`` (the paper's scalable approximation)
        replaces the sum by ``m/2 log(s_min^2 + sigma^2)``, with ``s_min`` found by a few
        iterations of a LOBPCG-like Rayleigh-Ritz iteration on ``J^T J`` (subspace: the
        iterate, its residual, the previous search direction) from a random start, using
        ``J v`` (``jax.linearize``) and ``J^T u`` (its transpose) only: no Jacobian is
        formed. The iterate is ``stop_gradient``-ed and only the final ``||J v||`` carries a
        gradient, which is exact at an eigenvector (Hellmann-Feynman). Since
        ``sum_i log s_i >= m log s_min``, the term under-credits the entropy when J's
        spectrum is spread (with the exact ``s_min`` it is a lower bound on the entropy term;
        equality when all singular values are equal); a few iterations over-estimate
        ``s_min`` (a Rayleigh quotient is never below the smallest eigenvalue), which moves
        the term back up slightly. When the generator ends in a linear layer ``H`` (the
        matrix generator), ``J = H J_features`` and the iteration runs in the small feature
        space with ``H^T H`` applied through the layer's factors (``linear_head``): no
        output-sized tangent is formed, with the same values and gradients.
    ``"auto"``
        exact when ``m <= 64`` and ``d m <= 2^20``, else matrix-free. Forming J costs m
        linearised passes of the generator against about ``2 num_iterations + 3`` for the
        matrix-free term (about 9 at the default 3 iterations), so exact costs at most ~7x
        more passes at m = 64, and ``d m <= 2^20`` keeps the per-draw Jacobian (4 MiB in
        float32) and its O(d m^2) SVD small.

Honest diagnostics (``log_importance_density``)
    The family is semi-implicit: ``w | eps ~ N(g(eps), sigma^2 I_d)``. On the extended space
    of ``(z, eps_0, eps_1..K)``, with ``eps_0`` the generating noise and ``eps_1..K`` fresh
    draws, ``log q^_K(z) = log 1/(K+1) sum_{k=0..K} q(z | eps_k)`` gives importance weights
    ``p(x, z) / q^_K(z)`` whose expectation is exactly ``p(x)`` for every K: the weight is
    symmetric in the K+1 noises, so its expectation is the same under the symmetrised
    proposal ``q^_K(z) prod_k N(eps_k)``, under which it integrates to ``p(x)``. Without
    ``eps_0`` the weights are biased upward (Jensen), badly so for small sigma. Shared with
    :mod:`bayesgen.families.semi_implicit` (``mixture_log_density``).

    With fresh draws from the prior N(0, I) and a small sigma, the mixture is dominated by
    ``eps_0``'s spike: the weights stay unbiased but their variance is so large that a good
    fit is reported as unreliable (k-hat near 1 at the paper's sigma = 1e-3). The default
    proposal on small models is therefore a **Laplace reverse model** (IWHVI, Sobolev &
    Vetrov 2019, with a reverse model computed rather than learned): the fresh draws come
    from ``r(eps | w) = N(eps*(w), sigma^2 (J^T J + sigma^2 I_m)^{-1})``, the Gauss-Newton
    Laplace approximation of ``q(eps | w) ∝ N(eps; 0, I) N(w; g(eps), sigma^2 I)`` at its
    mode ``eps*(w)``, and each term is importance-weighted:

        log q^_K(w) = log 1/(K+1) sum_{k=0..K} q(w | eps_k) N(eps_k; 0, I) / r(eps_k | w).

    The weights ``p / q^_K`` keep expectation exactly ``p(x)`` for any ``r`` that depends on
    ``w`` alone, which is why the mode search starts from ``eps = 0`` (the first Gauss-Newton
    step is the linearisation there) and never from the generating draw. For a linear
    generator ``r`` is the exact ``q(eps | w)`` and ``q^_K(w) = q(w)`` for every K; for a
    one-to-one generator and small sigma it is nearly exact. Where the search misses the
    preimage (a folded generator, several preimages) the generating draw's term dominates
    and the k-hat says so. The search needs the dense Jacobian (d x m), so ``"auto"`` uses it
    up to ``d m <= 2^16`` and the prior draws above.

Generators (flax nnx, built eagerly)
    :class:`MLPGenerator` for small d (residual: a learned linear embedding plus an MLP whose
    output layer starts at zero, so the untrained family is exactly Gaussian) and
    :class:`MatrixGenerator` for large d (the paper's matrix-multiplication layers
    ``X -> act(W_l X W_r + B)``, with O(a c + b e) weights per layer besides the bias).

References
----------
Uppal, Stensbo-Smidt, Boomsma & Frellsen, "Implicit variational inference for
high-dimensional posteriors", NeurIPS 2023.
Sobolev & Vetrov, "Importance weighted hierarchical variational inference", NeurIPS 2019.
Knyazev, "Toward the optimal preconditioned eigensolver: locally optimal block
preconditioned conjugate gradient method", SIAM J. Sci. Comput. 23, 2001 (LOBPCG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr
from flax import nnx

from bayesgen.errors import check_int, check_positive
from bayesgen.families.base import Family, WhitenedCoordinates, check_latent
from bayesgen.families.semi_implicit import mixture_log_density, proposal_mixture_log_density
from bayesgen.nn import MLP, zero_last_layer

__all__ = [
    "ENTROPY_METHODS",
    "check_matrix_shapes",
    "default_matrix_shapes",
    "LinearisedImplicit",
    "MLPGenerator",
    "MatrixGenerator",
    "MatrixLayer",
    "IMPORTANCE_PROPOSALS",
    "gram_half_log_det_exact",
    "laplace_reverse",
    "laplace_mixture_log_density",
    "gram_half_log_det_matrix_free",
    "resolve_entropy_method",
    "smallest_singular_value",
]

ENTROPY_METHODS = ("auto", "exact", "matrix_free")
#: ``entropy="auto"`` is exact up to this noise dimension ...
EXACT_MAX_NOISE_DIM = 64
#: ... and up to this many Jacobian entries per draw (d * m).
EXACT_MAX_JACOBIAN_SIZE = 2**20

_LOG_2PI_E = math.log(2.0 * math.pi) + 1.0
_LOG_2PI = math.log(2.0 * math.pi)

IMPORTANCE_PROPOSALS = ("auto", "laplace", "prior")
#: ``importance_proposal="auto"`` is the Laplace reverse model up to this many Jacobian
#: entries per draw (d * m), the prior draws above.
LAPLACE_MAX_JACOBIAN_SIZE = 2**16
#: Gauss-Newton iterations of the Laplace reverse model's mode search.
LAPLACE_ITERATIONS = 20
#: step fractions tried by the Gauss-Newton line search (0: stay).
_LINE_SEARCH = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
#: the s_min iteration is unrolled up to this many iterations, a loop above.
_MAX_UNROLLED_ITERATIONS = 8


# --------------------------------------------------------------------------- the entropy term


def gram_half_log_det_exact(generator: Callable, eps, sigma):
    """``1/2 log det(J^T J + sigma^2 I_m)`` with ``J = dg/deps`` (d, m) formed by forward mode.

    Parameters
    ----------
    generator : ``eps (m,) -> (d,)``, m <= d.
    eps : (m,) one noise draw.
    sigma : output noise (scalar).

    Returns
    -------
    ``1/2 sum_i log(s_i^2 + sigma^2)`` over the m singular values of J (differentiable).
    """
    jac = jax.jacfwd(generator)(eps)
    s = jnp.linalg.svd(jac, compute_uv=False)
    return 0.5 * jnp.sum(jnp.log(s * s + sigma * sigma))


def _safe_normalise(x):
    norm = jnp.linalg.norm(x)
    ok = norm > 0
    return jnp.where(ok, x / jnp.where(ok, norm, 1.0), 0.0), norm


def _gram(vectors):
    """Matrix of inner products of a few vectors (no stacking: each vector may be long)."""
    k = len(vectors)
    rows = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = jnp.vdot(vectors[i], vectors[j])
    return jnp.array(rows)


def _combine(coefs, vectors):
    out = coefs[0] * vectors[0]
    for c, x in zip(coefs[1:], vectors[1:], strict=True):
        out = out + c * x
    return out


def _rayleigh_ritz_smallest(basis_gram, image_gram, rel_tol):
    """Coefficients ``c`` minimising ``c^T A c / c^T B c`` (``B`` basis Gram, ``A`` image Gram).

    The basis may be rank deficient: directions of ``B`` with eigenvalue below ``rel_tol``
    times the largest are left out (pushed to the top of the spectrum), so they are never
    chosen. (Dense ``eigh`` of the 3 x 3 matrices: a cyclic-Jacobi replacement written to
    fuse on GPU was measured slower at 17M weights, and as scalar code it took minutes to
    compile.)
    """
    lam, vecs = jnp.linalg.eigh(basis_gram)
    keep = lam > rel_tol * lam[-1]
    inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    whiten = vecs * inv_sqrt  # columns: B-orthonormal directions spanning the kept subspace
    proj = whiten.T @ image_gram @ whiten
    penalty = 1.0 + 2.0 * jnp.trace(jnp.abs(proj))
    proj = proj + jnp.diag(jnp.where(keep, 0.0, penalty))
    _, ritz_vecs = jnp.linalg.eigh(proj)
    return whiten @ ritz_vecs[:, 0]


def smallest_singular_value(
    generator: Callable, eps, key, num_iterations: int = 3, *, linearised=None, head_gram=None
):
    """Smallest singular value of ``J = dg/deps`` by a matrix-free LOBPCG-like iteration.

    Minimises the Rayleigh quotient ``||J v||^2 / ||v||^2`` of ``J^T J`` over the subspace
    ``[v, r, p]`` (the iterate, its residual ``J^T J v - rho v`` and the previous search
    direction), ``num_iterations`` times from a random unit ``v``. Each iteration costs one
    ``J^T u`` and one ``J v``; images of the subspace are carried by linearity. The iterate is
    stop-gradient-ed; the returned value ``||J v||`` is differentiable in ``eps`` and in the
    generator's parameters, and its gradient is the gradient of ``s_min`` when ``v`` is the
    exact singular vector (Hellmann-Feynman).

    Parameters
    ----------
    generator : ``eps (m,) -> array``.
    eps : (m,) the point where J is taken.
    key : PRNG key for the random start.
    num_iterations : Rayleigh-Ritz iterations (the paper uses 3-5).
    linearised : optional ``(generator(eps), jvp_fn)`` from ``jax.linearize``, to share the
        linearisation with the caller.
    head_gram : optional ``u -> H^T H u`` for a linear map ``H`` applied after
        ``generator``: the singular values are then those of ``H J`` (inner products of
        images are ``<u, H^T H w>``). With ``generator`` the features of a network whose last
        layer ``H`` is linear, the iteration runs in the (small) feature space and never
        touches the (large) output; see :meth:`MatrixGenerator.head_gram`.

    Returns
    -------
    ``(s_min, v)``: the Rayleigh-quotient estimate (never below the true smallest singular
    value, up to rounding) and the unit right singular vector estimate (no gradient).
    """
    check_int("num_iterations", num_iterations)
    if linearised is None:
        linearised = jax.linearize(generator, eps)
    out, jvp_fn = linearised
    sg = jax.lax.stop_gradient
    transpose = jax.linear_transpose(jvp_fn, eps)
    gram_op = head_gram if head_gram is not None else (lambda u: u)

    def image(v):  # (J v, H^T H J v) in the generator's output space, no gradient
        t = sg(jvp_fn(sg(v)))
        return t, (sg(gram_op(t)) if head_gram is not None else t)

    def pull_back(u):
        return sg(transpose(sg(u))[0])

    def image_gram(images):
        ts, gts = zip(*images, strict=True)
        k = len(ts)
        rows = [[None] * k for _ in range(k)]
        for i in range(k):
            for j in range(i, k):
                rows[i][j] = rows[j][i] = jnp.vdot(ts[i], gts[j])
        return jnp.array(rows)

    def combine_images(coefs, images):
        ts, gts = zip(*images, strict=True)
        t = _combine(coefs, ts)
        return t, (_combine(coefs, gts) if head_gram is not None else t)

    def scale_image(img, factor):
        t = img[0] * factor
        return t, (img[1] * factor if head_gram is not None else t)

    m = eps.shape[-1]
    rel_tol = 100.0 * float(jnp.finfo(out.dtype).eps)
    v, _ = _safe_normalise(jr.normal(key, (m,), dtype=out.dtype))
    img_v = image(v)
    p = jnp.zeros_like(v)  # no search direction yet
    img_p = scale_image(img_v, 0.0)
    def iterate(carry, _):
        v, img_v, p, img_p = carry
        rho = jnp.vdot(img_v[0], img_v[1])
        r, _ = _safe_normalise(pull_back(img_v[1]) - rho * v)
        img_r = image(r)
        basis, images = (v, r, p), (img_v, img_r, img_p)
        c = _rayleigh_ritz_smallest(_gram(basis), image_gram(images), rel_tol)
        v_new, img_new = _combine(c, basis), combine_images(c, images)
        scale = jnp.linalg.norm(v_new)
        p_new, img_p_new = _combine(c[1:], basis[1:]), combine_images(c[1:], images[1:])
        p_norm = jnp.linalg.norm(p_new)
        p_scale = jnp.where(p_norm > 0, 1.0 / jnp.where(p_norm > 0, p_norm, 1.0), 0.0)
        v, img_v = v_new / scale, scale_image(img_new, 1.0 / scale)
        p, img_p = p_new * p_scale, scale_image(img_p_new, p_scale)
        return (v, img_v, p, img_p), None

    carry = (v, img_v, p, img_p)
    if num_iterations <= _MAX_UNROLLED_ITERATIONS:
        # Unrolled: the long vectors are never stacked or looped over, so XLA fuses the
        # combinations and Gram products, and a GPU needs no host round trip per iteration.
        for _ in range(num_iterations):
            carry, _ = iterate(carry, None)
    else:  # many iterations (accuracy checks): a loop keeps the program small
        carry, _ = jax.lax.scan(iterate, carry, None, length=num_iterations)
    v = carry[0]
    v = sg(v)
    t = jvp_fn(v)  # differentiable in eps and the parameters
    if head_gram is None:
        return jnp.linalg.norm(t), v
    return jnp.sqrt(jnp.maximum(jnp.vdot(t, head_gram(t)), 0.0)), v


def gram_half_log_det_matrix_free(
    generator: Callable, eps, sigma, key, num_iterations: int = 3, *, linearised=None,
    head_gram=None,
):
    """LIVI's matrix-free ``m/2 log(s_min^2 + sigma^2)`` for ``1/2 log det(J^T J + sigma^2 I_m)``.

    ``s_min`` from :func:`smallest_singular_value` (``head_gram`` as there). With the exact
    ``s_min`` this is a lower bound on the log-determinant term (equal when all singular
    values of J are equal).
    """
    s_min, _ = smallest_singular_value(
        generator, eps, key, num_iterations, linearised=linearised, head_gram=head_gram
    )
    return 0.5 * eps.shape[-1] * jnp.log(s_min * s_min + sigma * sigma)


def resolve_entropy_method(entropy: str, latent_dim: int, noise_dim: int) -> str:
    """``"exact"`` or ``"matrix_free"`` for ``entropy`` (``"auto"``: the module's rule)."""
    if entropy not in ENTROPY_METHODS:
        raise ValueError(f"entropy must be one of {ENTROPY_METHODS}, got {entropy!r}")
    if entropy != "auto":
        return entropy
    small = noise_dim <= EXACT_MAX_NOISE_DIM and latent_dim * noise_dim <= EXACT_MAX_JACOBIAN_SIZE
    return "exact" if small else "matrix_free"


# --------------------------------------------------------------------------- the family


# --------------------------------------------------------------------------- the reverse model


def laplace_reverse(
    generator: Callable, w, sigma, noise_dim: int, num_iterations: int = LAPLACE_ITERATIONS
):
    """Gauss-Newton Laplace approximation of LIVI's reverse conditional ``q(eps | w)``.

    ``q(eps | w) ∝ N(eps; 0, I) N(w; g(eps), sigma^2 I)``.

    Minimises ``E(eps) = 1/2 ||w - g(eps)||^2 + sigma^2/2 ||eps||^2`` (sigma^2 times the
    negative log of the unnormalised ``q(eps | w)``) by Gauss-Newton steps ``(J^T J +
    sigma^2 I) delta = J^T (w - g) - sigma^2 eps`` with a backtracking choice among
    ``_LINE_SEARCH`` fractions, from ``eps = 0``: a deterministic function of ``w``, as the
    reverse model of an importance weight must be.

    Parameters
    ----------
    generator : ``eps (m,) -> (d,)``.
    w : one point (d,) in the generator's output space.
    sigma : the output noise (scalar).
    noise_dim : m.
    num_iterations : Gauss-Newton steps.

    Returns
    -------
    ``(loc, chol)``: the mode ``eps*`` (m,) and the lower Cholesky factor ``L`` (m, m) of
    ``J^T J + sigma^2 I`` at it; the reverse model is ``N(loc, sigma^2 (L L^T)^{-1})``.
    """
    sigma2 = sigma * sigma

    def energy(eps):
        r = w - generator(eps)
        return 0.5 * jnp.sum(r * r) + 0.5 * sigma2 * jnp.sum(eps * eps)

    def gram(eps):  # g(eps), J (d, m) and J^T J + sigma^2 I from one forward-mode pass
        jac, out = jax.jacfwd(lambda e: (lambda o: (o, o))(generator(e)), has_aux=True)(eps)
        return out, jac, jac.T @ jac + sigma2 * jnp.eye(eps.shape[-1], dtype=jac.dtype)

    def step(eps, _):
        out, jac, a = gram(eps)
        b = jac.T @ (w - out) - sigma2 * eps
        delta = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a, lower=True), b)
        candidates = eps + jnp.asarray(_LINE_SEARCH, eps.dtype)[:, None] * delta
        values = jax.vmap(energy)(candidates)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        return candidates[jnp.argmin(values)], None

    eps = jnp.zeros((noise_dim,), w.dtype)
    eps, _ = jax.lax.scan(step, eps, None, length=num_iterations)
    return eps, jnp.linalg.cholesky(gram(eps)[2])


def laplace_mixture_log_density(
    key, w, log_conditional: Callable, eps0, loc, chol, sigma, num_mixing: int, *,
    chunk_size: int = 256,
):
    """IWHVI's estimate (``proposal_mixture_log_density``) with the Laplace reverse model.

    ``r(. | w) = N(loc, sigma^2 (L L^T)^{-1})`` with ``L = chol`` (from
    :func:`laplace_reverse`); ``w`` (d,) and ``eps0`` (m,) are one draw and its generating
    noise; ``log_conditional(w, eps)`` returns ``log q(w | eps)`` for eps (n, m).
    """
    m = loc.shape[-1]
    log_norm = jnp.sum(jnp.log(jnp.diagonal(chol))) - m * jnp.log(sigma) - 0.5 * m * _LOG_2PI

    def draw(k, n):  # loc + sigma L^{-T} noise: covariance sigma^2 (L L^T)^{-1}
        noise = jr.normal(k, (n, m), loc.dtype)
        return loc + sigma * jax.scipy.linalg.solve_triangular(chol, noise.T, lower=True,
                                                               trans="T").T

    def log_proposal(eps):
        u = (eps - loc) @ chol / sigma  # rows of L^T (eps - loc) / sigma
        return log_norm - 0.5 * jnp.sum(u * u, axis=-1)

    return proposal_mixture_log_density(key, w, log_conditional, eps0, draw, log_proposal,
                                        num_mixing, chunk_size=chunk_size)


class LinearisedImplicit(WhitenedCoordinates, Family):
    """LIVI's family: ``z = m0 + L0 (g(eps) + sigma xi)`` with the linearised surrogate density.

    Parameters
    ----------
    generator : ``eps (m,) -> (d,)`` (one draw; the family vmaps), parameters closed over.
    noise_dim : m <= d, the dimension of ``eps``.
    output_noise : sigma > 0 (scalar; may be a learned parameter).
    precond_loc, precond_scale : the fixed preconditioner ``(m0, L0)``; ``L0`` a (d,) positive
        vector or a (d, d) lower triangular matrix (gradients stopped).
    entropy : ``"auto"`` (default), ``"exact"`` or ``"matrix_free"`` (module docstring).
    num_iterations : Rayleigh-Ritz iterations for the matrix-free ``s_min``.
    linear_head : optional ``(features, head, head_gram)`` with ``generator = head o
        features``, ``head`` affine and ``head_gram(u) = H^T H u`` for its linear part ``H``
        (:class:`MatrixGenerator` provides them). The matrix-free iteration then runs in the
        feature space (``J = H J_features``) and never forms an output-sized tangent; the
        values are the same.
    importance_proposal : where ``log_importance_density`` draws its K fresh noises:
        ``"laplace"`` (the Gauss-Newton Laplace reverse model, dense Jacobian), ``"prior"``
        (N(0, I)) or ``"auto"`` (default: ``"laplace"`` up to ``d m <= 2^16``).

    Notes
    -----
    ``sample_with_intermediates`` returns ``(z, [surrogate_log_q, eps])``; ``log_prob`` with
    those intermediates returns the surrogate (``density = "approximate"``: exact in
    expectation for a linear generator, no guarantee otherwise).
    """

    density: ClassVar[str] = "approximate"

    def __init__(
        self,
        generator: Callable,
        noise_dim: int,
        output_noise,
        precond_loc,
        precond_scale,
        *,
        entropy: str = "auto",
        num_iterations: int = 3,
        linear_head=None,
        importance_proposal: str = "auto",
        validate_args=None,
    ):
        latent_dim = int(jnp.shape(precond_loc)[-1])
        if importance_proposal not in IMPORTANCE_PROPOSALS:
            raise ValueError(
                f"importance_proposal must be one of {IMPORTANCE_PROPOSALS}, got "
                f"{importance_proposal!r}"
            )
        if linear_head is not None and (
            len(linear_head) != 3 or not all(callable(f) for f in linear_head)
        ):
            raise ValueError(
                "linear_head must be a (features, head, head_gram) triple of callables, got "
                f"{linear_head!r}"
            )
        check_int("noise_dim", noise_dim)
        if noise_dim > latent_dim:
            raise ValueError(
                f"noise_dim={noise_dim} exceeds the latent dimension {latent_dim}: LIVI's "
                "linearised entropy needs m <= d (a generator R^m -> R^d with m > d cannot be "
                "injective, and J^T J is singular); use noise_dim <= latent dimension"
            )
        check_int("num_iterations", num_iterations)
        sigma = jnp.asarray(output_noise)
        if sigma.ndim != 0:
            raise ValueError(f"output_noise must be a scalar, got shape {sigma.shape}")
        check_positive("output_noise", sigma)
        self.generator = generator
        self.noise_dim = noise_dim
        self.output_noise = sigma
        self.entropy_method = resolve_entropy_method(entropy, latent_dim, noise_dim)
        self.num_iterations = num_iterations
        self.linear_head = linear_head
        if importance_proposal == "auto":
            small = latent_dim * noise_dim <= LAPLACE_MAX_JACOBIAN_SIZE
            importance_proposal = "laplace" if small else "prior"
        self.importance_proposal = importance_proposal
        self.precond_loc = jax.lax.stop_gradient(precond_loc)
        self.precond_scale = jax.lax.stop_gradient(precond_scale)
        if jnp.shape(precond_scale) not in ((latent_dim,), (latent_dim, latent_dim)):
            raise ValueError(
                f"precond_scale must have shape ({latent_dim},) or ({latent_dim}, {latent_dim}), "
                f"got {jnp.shape(precond_scale)}"
            )
        super().__init__(latent_dim, validate_args=validate_args)

    # --- the surrogate ------------------------------------------------------------------------
    def _draw_one(self, eps, xi, key):
        sigma = self.output_noise
        if self.entropy_method == "exact":
            out = self.generator(eps)
            half_log_det = gram_half_log_det_exact(self.generator, eps, sigma)
        elif self.linear_head is not None:
            features, head, head_gram = self.linear_head
            linearised = jax.linearize(features, eps)
            out = head(linearised[0])
            half_log_det = gram_half_log_det_matrix_free(
                features, eps, sigma, key, self.num_iterations, linearised=linearised,
                head_gram=head_gram,
            )
        else:
            linearised = jax.linearize(self.generator, eps)
            out = linearised[0]
            half_log_det = gram_half_log_det_matrix_free(
                self.generator, eps, sigma, key, self.num_iterations, linearised=linearised
            )
        return out + sigma * xi, half_log_det

    def _surrogate_constant(self):
        d, m = self.latent_dim, self.noise_dim
        return (d - m) * (jnp.log(self.output_noise) + 0.5 * _LOG_2PI_E) + self._log_det_precond()

    def sample_with_intermediates(self, key, sample_shape=()):
        k_eps, k_xi, k_iter = jr.split(key, 3)
        shape = tuple(sample_shape) + self.batch_shape
        eps = jr.normal(k_eps, shape + (self.noise_dim,))
        xi = jr.normal(k_xi, shape + (self.latent_dim,))
        flat_eps = eps.reshape((-1, self.noise_dim))
        flat_xi = xi.reshape((-1, self.latent_dim))
        if flat_eps.shape[0] == 1:  # one draw (each particle under Trace_ELBO): no vmap,
            w, half_log_det = self._draw_one(flat_eps[0], flat_xi[0], k_iter)  # which copies
        else:
            keys = jr.split(k_iter, flat_eps.shape[0])
            w, half_log_det = jax.vmap(self._draw_one)(flat_eps, flat_xi, keys)
        w = w.reshape(shape + (self.latent_dim,))
        log_base = -0.5 * jnp.sum(eps * eps, axis=-1) - 0.5 * self.noise_dim * math.log(
            2.0 * math.pi
        )
        log_q = log_base - half_log_det.reshape(shape) - self._surrogate_constant()
        return self.to_latent(w), [log_q, eps]

    def log_prob(self, value, intermediates=None):
        if intermediates:
            return intermediates[0]
        raise ValueError(
            "LinearisedImplicit (LIVI) has no closed-form log q(z): its log_prob is the "
            "linearised-entropy surrogate of a draw and needs that draw's intermediates "
            "(numpyro passes them from the guide's sample site). For diagnostics use "
            "bayesgen.diagnose, which weights draws on the extended space "
            "(log_importance_density)."
        )

    # --- diagnostics ----------------------------------------------------------------------------
    def log_conditional(self, w, eps):
        """``log N(w; g(eps_k), sigma^2 I)`` for one ``w`` (d,) and a batch of ``eps`` (n, m)."""
        mean = jax.vmap(self.generator)(eps)
        sigma = self.output_noise
        r = (w - mean) / sigma
        return -0.5 * jnp.sum(r * r, axis=-1) - self.latent_dim * (
            jnp.log(sigma) + 0.5 * math.log(2.0 * math.pi)
        )

    def log_importance_density(
        self, key, value, intermediates, num_mixing: int = 1000, *, chunk_size: int = 64
    ):
        """Extended-space ``log q^_K(z)`` with the generating noise included (module docstring).

        ``exp(log p(x, z) - log_importance_density(...))`` has expectation exactly ``p(x)``.
        The K fresh noises come from ``self.importance_proposal``: the Laplace reverse model
        (importance-weighted) or the prior.

        Parameters
        ----------
        key : PRNG key for the K fresh noise draws.
        value : (..., d) draws of this family.
        intermediates : the draws' intermediates; ``intermediates[1]`` is the generating
            noise ``eps_0`` (..., m).
        num_mixing : K >= 0.
        chunk_size : fresh draws evaluated at once (memory O(chunk_size d)).
        """
        check_latent(value, self.latent_dim)
        check_int("num_mixing", num_mixing, minimum=0)
        if not intermediates or len(intermediates) < 2:
            raise ValueError(
                "log_importance_density needs the draw's intermediates [surrogate, eps]: the "
                "generating noise eps_0 must be part of the mixture for unbiased weights"
            )
        eps0 = jnp.asarray(intermediates[1])
        batch = jnp.shape(value)[:-1]
        if jnp.shape(eps0) != batch + (self.noise_dim,):
            raise ValueError(
                f"intermediates[1] (the generating noise) must have shape "
                f"{batch + (self.noise_dim,)}, got {jnp.shape(eps0)}"
            )
        w = self.to_whitened(value).reshape((-1, self.latent_dim))
        flat_eps = eps0.reshape((-1, self.noise_dim))
        keys = jr.split(key, w.shape[0])
        if self.importance_proposal == "laplace":
            sigma = self.output_noise

            def one(k, wi, ei):
                loc, chol = laplace_reverse(self.generator, wi, sigma, self.noise_dim)
                return laplace_mixture_log_density(
                    k, wi, self.log_conditional, ei, loc, chol, sigma, num_mixing,
                    chunk_size=chunk_size,
                )
        else:

            def one(k, wi, ei):
                return mixture_log_density(
                    k, wi, self.log_conditional, ei, self.noise_dim, num_mixing,
                    chunk_size=chunk_size,
                )

        out = jax.lax.map(lambda args: one(*args), (keys, w, flat_eps),
                          batch_size=max(1, min(w.shape[0], 256)))
        return out.reshape(batch) - self._log_det_precond()

    def transform(self, eps):
        """Latent values ``m0 + L0 g(eps)`` for noise ``eps`` (..., m), output noise left out."""
        eps = jnp.asarray(eps)
        flat = eps.reshape((-1, self.noise_dim))
        w = jax.vmap(self.generator)(flat)
        return self.to_latent(w.reshape(eps.shape[:-1] + (self.latent_dim,)))


# --------------------------------------------------------------------------- generators


class MLPGenerator(nnx.Module):
    """Residual generator ``g(eps) = P eps + h(eps)`` for small latent dimensions.

    ``P`` (d, m) is a learned linear embedding, initialised to the identity when ``m = d``
    and otherwise to random rows of unit norm (each output coordinate has unit variance);
    ``h`` is a :class:`bayesgen.nn.MLP` whose output layer starts at zero. The untrained
    generator is linear, so the untrained family is exactly ``N(m0, L0 (P P^T + sigma^2 I)
    L0^T)`` (for ``m = d``: the preconditioner's Gaussian), where the LIVI surrogate is exact
    in expectation; the MLP adds the nonlinearity as training needs it.

    Parameters
    ----------
    noise_dim, out_dim : m <= d.
    width, depth : the MLP's hidden width and number of hidden layers (depth 0: linear).
    rngs : ``nnx.Rngs``.
    activation : the MLP's activation (default gelu).
    """

    def __init__(
        self,
        noise_dim: int,
        out_dim: int,
        *,
        width: int = 64,
        depth: int = 2,
        rngs: nnx.Rngs,
        activation: Callable = jax.nn.gelu,
    ):
        if noise_dim > out_dim:
            raise ValueError(f"noise_dim ({noise_dim}) must be <= out_dim ({out_dim})")
        self.noise_dim, self.out_dim = noise_dim, out_dim
        if noise_dim == out_dim:
            embed = jnp.eye(out_dim)
        else:
            raw = jr.normal(rngs.params(), (out_dim, noise_dim))
            embed = raw / jnp.linalg.norm(raw, axis=1, keepdims=True)
        self.embed = nnx.Param(embed)
        if depth > 0:
            mlp = MLP(noise_dim, out_dim, width=width, depth=depth, rngs=rngs,
                      activation=activation)
            zero_last_layer(mlp)
            self.mlp = mlp
        else:
            self.mlp = None

    def __call__(self, eps):
        out = eps @ self.embed.value.T
        if self.mlp is not None:
            out = out + self.mlp(eps)
        return out


class MatrixLayer(nnx.Module):
    """``X (a, b) -> W_l X W_r + B`` with ``W_l`` (c, a), ``W_r`` (b, e), ``B`` (c, e).

    Weights are drawn ``N(0, 1/a)`` and ``N(0, 1/b)`` so an input with unit-variance entries
    gives unit-variance outputs; ``B`` starts at zero. Parameters ``ac + be + ce``.
    """

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int], *, rngs: nnx.Rngs):
        (a, b), (c, e) = in_shape, out_shape
        self.left = nnx.Param(jr.normal(rngs.params(), (c, a)) / math.sqrt(a))
        self.right = nnx.Param(jr.normal(rngs.params(), (b, e)) / math.sqrt(b))
        self.bias = nnx.Param(jnp.zeros((c, e)))

    def __call__(self, x):
        left, right = self.left.value, self.right.value
        # contract the smaller intermediate first
        (c, a), (b, e) = left.shape, right.shape
        if c * b * (a + e) <= a * e * (b + c):
            y = (left @ x) @ right
        else:
            y = left @ (x @ right)
        return y + self.bias.value


def default_matrix_shapes(latent_dim: int, noise_side: int, hidden_side: int, depth: int):
    """Shapes ``[(a, b), hidden..., (c_L, e_L)]`` for a :class:`MatrixGenerator`.

    The output is the smallest near-square ``c_L x e_L >= latent_dim`` (``c_L =
    ceil(sqrt(d))``); hidden layers are ``hidden_side`` square matrices. Every layer is at
    least as large as the previous one in both sides, so the generator can be injective.
    """
    rows = max(math.isqrt(latent_dim - 1) + 1, 1)
    cols = -(-latent_dim // rows)
    shapes = [(noise_side, noise_side)] + [(hidden_side, hidden_side)] * depth
    shapes.append((max(rows, hidden_side, noise_side), max(cols, hidden_side, noise_side)))
    return shapes


class MatrixGenerator(nnx.Module):
    """The paper's scalable sampler: matrix-multiplication layers on a matrix of noise.

    The noise ``eps`` (m = a b) is viewed as ``X (a, b)``; each layer maps
    ``X -> act(W_l X W_r + B)`` (:class:`MatrixLayer`; the last layer is linear); the final
    ``c_L x e_L`` matrix is flattened and its first ``out_dim`` entries are the output.
    Parameters per layer are O(ac + be) plus the bias, far below the output size: a 1000 x
    1000 output from 64 x 64 hidden matrices costs 2 * 64 * 1000 weights (plus the 1e6 bias,
    which plays the role of a mean-field location). Keep ``c_l >= a_l`` and ``e_l >= b_l``
    in every layer or the Jacobian is rank deficient (``s_min = 0``).

    Call :meth:`standardise_output` once after construction: it rescales the rows of the
    last ``W_l`` and the columns of the last ``W_r`` (a rank-one fit of the log output sd
    over noise draws) and sets the last bias to minus the mean, so the untrained output has
    mean ~0 and sd ~1 in every coordinate.

    Parameters
    ----------
    shapes : ``[(a, b), (c_1, e_1), ..., (c_L, e_L)]`` noise, hidden and output shapes.
    out_dim : d <= c_L e_L.
    rngs : ``nnx.Rngs``.
    activation : between layers (default ELU, as in the paper's code).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable = jax.nn.elu,
    ):
        shapes = [tuple(int(s) for s in shape) for shape in shapes]
        if len(shapes) < 2 or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError(
                f"shapes must be at least a noise shape and an output shape of positive (rows, "
                f"cols) pairs, got {shapes!r}"
            )
        rows, cols = shapes[-1]
        if rows * cols < out_dim:
            raise ValueError(
                f"the output shape {shapes[-1]} has {rows * cols} entries, fewer than "
                f"out_dim={out_dim}"
            )
        self.noise_shape = shapes[0]
        self.noise_dim = shapes[0][0] * shapes[0][1]
        self.out_dim = out_dim
        self.layers = nnx.List(
            [MatrixLayer(a, b, rngs=rngs) for a, b in zip(shapes[:-1], shapes[1:], strict=True)]
        )
        self.activation = activation

    def features(self, eps):
        """Input of the last layer for one noise vector (m,)."""
        x = jnp.reshape(eps, self.noise_shape)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return x

    def __call__(self, x, part: str = "output"):
        """``part="output"`` (default): ``g(eps)`` (d,); ``"features"``: the last layer's input;
        ``"head"``: the last layer on features, flattened and cut to d; ``"head_gram"``:
        :meth:`head_gram` (the parts let one registered module serve the family's
        ``linear_head``)."""
        if part == "output":
            return self.head(self.features(x))
        if part == "features":
            return self.features(x)
        if part == "head":
            return self.head(x)
        if part == "head_gram":
            return self.head_gram(x)
        raise ValueError(
            f"part must be 'output', 'features', 'head' or 'head_gram', got {part!r}"
        )

    def head(self, features):
        """The last (affine) layer, flattened and cut to ``out_dim``."""
        return self.layers[-1](features).reshape(-1)[: self.out_dim]

    def head_gram(self, u):
        """``H^T H u`` for the linear part ``H: U -> (W_l U W_r)[:d]`` of the last layer.

        ``H^T H u = G_l u G_r - W_l^T (M * (W_l u W_r)) W_r^T`` with ``G_l = W_l^T W_l`` and
        ``G_r = W_r W_r^T`` (small), where the mask ``M`` keeps the output entries beyond
        ``out_dim`` (the cut tail, at most a couple of rows) so they do not count. Costs
        O(k^2 (c + e)) for k x k features: no output-sized array is formed.
        """
        last = self.layers[-1]
        left, right = last.left.value, last.right.value
        rows, cols = left.shape[0], right.shape[1]
        full = (left.T @ left) @ u @ (right @ right.T)
        first_cut_row = self.out_dim // cols
        if first_cut_row >= rows:  # nothing is cut
            return full
        tail_left = left[first_cut_row:]
        flat_index = (first_cut_row + jnp.arange(rows - first_cut_row))[:, None] * cols + (
            jnp.arange(cols)[None, :]
        )
        cut = (flat_index >= self.out_dim).astype(u.dtype)
        tail = (tail_left @ u @ right) * cut
        return full - tail_left.T @ tail @ right.T

    def standardise_output(self, key, *, num_draws: int = 64, num_mean_draws: int = 1024):
        """Rescale the last layer so that each output coordinate has mean ~0 and sd ~1.

        A data-free initialisation from base draws: the log sd of the output over
        ``num_draws`` noise draws is fitted by ``alpha_i + beta_j`` (row and column effects),
        the last ``W_l`` rows are divided by ``exp(alpha_i)`` and the last ``W_r`` columns by
        ``exp(beta_j)``; then the last bias is set to minus the mean output, computed from the
        mean of the last layer's input over ``num_mean_draws`` draws. Memory is O(d) (draws
        are accumulated one at a time).
        """
        k_sd, k_mean = jr.split(key)
        last = self.layers[-1]
        last.bias.value = jnp.zeros_like(last.bias.value)
        graphdef, state = nnx.split(self)

        @jax.jit
        def moments(state, keys):
            module = nnx.merge(graphdef, state)

            def body(acc, k):
                y = module.layers[-1](module.features(jr.normal(k, (module.noise_dim,))))
                return (acc[0] + y, acc[1] + y * y), None

            shape = module.layers[-1].bias.value.shape
            (s1, s2), _ = jax.lax.scan(body, (jnp.zeros(shape), jnp.zeros(shape)), keys)
            n = keys.shape[0]
            mean = s1 / n
            return jnp.sqrt(jnp.maximum(s2 / n - mean * mean, 1e-12))

        sd = moments(state, jr.split(k_sd, num_draws))
        log_sd = jnp.log(sd)
        row = jnp.mean(log_sd, axis=1)
        col = jnp.mean(log_sd, axis=0) - jnp.mean(log_sd)
        last.left.value = last.left.value * jnp.exp(-row)[:, None]
        last.right.value = last.right.value * jnp.exp(-col)[None, :]
        feats = jax.jit(jax.vmap(self.features))(
            jr.normal(k_mean, (num_mean_draws, self.noise_dim))
        )
        mean_out = last(jnp.mean(feats, axis=0))  # the last layer is affine
        last.bias.value = -mean_out
        return self


def check_matrix_shapes(shapes) -> None:
    """Raise when a layer shrinks a side (the generator's Jacobian would be rank deficient)."""
    for (a, b), (c, e) in zip(shapes[:-1], shapes[1:], strict=False):
        if c < a or e < b:
            raise ValueError(
                f"matrix generator layer {(a, b)} -> {(c, e)} shrinks a side: W_l X W_r then "
                "has rank below the noise dimension and the LIVI entropy degenerates; make "
                "every layer at least as large as the noise shape"
            )
