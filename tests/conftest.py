"""Shared pytest setup: keep arviz and matplotlib from writing into the user's home."""

import os
import tempfile

# arviz_base reads ARVIZ_DATA for its data folder; arviz_plots imports matplotlib, which
# writes its font cache under MPLCONFIGDIR (default ~/.config/matplotlib, ~/.cache/matplotlib).
_scratch = os.path.join(tempfile.gettempdir(), "bayesgen-tests-home")
os.environ.setdefault("ARVIZ_DATA", os.path.join(_scratch, "arviz_data"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_scratch, "matplotlib"))
