"""Normalizing-flow families with an exact density.

A flow family pushes a standard normal draw through an invertible map,

    eps ~ N(0, I),   u = f(eps),   w = loc + L u,   z = m0 + L0 w,

and scores by the change of variables

    log q(z) = log N(eps; 0, I) - log|det df/deps| - sum log|diag L| - sum log|diag L0|.

``f`` is a stack of flow layers with permutations between them (built from flowjax's
bijections where flowjax has them: affine coupling (RealNVP), rational-quadratic spline
coupling (neural spline flow), masked autoregressive, block neural autoregressive; planar
and radial come from :mod:`bayesgen.families.bijections`). Every stack starts as the
identity (conditioner output layers are zeroed), so an untrained family is exactly the
Gaussian ``N(m0 + L0 loc, L0 L L^T L0^T)``.

``(loc, L)`` is the learned affine (whitening) layer. ``(m0, L0)`` is a fixed
preconditioner found before training (see :mod:`bayesgen.init`): the flow and its optimiser
then work in coordinates where the posterior has roughly unit scale, which is what makes
unit-scale Adam work on badly conditioned models. ``L`` and ``L0`` are either lower
triangular with a positive diagonal (``"tril"``) or positive vectors (``"diag"``).

Sampling runs the flows in their cheap direction (IAF-style for the autoregressive flow),
and the log-density of a draw is computed along the draw and handed to ``log_prob`` as an
intermediate, so the ELBO never needs an inverse. ``log_prob`` of an arbitrary value uses
the inverse (analytic for coupling, autoregressive, planar-with-bisection and radial flows;
numerical for BNAF).

References
----------
Rezende & Mohamed, "Variational inference with normalizing flows", ICML 2015.
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
Kingma et al., "Improved variational inference with inverse autoregressive flow", NeurIPS 2016.
Durkan, Bekasov, Murray & Papamakarios, "Neural spline flows", NeurIPS 2019.
De Cao, Aziz & Titov, "Block neural autoregressive flow", UAI 2019.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import flowjax.bijections as fjb
import jax
import jax.numpy as jnp
import jax.random as jr
import paramax
from flowjax.distributions import StandardNormal
from flowjax.flows import (
    block_neural_autoregressive_flow,
    coupling_flow,
    masked_autoregressive_flow,
)

from bayesgen.families.base import Family, check_latent
from bayesgen.families.bijections import Planar, Radial

FLOW_KINDS = ("realnvp", "nsf", "maf", "bnaf", "planar", "radial")


def _min_scale_affine(min_scale: float = 1e-2) -> fjb.Affine:
    """Affine transformer whose scale is softplus(raw) + min_scale, identity at raw = 0."""
    raw0 = jnp.log(jnp.expm1(1.0 - min_scale))
    scale = paramax.Parameterize(lambda r: jax.nn.softplus(r) + min_scale, raw0)
    return eqx.tree_at(lambda a: a.scale, fjb.Affine(), replace=scale)


def _zero_output_layers(bijection):
    """Zero the last linear layer of every conditioner MLP, so the flow starts as the identity.

    flowjax transformers are built so that a zero conditioner output gives their initial
    (identity) parameters; BNAF has no conditioner and is left as initialised.
    """

    def is_mlp(node):
        return isinstance(node, eqx.nn.MLP)

    def zero(node):
        if not is_mlp(node):
            return node
        last = node.layers[-1]
        last = jax.tree.map(
            lambda a: jnp.zeros_like(a) if eqx.is_inexact_array(a) else a, last
        )
        return eqx.tree_at(lambda m: m.layers[-1], node, replace=last)

    return jax.tree.map(zero, bijection, is_leaf=is_mlp)


def build_flow(
    kind: str,
    key,
    dim: int,
    *,
    num_layers: int,
    hidden: int,
    depth: int = 1,
    knots: int = 8,
    interval: float = 5.0,
):
    """Build a flow stack (sampling direction) of the given ``kind`` on R^dim.

    Parameters
    ----------
    kind : one of ``"realnvp", "nsf", "maf", "bnaf", "planar", "radial"``.
    key : jax PRNG key for the initial weights.
    dim : latent dimension.
    num_layers : number of flow layers (permutations between them).
    hidden : conditioner width (for BNAF: the block size, hidden width = dim * hidden).
    depth : conditioner hidden layers.
    knots, interval : rational-quadratic spline settings (``"nsf"``): identity outside
        ``[-interval, interval]``.

    Returns
    -------
    A flowjax ``AbstractBijection`` whose ``transform`` is the sampling direction and which
    is the identity at initialisation (planar/radial: close to it).
    """
    if kind not in FLOW_KINDS:
        raise ValueError(f"flow must be one of {FLOW_KINDS}, got {kind!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if kind in ("realnvp", "nsf") and dim < 2:
        raise ValueError(
            f"flow={kind!r} is a coupling flow and needs a latent dimension >= 2 "
            f"(got {dim}); use flow='maf', 'planar' or 'radial' for a 1-d latent"
        )
    base = StandardNormal((dim,))
    if kind == "realnvp":
        bij = coupling_flow(
            key, base_dist=base, transformer=_min_scale_affine(), flow_layers=num_layers,
            nn_width=hidden, nn_depth=depth, nn_activation=jax.nn.gelu, invert=False,
        ).bijection
        return _zero_output_layers(bij)
    if kind == "nsf":
        spline = fjb.RationalQuadraticSpline(knots=knots, interval=interval)
        bij = coupling_flow(
            key, base_dist=base, transformer=spline, flow_layers=num_layers,
            nn_width=hidden, nn_depth=depth, nn_activation=jax.nn.gelu, invert=False,
        ).bijection
        return _zero_output_layers(bij)
    if kind == "maf":
        bij = masked_autoregressive_flow(
            key, base_dist=base, transformer=_min_scale_affine(), flow_layers=num_layers,
            nn_width=hidden, nn_depth=depth, nn_activation=jax.nn.gelu, invert=False,
        ).bijection
        return _zero_output_layers(bij)
    if kind == "bnaf":
        return block_neural_autoregressive_flow(
            key, base_dist=base, nn_depth=depth, nn_block_dim=hidden,
            flow_layers=num_layers, invert=False,
        ).bijection
    layer_cls = Planar if kind == "planar" else Radial
    keys = jr.split(key, num_layers)
    layers = []
    for i, k in enumerate(keys):
        layers.append(layer_cls(k, dim=dim))
        if dim > 1 and i < num_layers - 1:
            kp = jr.fold_in(k, 1)
            layers.append(fjb.Permute(jr.permutation(kp, jnp.arange(dim))))
    return fjb.Chain(layers)


def _affine_forward(u, loc, scale):
    if scale.ndim == 1:
        return loc + scale * u, jnp.sum(jnp.log(jnp.abs(scale)))
    return loc + u @ scale.T, jnp.sum(jnp.log(jnp.abs(jnp.diagonal(scale))))


def _affine_inverse(z, loc, scale):
    if scale.ndim == 1:
        return (z - loc) / scale, jnp.sum(jnp.log(jnp.abs(scale)))
    u = jax.scipy.linalg.solve_triangular(scale, (z - loc).T, lower=True).T
    return u, jnp.sum(jnp.log(jnp.abs(jnp.diagonal(scale))))


class FlowFamily(Family):
    """Standard normal pushed through a flow, a learned affine and a fixed preconditioner.

    Parameters
    ----------
    bijection : flowjax bijection on R^d (sampling direction), or ``None`` for none
        (then the family is the Gaussian given by the two affine layers).
    loc, scale : learned affine layer; ``scale`` a (d,) positive vector or a (d, d) lower
        triangular matrix with positive diagonal.
    precond_loc, precond_scale : fixed preconditioner, same conventions (gradients are
        stopped: it is set by the initialisation, not trained).
    """

    density: ClassVar[str] = "exact"

    def __init__(self, bijection, loc, scale, precond_loc, precond_scale, *, validate_args=None):
        self.bijection = bijection
        self.loc = loc
        self.scale = scale
        self.precond_loc = jax.lax.stop_gradient(precond_loc)
        self.precond_scale = jax.lax.stop_gradient(precond_scale)
        super().__init__(jnp.shape(loc)[-1], validate_args=validate_args)

    def _forward_one(self, eps):
        logq = jnp.sum(jax.scipy.stats.norm.logpdf(eps))
        if self.bijection is not None:
            u, ld = self.bijection.transform_and_log_det(eps)
            logq = logq - ld
        else:
            u = eps
        w, ld = _affine_forward(u, self.loc, self.scale)
        z, ld0 = _affine_forward(w, self.precond_loc, self.precond_scale)
        return z, logq - ld - ld0

    def sample_with_intermediates(self, key, sample_shape=()):
        shape = tuple(sample_shape) + self.batch_shape + (self.latent_dim,)
        eps = jr.normal(key, shape)
        flat = eps.reshape((-1, self.latent_dim))
        z, logq = jax.vmap(self._forward_one)(flat)
        z = z.reshape(shape)
        logq = logq.reshape(shape[:-1])
        return z, [logq]

    def _log_prob_one(self, z):
        w, ld0 = _affine_inverse(z, self.precond_loc, self.precond_scale)
        u, ld = _affine_inverse(w, self.loc, self.scale)
        if self.bijection is not None:
            eps, ldf = self.bijection.inverse_and_log_det(u)  # ldf = log|d f^{-1}/du|
        else:
            eps, ldf = u, 0.0
        return jnp.sum(jax.scipy.stats.norm.logpdf(eps)) + ldf - ld - ld0

    def log_prob(self, value, intermediates=None):
        if intermediates:
            return intermediates[0]
        check_latent(value, self.latent_dim)
        flat = jnp.reshape(value, (-1, self.latent_dim))
        out = jax.vmap(self._log_prob_one)(flat)
        return out.reshape(jnp.shape(value)[:-1])

    def transform(self, eps):
        """Map base draws ``eps`` (..., d) to latent draws (the sampling direction)."""
        flat = jnp.reshape(eps, (-1, self.latent_dim))
        z, _ = jax.vmap(self._forward_one)(flat)
        return z.reshape(jnp.shape(eps))
