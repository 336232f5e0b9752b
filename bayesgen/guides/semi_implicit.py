"""Semi-implicit guides: AutoSIVI (lower-bound surrogate) and AutoUIVI (unbiased gradient).

Both fit the family of :mod:`bayesgen.families.semi_implicit` in the preconditioner's
whitened coordinates: ``eps ~ N(0, I_m)``, ``w | eps ~ N(mu(eps), diag sigma(eps)^2)``,
``z = m0 + L0 w``, with ``(mu, sigma)`` from one flax MLP of the noise (the mixing network).
They differ only in the surrogate the family hands to ``Trace_ELBO``; the score-based
objectives (kernel SIVI, SIVI-SM) reuse the same family with their own losses.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from numpyro.infer.initialization import init_to_median

from bayesgen.errors import check_int
from bayesgen.families.semi_implicit import SemiImplicit, UnbiasedSemiImplicit
from bayesgen.guides.base import PreconditionedGuide, default_width
from bayesgen.nn import MLP, nnx_param, rescale_output, zero_last_layer

# At initialisation the family is close to the preconditioner's Gaussian N(m0, L0 L0^T):
# Var mu(eps) = 0.6^2 and sigma = 0.8, which add up to unit variance per whitened coordinate.
_INIT_MIXING_SD = 0.6
_INIT_SIGMA = 0.8


class AutoSIVI(PreconditionedGuide):
    """Semi-implicit guide with the SIVI lower bound (Yin & Zhou, ICML 2018).

    Parameters
    ----------
    model : numpyro model with continuous, global latent sites.
    noise_dim : m, dimension of the mixing noise (default ``clip(d, 10, 64)``).
    hidden, depth : mixing-network width (default ``clip(2 d, 64, 256)``) and hidden layers (2).
    num_mixing : K fresh mixing draws in the surrogate (default ``clip(16000 // d, 100,
        1000)``: 1000 up to 16 latent dimensions, 100 from 160 on). The bound tightens as K
        grows, at K+1 network passes per particle; on funnel-10 K = 1000 reached sd(v) 2.56
        where K = 100 reached 2.40 (docs/benchmarks.md).
    conditional_scale : ``"mixing"`` (sigma is an output of the mixing network, default:
        needed where the posterior's scale varies, e.g. funnels) or ``"global"`` (one
        learned vector, as in the paper's toy scripts).
    min_scale : floor added to sigma (whitened units).
    reverse_model : draw the K fresh mixing draws from a learned Gaussian ``tau(eps | w)``
        (an MLP of ``w``, same width and depth, started at the prior) and importance-weight
        them (IWHVI, Sobolev & Vetrov 2019); the surrogate is still a lower bound, and
        tighter for the same K. Costs K mixing-network passes per particle (without it the
        K passes are shared by the particles).
    init_scale, init_steps, init_options, prefix, init_loc_fn, seed :
        as :class:`~bayesgen.guides.base.PreconditionedGuide`.
    """

    _family_cls = SemiImplicit

    def __init__(
        self,
        model,
        *,
        noise_dim: int | None = None,
        hidden: int | None = None,
        depth: int = 2,
        num_mixing: int | None = None,
        conditional_scale: str = "mixing",
        min_scale: float = 1e-4,
        reverse_model: bool = False,
        init_scale="pathfinder",
        init_steps: int = 100,
        init_options: dict | None = None,
        prefix: str = "auto",
        init_loc_fn=init_to_median,
        seed: int = 0,
    ):
        check_int("noise_dim", noise_dim, allow_none=True)
        check_int("hidden", hidden, allow_none=True)
        check_int("depth", depth, minimum=0)
        check_int("num_mixing", num_mixing, minimum=0, allow_none=True)
        if conditional_scale not in ("mixing", "global"):
            raise ValueError(
                f"conditional_scale must be 'mixing' or 'global', got {conditional_scale!r}"
            )
        if not min_scale >= 0:
            raise ValueError(f"min_scale must be >= 0, got {min_scale!r}")
        self.noise_dim = noise_dim
        self.hidden = hidden
        self.depth = depth
        self.num_mixing = num_mixing
        self.conditional_scale = conditional_scale
        self.min_scale = float(min_scale)
        if not isinstance(reverse_model, bool):
            raise ValueError(f"reverse_model must be True or False, got {reverse_model!r}")
        self.reverse_model = reverse_model
        self._mixing_template = None
        self._reverse_template = None
        super().__init__(
            model, init_scale=init_scale, init_steps=init_steps, init_options=init_options,
            prefix=prefix, init_loc_fn=init_loc_fn, seed=seed,
        )

    # --- set-up ---------------------------------------------------------------------------
    def _build(self, key):
        d = self.latent_dim
        self._m = self.noise_dim or int(min(64, max(10, d)))
        width = self.hidden or default_width(d)
        out = 2 * d if self.conditional_scale == "mixing" else d
        k_net, k_scale = jax.random.split(key)
        net = MLP(self._m, out, width=width, depth=self.depth,
                  rngs=nnx.Rngs(params=k_net))
        # mu: mean 0, sd 0.6; the raw scale: mean 0, sd 0.1 (sigma close to 0.8 everywhere)
        target = jnp.concatenate([jnp.full(d, _INIT_MIXING_SD), jnp.full(out - d, 0.1)])
        self._mixing_template = rescale_output(net, k_scale, self._m, target)
        if self.reverse_model:
            k_rev = jax.random.fold_in(key, 1)
            rev = MLP(d, 2 * self._m, width=width, depth=self.depth, rngs=nnx.Rngs(params=k_rev))
            zero_last_layer(rev)
            self._reverse_template = rev

    def _reverse(self):
        if not self.reverse_model:
            return None
        net = nnx_param(f"{self.prefix}_reverse", self._reverse_template)
        m, offset = self._m, math.log(math.expm1(1.0))

        def reverse(w):
            out = net(w)
            return out[..., :m], jax.nn.softplus(out[..., m:] + offset) + 1e-3

        return reverse

    def _raw_offset(self):
        # softplus(offset) + min_scale = _INIT_SIGMA
        return math.log(math.expm1(max(_INIT_SIGMA - self.min_scale, 1e-6)))

    def _conditional(self):
        d = self.latent_dim
        net = nnx_param(f"{self.prefix}_mixing", self._mixing_template)
        offset, floor = self._raw_offset(), self.min_scale
        if self.conditional_scale == "global":
            import numpyro

            raw = numpyro.param(f"{self.prefix}_raw_scale", jnp.full(d, offset))

            def conditional(eps):
                mu = net(eps)
                return mu, jnp.broadcast_to(jax.nn.softplus(raw) + floor, mu.shape)
        else:

            def conditional(eps):
                out = net(eps)
                return out[..., :d], jax.nn.softplus(out[..., d:] + offset) + floor

        return conditional

    def _num_mixing(self):
        if self.num_mixing is not None:
            return self.num_mixing
        return int(min(1000, max(100, 16000 // self.latent_dim)))

    def _family_kwargs(self):
        return {"num_mixing": self._num_mixing(), "reverse": self._reverse()}

    def default_loss(self, num_particles: int = 1):
        """:class:`~bayesgen.objectives.BatchedELBO`: the particles of a step share the K
        fresh mixing draws (what :func:`bayesgen.fit` uses; ``Trace_ELBO`` also works, at
        S (K + 1) network passes per step instead of K + S)."""
        from bayesgen.objectives import BatchedELBO

        return BatchedELBO(num_particles)

    # --- the family -------------------------------------------------------------------------
    def _get_posterior(self):
        pre_loc, pre_scale = self.preconditioner
        return self._family_cls(
            self._conditional(), self._m, pre_loc, pre_scale, **self._family_kwargs()
        )


class AutoUIVI(AutoSIVI):
    """Semi-implicit guide trained with UIVI's unbiased entropy gradient (Titsias & Ruiz, 2019).

    The gradient of the entropy uses an HMC estimate of the marginal score (a chain on
    q(eps | z) started at the generating eps); the loss value reported is the SIVI estimate
    with ``num_mixing`` draws. Each particle costs (num_burn + num_kept) * num_leapfrog
    gradient evaluations of the mixing network, plus one Jacobian.

    Parameters
    ----------
    num_burn, num_kept, num_leapfrog, step_size : the HMC chain on q(eps | z) (see
        :class:`~bayesgen.families.semi_implicit.UnbiasedSemiImplicit`).
    num_mixing : K for the reported SIVI value (default 32; no gradient flows through it).
    Other parameters as :class:`AutoSIVI`.
    """

    _family_cls = UnbiasedSemiImplicit

    def __init__(
        self,
        model,
        *,
        num_burn: int = 5,
        num_kept: int = 5,
        num_leapfrog: int = 5,
        step_size: float = 0.3,
        num_mixing: int = 32,
        **kwargs,
    ):
        if kwargs.get("reverse_model"):
            raise ValueError(
                "AutoUIVI's gradient comes from its HMC chain on q(eps | z), not from the "
                "SIVI bound, so reverse_model does not apply; use AutoSIVI(reverse_model=True)"
            )
        self.hmc_options = dict(
            num_burn=num_burn, num_kept=num_kept, num_leapfrog=num_leapfrog, step_size=step_size
        )
        # validate eagerly, with the family's own messages
        UnbiasedSemiImplicit(
            lambda e: (e, e), 1, jnp.zeros(1), jnp.ones(1), **self.hmc_options
        )
        super().__init__(model, num_mixing=num_mixing, **kwargs)

    def _family_kwargs(self):
        return {"num_mixing": self._num_mixing(), **self.hmc_options}

    def default_loss(self, num_particles: int = 1):
        """``Trace_ELBO``: UIVI's cost is the HMC chain of each draw, which a batched loss
        cannot share (the K mixing draws only make the reported value)."""
        from numpyro.infer import Trace_ELBO

        return Trace_ELBO(num_particles=num_particles)
