"""Controlled Monte Carlo diffusion (CMCD): annealed Langevin dynamics with a learned control.

Vargas, Padhy, Blessing & Nuesken, "Transport meets variational inference: controlled Monte
Carlo diffusions", ICLR 2024 (../shared/METHODS.md s. 8).

In the whitened coordinates ``u`` of a fixed preconditioner (``z = m0 + L0 u``) the path
starts at ``u_0 ~ pi_0 = N(0, I)`` and takes ``B`` Euler-Maruyama steps through the
geometric annealing path

    pi_b(u) ∝ pi_0(u)^(1 - lambda_b) gamma(u)^lambda_b,   gamma(u) = p(x, m0 + L0 u),

``0 < lambda_1 <= ... <= lambda_B = 1`` (learned, monotone), with a per-step, per-coordinate
step ``eps_b`` and a control ``c(u, t)`` shared by the two directions with opposite signs:

    forward  F_b(u_b | u_{b-1}) = N(u_{b-1} + eps_b (grad log pi_b(u_{b-1}) + c(u_{b-1}, t_b)),
                                     2 eps_b I),
    backward B_b(u_{b-1} | u_b) = N(u_b + eps_b (grad log pi_b(u_b) - c(u_b, t_b)), 2 eps_b I).

With ``c = 0`` this is unadjusted Langevin annealing (each kernel its own reversal up to the
discretisation). In continuous time, ``c`` equal to a vector field that transports
``pi_t`` along the path (``d/dt pi_t = -div(pi_t c)``) makes the forward marginals exactly
``pi_t`` and the two path measures equal: the bound below is then tight. The control is
``c(u, t) = NN_1(u, t) + NN_2(t) * grad log gamma(u)`` (METHODS.md s. 8, the "PISGRAD"
network), its last layers zero, so a fresh guide is Langevin annealing.

Bound and weights
    ``log w = log gamma(u_B) + sum_b log B_b(u_{b-1} | u_b) - log pi_0(u_0)
    - sum_b log F_b(u_b | u_{b-1})`` has ``E_F[w] = p(x)`` for every control, schedule and
    step size, so ``E_F[log w] <= log p(x)``. This is the stochastic-flow path term
    (:class:`~bayesgen.families.stochastic_flow.StochasticNormalizingFlow` with one
    unadjusted step per block, no invertible layers and the control), which this family
    reuses: ``log_prob`` of a draw is ``log q(path) - log r(path | z)`` (a lower-bound
    surrogate) and ``log_importance_density`` the same term. :meth:`reference_log_ratio` (the
    stochastic flow's) runs the backward kernels from posterior draws, which gives the evidence
    upper bound ``E_B[log w] >= log p(x)`` (needs exact posterior draws: benchmarks).

Gradients are reparameterised through the start, the noise, the control and the model's
score at every step (a model gradient forward and a Hessian-vector product backward per
step). Written here because no JAX library ships CMCD as a distribution; the reference code
(METHODS.md s. 8) was read, not copied.
"""

from __future__ import annotations

from collections.abc import Callable

from bayesgen.families.stochastic_flow import StochasticNormalizingFlow


class ControlledMonteCarloDiffusion(StochasticNormalizingFlow):
    """CMCD over the flat latent (module docstring): a path-space lower-bound surrogate.

    Parameters
    ----------
    log_density : ``z -> log p(x, z)`` on the flat unconstrained latent (differentiable).
    precond_loc, precond_scale : fixed preconditioner ``z = m0 + L0 u``; ``pi_0`` is
        N(0, I) in ``u``, i.e. N(m0, L0 L0^T) in z.
    step_sizes : (B,) or (B, d) positive step sizes ``eps_b``.
    lambdas : (B,) annealing weights in [0, 1] (the last should be 1).
    control : ``(u, g, t) -> (d,)`` with ``g`` the (clipped) score of ``log gamma`` at ``u``
        and ``t = b / B``; ``None`` for uncontrolled Langevin annealing.
    score_clip, remat : as :class:`~bayesgen.families.stochastic_flow.StochasticNormalizingFlow`.
    """

    def __init__(
        self,
        log_density: Callable,
        precond_loc,
        precond_scale,
        *,
        step_sizes,
        lambdas,
        control: Callable | None = None,
        score_clip: float | None = 100.0,
        remat: bool = False,
        validate_args=None,
    ):
        super().__init__(
            log_density, precond_loc, precond_scale, step_sizes=step_sizes, lambdas=lambdas,
            langevin_steps=1, final_steps=0, mala=False, score_clip=score_clip, remat=remat,
            control=control, validate_args=validate_args,
        )
