"""Planar and radial flow layers (Rezende & Mohamed, 2015) as flowjax bijections.

Written here because flowjax has no radial layer, and its planar layer with the paper's
tanh nonlinearity has no inverse (flowjax offers an inverse only for a leaky-ReLU variant).
Both layers below keep the paper's form, enforce its invertibility constraint by
reparameterisation, and provide an inverse (closed form for radial, a bracketed bisection
on one scalar for planar), so they can be tested and used to score arbitrary values.

Planar::

    f(x) = x + u_hat * tanh(w^T x + b)
    u_hat = u + (m(w^T u) - w^T u) w / |w|^2,   m(a) = -1 + softplus(a) + 1e-4   (w^T u_hat > -1)
    log|det J| = log|1 + (1 - tanh^2(w^T x + b)) u_hat^T w|

Radial::

    f(x) = x + beta h(r) (x - x0),   r = |x - x0|,   h(r) = 1 / (alpha + r)
    alpha = softplus(alpha_raw) > 0,   beta = -alpha + softplus(beta_raw) + 1e-4   (beta > -alpha)
    log|det J| = (d - 1) log(1 + beta h) + log(1 + beta alpha / (alpha + r)^2)

References
----------
Rezende & Mohamed, "Variational inference with normalizing flows", ICML 2015, sec. 4.1
and appendix A.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr
from flowjax.bijections import AbstractBijection

_MARGIN = 1e-4  # keeps the constraints strict in float32 (softplus underflows to 0)
_SOFTPLUS_INV_1 = float(jnp.log(jnp.expm1(1.0)))  # softplus(a) = 1  <=>  m(a) = 0


class Planar(AbstractBijection):
    """Planar layer with tanh and the Rezende-Mohamed invertibility constraint.

    Initialised close to the identity (``u_hat`` of order 1e-2).
    """

    shape: tuple[int, ...]
    cond_shape: ClassVar[None] = None
    w: jax.Array
    u: jax.Array
    b: jax.Array
    bisection_steps: int = 60

    def __init__(self, key, *, dim: int, init_scale: float = 1e-2):
        kw, ku = jr.split(key)
        w = jr.normal(kw, (dim,)) / jnp.sqrt(dim)
        # u = a0 w / |w|^2 gives u_hat = m(a0) w / |w|^2 = 0; perturb slightly.
        u = _SOFTPLUS_INV_1 * w / jnp.sum(w**2) + init_scale * jr.normal(ku, (dim,))
        self.shape = (dim,)
        self.w = w
        self.u = u
        self.b = jnp.zeros(())

    def u_hat(self):
        wu = jnp.dot(self.w, self.u)
        m = -1.0 + jax.nn.softplus(wu) + _MARGIN
        return self.u + (m - wu) * self.w / jnp.sum(self.w**2)

    def transform_and_log_det(self, x, condition=None):
        u_hat = self.u_hat()
        t = jnp.tanh(jnp.dot(self.w, x) + self.b)
        y = x + u_hat * t
        log_det = jnp.log(jnp.abs(1.0 + (1.0 - t**2) * jnp.dot(u_hat, self.w)))
        return y, log_det

    def inverse_and_log_det(self, y, condition=None):
        # With s = w^T x:  s + c tanh(s + b) = w^T y,  c = w^T u_hat > -1, monotone in s;
        # the root lies within |c| of w^T y.
        u_hat = self.u_hat()
        c = jnp.dot(self.w, u_hat)
        target = jnp.dot(self.w, y)
        lo, hi = target - jnp.abs(c) - 1e-6, target + jnp.abs(c) + 1e-6

        def body(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = mid + c * jnp.tanh(mid + self.b) > target
            return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

        lo, hi = jax.lax.fori_loop(0, self.bisection_steps, body, (lo, hi))
        # The bracket carries no useful derivative; one Newton step from the stopped root
        # leaves the value (up to round-off) and gives the implicit-function derivatives.
        s = jax.lax.stop_gradient(0.5 * (lo + hi))
        t = jnp.tanh(s + self.b)
        s = s - (s + c * t - target) / (1.0 + (1.0 - t**2) * c)
        t = jnp.tanh(s + self.b)
        x = y - u_hat * t
        log_det = jnp.log(jnp.abs(1.0 + (1.0 - t**2) * c))
        return x, -log_det


class Radial(AbstractBijection):
    """Radial layer with the constraint beta > -alpha; initialised at the identity (beta = 0)."""

    shape: tuple[int, ...]
    cond_shape: ClassVar[None] = None
    x0: jax.Array
    alpha_raw: jax.Array
    beta_raw: jax.Array

    def __init__(self, key, *, dim: int, init_scale: float = 1e-2):
        k0, kb = jr.split(key)
        self.shape = (dim,)
        self.x0 = jr.normal(k0, (dim,))
        self.alpha_raw = jnp.zeros(())
        # alpha = softplus(0) and beta_raw = 0 give beta = 0 (the identity); perturb slightly.
        self.beta_raw = init_scale * jr.normal(kb, ())

    def alpha_beta(self):
        alpha = jax.nn.softplus(self.alpha_raw)
        beta = -alpha + jax.nn.softplus(self.beta_raw) + _MARGIN
        return alpha, beta

    def _log_det(self, r, alpha, beta):
        d = self.shape[0]
        h = 1.0 / (alpha + r)
        return (d - 1) * jnp.log1p(beta * h) + jnp.log1p(beta * alpha * h**2)

    def transform_and_log_det(self, x, condition=None):
        alpha, beta = self.alpha_beta()
        diff = x - self.x0
        r = jnp.sqrt(jnp.sum(diff**2) + 1e-30)
        y = x + beta / (alpha + r) * diff
        return y, self._log_det(r, alpha, beta)

    def inverse_and_log_det(self, y, condition=None):
        # |y - x0| = rho = r (1 + beta / (alpha + r)):  r^2 + (alpha + beta - rho) r - rho alpha = 0.
        alpha, beta = self.alpha_beta()
        diff = y - self.x0
        rho = jnp.sqrt(jnp.sum(diff**2) + 1e-30)
        p = alpha + beta - rho
        r = 0.5 * (-p + jnp.sqrt(p**2 + 4.0 * rho * alpha))
        x = self.x0 + diff / (1.0 + beta / (alpha + r))
        return x, -self._log_det(r, alpha, beta)
