"""Auto* guides: numpyro ``AutoContinuous`` guides whose posterior is a bayesgen family.

One module per family kind: :mod:`~bayesgen.guides.flows` (exact density),
:mod:`~bayesgen.guides.semi_implicit` (SIVI, UIVI), :mod:`~bayesgen.guides.score_based`
(kernel SIVI, SIVI-SM: the same family with score-based losses from
:mod:`bayesgen.objectives`), :mod:`~bayesgen.guides.implicit` (LIVI), :mod:`~bayesgen.guides.diffusion` (DDVI, DBVI),
:mod:`~bayesgen.guides.stochastic_flow` (SNF), :mod:`~bayesgen.guides.cmcd` (CMCD). Shared
set-up (the fixed preconditioner, the model's log-density on the flat latent inside the
guide) is in :mod:`~bayesgen.guides.base`.
"""

from bayesgen.guides.base import ModelDensityGuide, PreconditionedGuide
from bayesgen.guides.cmcd import AutoCMCD
from bayesgen.guides.flows import (
    AutoBNAF,
    AutoFlow,
    AutoMAF,
    AutoNeuralSpline,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoRealNVP,
)
from bayesgen.guides.diffusion import AutoDBVI, AutoDDVI
from bayesgen.guides.implicit import AutoLIVI
from bayesgen.guides.score_based import AutoKSIVI, AutoSIVISM
from bayesgen.guides.semi_implicit import AutoSIVI, AutoUIVI
from bayesgen.guides.stochastic_flow import AutoSNF

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
    "ModelDensityGuide",
    "PreconditionedGuide",
]
