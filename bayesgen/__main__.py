"""``python -m bayesgen CMD ...``: the ``bayesgen`` command, for environments where the package
is on ``PYTHONPATH`` rather than installed (a lent GPU machine, ``scripts/device-dgp.sh``)."""

import sys

from bayesgen.cli import main

sys.exit(main())
