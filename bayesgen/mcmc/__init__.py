"""MCMC beside VI: blackjax kernels on numpyro models (:func:`run`), SG-MCMC with
minibatches, and Entropy-MCMC (:mod:`bayesgen.mcmc.entropy_mcmc`)."""

from bayesgen.mcmc.sampling import KERNELS, MCMCResult, run

__all__ = ["KERNELS", "MCMCResult", "run"]
