"""bayesgen: expressive posterior approximations as numpyro guides.

Every variational family is a numpyro distribution over the flat unconstrained latent
(:mod:`bayesgen.families`); guides (:mod:`bayesgen.guides`) wrap them for a model;
:func:`fit` runs SVI with checkpoints and clear errors; :func:`diagnose` reports PSIS
k-hat and an importance-weighted evidence estimate.
"""

from bayesgen.diagnostics.psis import Diagnosis, SurrogateDensityError, diagnose
from bayesgen.errors import ModelStructureError, NonFiniteLossError
from bayesgen.families.base import Family
from bayesgen.families.flows import FlowFamily
from bayesgen.fit import EarlyStop, FitResult, fit
from bayesgen.guides import (
    AutoBNAF,
    AutoFlow,
    AutoMAF,
    AutoNeuralSpline,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoRealNVP,
    AutoSIVI,
    AutoUIVI,
)

__version__ = "0.1.0"

__all__ = [
    "AutoBNAF",
    "AutoFlow",
    "AutoMAF",
    "AutoNeuralSpline",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoRealNVP",
    "AutoSIVI",
    "AutoUIVI",
    "Diagnosis",
    "EarlyStop",
    "Family",
    "FitResult",
    "FlowFamily",
    "ModelStructureError",
    "NonFiniteLossError",
    "SurrogateDensityError",
    "diagnose",
    "fit",
]
