"""Shared pytest setup: keep arviz and matplotlib from writing into the user's home."""

import os
import tempfile

# arviz_base reads ARVIZ_DATA for its data folder; arviz_plots imports matplotlib, which
# writes its font cache under MPLCONFIGDIR (default ~/.config/matplotlib, ~/.cache/matplotlib).
_scratch = os.path.join(tempfile.gettempdir(), "bayesgen-tests-home")
os.environ.setdefault("ARVIZ_DATA", os.path.join(_scratch, "arviz_data"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_scratch, "matplotlib"))
# jaxlib's CPU triangular solves call OpenBLAS, whose threads stall each other (about 8 ms a
# call) when pytest-xdist already runs one worker per core: one BLAS thread per worker.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
