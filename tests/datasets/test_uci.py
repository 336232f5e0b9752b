"""Tests for the bundled UCI regression datasets and their regenerated splits."""

from pathlib import Path

import numpy as np
import pytest

from bayesgen.datasets import UCI_DATASETS, UCISplit, load_uci, uci_splits

# The shared copy sits beside the repository (../shared/data/uci); a user's clone may lack it.
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "uci"

# (rows, features, splits) from the table in the shared README.
EXPECTED = {
    "bostonHousing": (506, 13, 20),
    "concrete": (1030, 8, 20),
    "energy": (768, 8, 20),
    "kin8nm": (8192, 8, 20),
    "naval-propulsion-plant": (11934, 16, 20),
    "power-plant": (9568, 4, 20),
    "protein-tertiary-structure": (45730, 9, 5),
    "wine-quality-red": (1599, 11, 20),
    "yacht": (308, 6, 20),
}


def _shared(name: str) -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared UCI data not found at {SHARED}")
    return SHARED / name


def test_dataset_names():
    assert UCI_DATASETS == tuple(EXPECTED)


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_load_shapes_and_standardisation(name):
    n, d, n_splits = EXPECTED[name]
    s = load_uci(name, split=n_splits - 1)
    assert isinstance(s, UCISplit)
    n_train = int(np.round(0.9 * n))
    assert s.x_train.shape == (n_train, d) and s.x_test.shape == (n - n_train, d)
    assert s.y_train.shape == (n_train,) and s.y_test.shape == (n - n_train,)
    for a in (s.x_train, s.y_train, s.x_test, s.y_test):
        assert a.dtype == np.float32 and np.isfinite(a).all()
    assert (s.name, s.split) == (name, n_splits - 1)
    assert (s.n_hidden, s.n_epochs) == ((100, 20) if name.startswith("protein") else (50, 40))

    const = np.ptp(s.x_train, axis=0) == 0
    assert np.all(s.x_std[const] == 1) and np.all(s.x_train[:, const] == 0)
    np.testing.assert_allclose(s.x_train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(s.x_train[:, ~const].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(s.y_train.mean(), 0, atol=1e-4)
    np.testing.assert_allclose(s.y_train.std(), 1, atol=1e-4)

    raw = load_uci(name, split=n_splits - 1, standardize=False)
    assert not raw.standardized
    np.testing.assert_allclose(s.unstandardize_y(s.y_test), raw.y_test, rtol=1e-5, atol=1e-5 * raw.y_std)
    np.testing.assert_array_equal(raw.unstandardize_y(raw.y_test), raw.y_test)
    np.testing.assert_allclose((raw.x_test - s.x_mean) / s.x_std, s.x_test, atol=1e-4)
    np.testing.assert_allclose(raw.y_train.mean(dtype=np.float64), raw.y_mean, rtol=1e-6)


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_splits_partition_rows(name):
    n, _, n_splits = EXPECTED[name]
    splits = uci_splits(name)
    assert len(splits) == n_splits
    for train, test in splits:
        assert len(train) == int(np.round(0.9 * n)) and len(test) == n - len(train)
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
    assert not np.array_equal(splits[0][0], splits[1][0])


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_splits_match_reference_files(name):
    folder = _shared(name)
    splits = uci_splits(name)
    assert len(splits) == int((folder / "n_splits.txt").read_text())
    for i, (train, test) in enumerate(splits):
        ref_train = np.loadtxt(folder / f"index_train_{i}.txt", dtype=np.int64)
        ref_test = np.loadtxt(folder / f"index_test_{i}.txt", dtype=np.int64)
        np.testing.assert_array_equal(train, ref_train, err_msg=f"{name} split {i} train")
        np.testing.assert_array_equal(test, ref_test, err_msg=f"{name} split {i} test")


@pytest.mark.parametrize("name", UCI_DATASETS)
def test_bundled_data_equals_shared(name):
    folder = _shared(name)
    ref = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=np.int64, ndmin=1)
    target = int(np.loadtxt(folder / "index_target.txt", dtype=np.int64))
    train, test = uci_splits(name)[0]
    s = load_uci(name, split=0, standardize=False)
    # float64 -> float32 is the only change between the file and the returned arrays.
    np.testing.assert_array_equal(s.x_train, ref[train][:, features].astype(np.float32))
    np.testing.assert_array_equal(s.x_test, ref[test][:, features].astype(np.float32))
    np.testing.assert_array_equal(s.y_train, ref[train, target].astype(np.float32))
    np.testing.assert_array_equal(s.y_test, ref[test, target].astype(np.float32))

    from bayesgen.datasets.uci import _raw

    bundled = _raw(name)
    assert bundled.dtype == ref.dtype and bundled.shape == ref.shape
    assert bundled.tobytes() == ref.tobytes()


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown UCI dataset 'boston'.*bostonHousing.*yacht"):
        load_uci("boston")
    with pytest.raises(ValueError, match="valid names"):
        uci_splits("Yacht")


@pytest.mark.parametrize(
    "name, split, n_splits",
    [("yacht", 20, 20), ("yacht", -1, 20), ("protein-tertiary-structure", 5, 5)],
)
def test_split_out_of_range(name, split, n_splits):
    with pytest.raises(ValueError, match=f"has {n_splits} splits"):
        load_uci(name, split=split)


def test_split_not_integer():
    with pytest.raises(ValueError, match="integer"):
        load_uci("yacht", split=1.0)


def test_splits_are_independent_copies():
    a = uci_splits("yacht")
    a[0][0][:] = 0
    assert len(np.unique(uci_splits("yacht")[0][0])) == 277
    before = np.random.get_state()[1].copy()
    uci_splits("energy")
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG untouched
