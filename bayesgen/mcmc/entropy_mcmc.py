"""Entropy-MCMC: SGLD on a position coupled to a Gaussian-smoothed "guide" copy.

Reference: Bolian Li & Ruqi Zhang, "Entropy-MCMC: Sampling from flat basins with ease",
ICLR 2024 (code: github.com/lblaoke/EMCMC).

Target. With ``f(theta) = -log p(theta | data)`` (full data, up to a constant), the sampler
targets the joint density on the pair ``(theta, theta_a)``

    p(theta, theta_a)  propto  exp( -f(theta) - |theta - theta_a|^2 / (2 eta) ).

Integrating out ``theta_a`` gives back the posterior, so ``theta`` samples the posterior
itself. Integrating out ``theta`` gives the posterior convolved with ``N(0, eta I)``: the
guide ``theta_a`` follows a smoothed (local-entropy) energy and so prefers wide, flat
basins, and ``theta`` is pulled towards it. Small ``eta`` couples tightly (``theta_a ~
theta``, plain SGLD); large ``eta`` gives weak guidance and a slowly mixing guide.

Update. One Euler-Maruyama (SGLD) step on the concatenated variable, at temperature ``T``
(the joint is then tempered as a whole, ``exp(-(f + coupling) / T)``):

    theta   <- theta   + h [ g(theta) - (theta - theta_a) / eta ] + sqrt(2 h T) xi
    theta_a <- theta_a + h (theta - theta_a) / eta                + sqrt(2 h T) xi'

with ``g`` an (unbiased, possibly minibatch) estimate of ``grad log p(theta | data)``,
``xi, xi' ~ N(0, I)`` independent, and ``theta_a`` started as a copy of ``theta``. The
state is ``EntropySGLDState(position=theta, guide=theta_a)``; both fields are pytrees of
the same structure. Cost per step: one gradient estimate, plus a second copy of the
parameters.

Units (converting the reference code's hyperparameters). Here every quantity is in
*total* log-density units, as in blackjax: ``grad_estimator`` returns the gradient of the
full log posterior (``blackjax.sgmcmc.gradients.grad_estimator`` already scales the
minibatch log-likelihood by ``N / B`` and adds the log prior). The reference code instead
runs SGD with learning rate ``alpha`` on the *per-datum* loss

    f_hat(theta) / N + |theta - theta_a|^2 / (2 eta N) - (noise terms),

with injected noise of standard deviation ``sqrt(2 alpha T / N)``. Multiplying the drift
by ``N`` shows this is exactly the update above with

    step_size   = alpha / N,
    eta         = eta          (the same number: the code divides f *and* the coupling by N),
    temperature = T,

where ``N`` is the training-set size. So the paper's CIFAR-10 setting (lr 0.5 -> 0,
``eta = 4e-4``, ``T = 1e-4``, ``N = 50000``) is ``step_size = 1e-5 -> 0``,
``eta = 4e-4``, ``temperature = 1e-4`` here. Two further points about that code: its SGD
weight decay ``wd`` is a Gaussian prior of precision ``N * wd`` on ``theta`` (put it in
``logprior_fn``), and the optimiser applies the same weight decay to ``theta_a`` as well,
i.e. an extra ``N * wd |theta_a|^2 / 2`` in the joint energy that the paper's density
does not have; this kernel follows the paper and puts no prior on ``theta_a``.

The module mirrors ``blackjax.sgmcmc.sgld``: :func:`init`, :func:`build_kernel` and
:func:`as_top_level_api`. ``eta`` is an argument of the kernel (next to
``grad_estimator``, the other piece that defines the target) rather than of
``build_kernel``, which, as in blackjax's SGLD, only fixes the solver; so ``eta`` can be
traced, annealed or ``vmap``-ed without rebuilding the kernel.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

import blackjax.sgmcmc.diffusions as diffusions
from blackjax.base import SamplingAlgorithm
from blackjax.types import ArrayLikeTree, ArrayTree, PRNGKey

__all__ = ["EntropySGLDState", "init", "build_kernel", "as_top_level_api"]


class EntropySGLDState(NamedTuple):
    """State of the Entropy-MCMC sampler.

    position
        The sampled parameters ``theta`` (any pytree); marginally the posterior.
    guide
        The guiding variable ``theta_a``, same pytree structure as ``position``;
        marginally the posterior smoothed by ``N(0, eta I)``.
    """

    position: ArrayTree
    guide: ArrayTree


def init(position: ArrayLikeTree) -> EntropySGLDState:
    """Start a chain at ``position``, with the guide a copy of it."""
    position = jax.tree.map(jnp.asarray, position)
    guide = jax.tree.map(lambda x: jnp.array(x, copy=True), position)
    return EntropySGLDState(position, guide)


def build_kernel() -> Callable:
    """Build the Entropy-MCMC (Entropy-SGLD on ``(theta, theta_a)``) transition kernel.

    Returns a function ``kernel(rng_key, state, grad_estimator, minibatch, step_size,
    eta, temperature=1.0) -> EntropySGLDState`` performing one Euler (SGLD) step of the
    overdamped Langevin diffusion on the joint density of ``(theta, theta_a)``.
    """
    integrator = diffusions.overdamped_langevin()

    def kernel(
        rng_key: PRNGKey,
        state: EntropySGLDState,
        grad_estimator: Callable,
        minibatch: ArrayLikeTree,
        step_size: float,
        eta: float,
        temperature: float = 1.0,
    ) -> EntropySGLDState:
        """One Entropy-MCMC step.

        Parameters
        ----------
        rng_key
            PRNG key for the Langevin noise.
        state
            Current ``EntropySGLDState``.
        grad_estimator
            ``(position, minibatch) -> `` estimate of the gradient of the full-data log
            posterior at ``position`` (e.g. ``blackjax.sgmcmc.gradients.grad_estimator``).
        minibatch
            The batch of data passed to ``grad_estimator``.
        step_size
            Langevin step ``h`` (total log-density units; the code's ``lr / N``).
        eta
            Coupling variance between ``theta`` and the guide ``theta_a``.
        temperature
            Temperature ``T`` of the joint density.
        """
        position, guide = state
        logdensity_grad = grad_estimator(position, minibatch)
        # d/dtheta of -|theta - theta_a|^2 / (2 eta) is -(theta - theta_a) / eta, and the
        # guide receives the opposite force.
        pull = jax.tree.map(lambda p, a: (p - a) / eta, position, guide)
        augmented_grad = EntropySGLDState(
            position=jax.tree.map(lambda g, c: g - c, logdensity_grad, pull),
            guide=pull,
        )
        new_state = integrator(rng_key, state, augmented_grad, step_size, temperature)
        return EntropySGLDState(*new_state)

    return kernel


def as_top_level_api(
    grad_estimator: Callable,
    eta: float,
    temperature: float = 1.0,
) -> SamplingAlgorithm:
    """User interface for Entropy-MCMC, shaped like ``blackjax.sgld``.

    Parameters
    ----------
    grad_estimator
        ``(position, minibatch) ->`` estimate of the gradient of the full-data log
        posterior, e.g. ``blackjax.sgmcmc.gradients.grad_estimator(logprior_fn,
        loglikelihood_fn, data_size)``.
    eta
        Coupling variance between ``theta`` and the guide (total log-density units; equal
        to the reference code's ``eta``, see the module docstring).
    temperature
        Default temperature of ``step``. As in ``blackjax.sgld``, ``step`` also accepts a
        ``temperature`` argument, which overrides it.

    Returns
    -------
    A ``SamplingAlgorithm`` with ``init(position, rng_key=None) -> EntropySGLDState``
    and ``step(rng_key, state, minibatch, step_size, temperature=temperature) ->
    EntropySGLDState``. Like blackjax's SG-MCMC steps, ``step`` returns the new state
    only (no info) and is not jit-compiled.
    """
    kernel = build_kernel()
    default_temperature = temperature

    def init_fn(position: ArrayLikeTree, rng_key=None) -> EntropySGLDState:
        del rng_key
        return init(position)

    def step_fn(
        rng_key: PRNGKey,
        state: EntropySGLDState,
        minibatch: ArrayLikeTree,
        step_size: float,
        temperature: float = default_temperature,
    ) -> EntropySGLDState:
        return kernel(
            rng_key, state, grad_estimator, minibatch, step_size, eta, temperature
        )

    return SamplingAlgorithm(init_fn, step_fn)  # type: ignore[arg-type]
