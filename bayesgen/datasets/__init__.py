"""Data sets shipped with bayesgen (read from package data with :mod:`importlib.resources`).

See ``bayesgen/data/README.md`` for sources, licences and citations.
"""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources

import numpy as np

from bayesgen.datasets.uci import UCI_DATASETS, UCISplit, load_uci, uci_splits

__all__ = [
    "load_breast_cancer",
    "BREAST_CANCER_FEATURES",
    "data_path",
    "load_uci",
    "uci_splits",
    "UCI_DATASETS",
    "UCISplit",
]


def data_path(filename: str):
    """A :class:`importlib.resources.abc.Traversable` for ``bayesgen/data/<filename>``.

    Anchored at the ``bayesgen`` package; while ``bayesgen`` is still a namespace package
    (no ``__init__.py``, which ``importlib.resources`` cannot read under an editable
    install) it falls back to this regular package's sibling folder.
    """
    try:
        return resources.files("bayesgen").joinpath("data", filename)
    except (NotADirectoryError, TypeError, ValueError):
        return resources.files(__name__).parent.joinpath("data", filename)

_FEATURES = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave_points",
    "symmetry",
    "fractal_dimension",
)
BREAST_CANCER_FEATURES = (
    tuple(f"mean_{f}" for f in _FEATURES)
    + tuple(f"{f}_error" for f in _FEATURES)
    + tuple(f"worst_{f}" for f in _FEATURES)
)
"""Column names of the breast-cancer features, in file order.

``mean_*`` are means over the nuclei in the image, ``*_error`` their standard errors,
``worst_*`` the mean of the three largest values.
"""


@functools.lru_cache(maxsize=None)
def _read_breast_cancer():
    text = data_path("breast_cancer.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    if tuple(header) != BREAST_CANCER_FEATURES + ("malignant",):
        raise ValueError("bayesgen/data/breast_cancer.csv has an unexpected header")
    arr = np.array(body, dtype=np.float64)
    return arr[:, :30], arr[:, 30].astype(np.int64), tuple(header[:30])


def load_breast_cancer(return_feature_names: bool = False):
    """Load the Wisconsin diagnostic breast-cancer data (569 samples, 30 features).

    Parameters
    ----------
    return_feature_names : bool
        Also return the tuple of the 30 column names from the file header.

    Returns
    -------
    X : np.ndarray, shape (569, 30), float64
        Raw (unstandardised) features.
    y : np.ndarray, shape (569,), int64
        1 = malignant (212 cases), 0 = benign (357 cases).
    feature_names : tuple of str, only if ``return_feature_names``

    References
    ----------
    Wolberg, W. H., Street, W. N. and Mangasarian, O. L. (1995). Breast Cancer Wisconsin
    (Diagnostic). UCI Machine Learning Repository, https://doi.org/10.24432/C5DW2B.
    Licence CC BY 4.0.
    """
    X, y, names = _read_breast_cancer()
    X, y = X.copy(), y.copy()
    if return_feature_names:
        return X, y, names
    return X, y
