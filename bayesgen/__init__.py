"""bayesgen: expressive posterior approximations as numpyro guides.

Every variational family is a numpyro distribution over the flat unconstrained latent
(:mod:`bayesgen.families`); guides (:mod:`bayesgen.guides`) wrap them for a model;
:func:`fit` runs SVI with checkpoints and clear errors; :func:`diagnose` reports PSIS
k-hat and an importance-weighted evidence estimate; :func:`mcmc.run` samples the same
model with blackjax kernels, and :func:`compare` puts VI and MCMC results side by side.
"""

from bayesgen import mcmc
from bayesgen.diagnostics.compare import Comparison, compare
from bayesgen.diagnostics.psis import Diagnosis, SurrogateDensityError, diagnose
from bayesgen.errors import ModelStructureError, NonFiniteLossError
from bayesgen.families.base import Family
from bayesgen.families.flows import FlowFamily
from bayesgen.fit import EarlyStop, FitResult, fit
from bayesgen.guides import (
    AutoBNAF,
    AutoCMCD,
    AutoDBVI,
    AutoDDVI,
    AutoFlow,
    AutoMAF,
    AutoNeuralSpline,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoKSIVI,
    AutoLIVI,
    AutoRealNVP,
    AutoSIVI,
    AutoSIVISM,
    AutoSNF,
    AutoUIVI,
)
from bayesgen.objectives import KernelSteinLoss, ScoreMatchingLoss

__version__ = "0.1.0"

__all__ = [
    "AutoBNAF",
    "AutoCMCD",
    "AutoDBVI",
    "AutoDDVI",
    "AutoFlow",
    "AutoKSIVI",
    "AutoLIVI",
    "AutoMAF",
    "AutoNeuralSpline",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoRealNVP",
    "AutoSIVI",
    "AutoSIVISM",
    "AutoSNF",
    "AutoUIVI",
    "Comparison",
    "Diagnosis",
    "EarlyStop",
    "Family",
    "FitResult",
    "FlowFamily",
    "KernelSteinLoss",
    "ModelStructureError",
    "NonFiniteLossError",
    "ScoreMatchingLoss",
    "SurrogateDensityError",
    "compare",
    "diagnose",
    "fit",
    "mcmc",
]
