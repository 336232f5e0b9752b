"""What the scale-finding start buys on a badly conditioned posterior.

Unstandardised logistic regression on the bundled breast-cancer data (31 coefficients,
posterior sds from about 0.012 to 4.1). Fits AutoRealNVP with its default pathfinder-style
start, the same guide with ``init_scale=None`` (unit scale at the model's initial point),
and numpyro's AutoMultivariateNormal, all with the same optimiser, and counts the
coordinates within 0.1 reference sd of the reference mean and within 10% of its sd
(reference: the stored long NUTS run).

Run: ``.venv/bin/python examples/unstandardized_logistic.py [steps]``
"""

import sys

import jax
import numpy as np
from numpyro.infer.autoguide import AutoMultivariateNormal

import bayesgen
from bayesgen.fit import default_optimizer
from bayesgen.models.targets import get_target


def main(steps=3000):
    target = get_target("logistic_regression", standardize=False)
    ref = target.reference(jax.random.key(0), 4000)
    guides = {
        "AutoRealNVP (default start)": lambda m: bayesgen.AutoRealNVP(m),
        "AutoRealNVP (init_scale=None)": lambda m: bayesgen.AutoRealNVP(m, init_scale=None),
        "numpyro AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    }
    sites = ("beta", "intercept")
    y = np.concatenate([np.asarray(ref[k]).reshape(4000, -1) for k in sites], 1)
    for name, make in guides.items():
        res = bayesgen.fit(target.model, make(target.model), *target.args, steps=steps,
                           optimizer=default_optimizer(steps, 2e-3), num_particles=4,
                           progress_bar=False, **dict(target.kwargs))
        s = res.sample(jax.random.key(1), 4000)
        x = np.concatenate([np.asarray(s[k]).reshape(4000, -1) for k in sites], 1)
        z = np.abs(x.mean(0) - y.mean(0)) / y.std(0)
        lsr = np.abs(np.log(x.std(0) / y.std(0)))
        within = int(((z < 0.1) & (lsr < np.log(1.1))).sum())
        print(f"{name:32s} within(0.1 sd, 10%) {within:2d} of {len(z)}   "
              f"max mean err {z.max():.3f} sd   max |log sd ratio| {lsr.max():.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
