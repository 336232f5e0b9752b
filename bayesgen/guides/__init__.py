"""Auto* guides: numpyro ``AutoContinuous`` guides whose posterior is a bayesgen family.

One module per family kind: :mod:`~bayesgen.guides.flows` (exact density),
:mod:`~bayesgen.guides.semi_implicit` (SIVI, UIVI, kernel SIVI, SIVI-SM),
:mod:`~bayesgen.guides.implicit` (LIVI). Shared set-up (the fixed preconditioner, the
model's log-density on the flat latent) is in :mod:`~bayesgen.guides.base`.
"""

from bayesgen.guides.base import PreconditionedGuide
from bayesgen.guides.flows import (
    AutoBNAF,
    AutoFlow,
    AutoMAF,
    AutoNeuralSpline,
    AutoPlanarFlow,
    AutoRadialFlow,
    AutoRealNVP,
)
from bayesgen.guides.semi_implicit import AutoSIVI, AutoUIVI

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
    "PreconditionedGuide",
]
