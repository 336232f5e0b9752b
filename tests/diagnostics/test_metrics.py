"""Distances between draws: mean error, sd ratio, energy distance, sliced Wasserstein."""

import numpy as np
import pytest

from bayesgen.diagnostics.metrics import (
    energy_distance,
    flatten_draws,
    log_sd_ratio,
    mean_error_in_sd,
    sliced_wasserstein,
)


@pytest.fixture(scope="module")
def gauss():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3))
    return a, b


def test_mean_error_and_sd_ratio_known_values(gauss):
    a, b = gauss
    shifted = b * 2.0 + np.array([0.5, 0.0, -1.0])
    err = mean_error_in_sd(shifted, a)
    np.testing.assert_allclose(err, [0.5, 0.0, 1.0], atol=0.1)
    np.testing.assert_allclose(log_sd_ratio(shifted, a), np.log(2.0), atol=0.05)
    # a dict of (mean, sd) reference gives the same as the draws themselves
    samples = {"u": shifted[:, 0], "w": shifted[:, 1:]}
    ref = {"u": a[:, 0], "w": a[:, 1:]}
    moments = {k: (v.mean(0), v.std(0, ddof=1)) for k, v in ref.items()}
    np.testing.assert_allclose(mean_error_in_sd(samples, moments), mean_error_in_sd(samples, ref))
    np.testing.assert_allclose(log_sd_ratio(samples, moments), log_sd_ratio(samples, ref))


def test_dict_inputs_use_shared_sites_in_reference_order():
    rng = np.random.default_rng(1)
    ref = {"b": rng.normal(size=(100, 2)), "a": rng.normal(size=(100,)), "extra": rng.normal(size=(100,))}
    x = {"a": ref["a"] + 1.0, "b": ref["b"]}
    err = mean_error_in_sd(x, ref)
    assert err.shape == (3,)
    np.testing.assert_allclose(err[:2], 0.0, atol=1e-12)  # "b" first, as in the reference
    assert err[2] > 0.5
    assert flatten_draws(ref).shape == (100, 4)
    with pytest.raises(KeyError, match="share no site"):
        mean_error_in_sd({"c": ref["a"]}, ref)
    with pytest.raises(KeyError, match="missing"):
        mean_error_in_sd(x, ref, sites=["extra"])


def test_energy_distance_zero_for_same_distribution_and_positive_for_shift(gauss):
    a, b = gauss
    same = energy_distance(a, b, seed=0)
    assert abs(same) < 0.01
    # a half-sd shift in one coordinate is clearly detected
    shift = energy_distance(b + np.array([0.5, 0.0, 0.0]), a, seed=0)
    assert shift > 0.05
    assert shift > 10 * abs(same)
    # identical inputs: the U-statistic is slightly negative (about -2 E||X - X'|| / n)
    assert energy_distance(a[:500], a[:500]) < 0
    # scale-free by default: rescaling both inputs leaves it unchanged
    np.testing.assert_allclose(
        energy_distance(100 * (b + [0.5, 0, 0]), 100 * a, seed=0), shift, rtol=1e-10
    )
    # subsampling is seeded
    assert energy_distance(b, a, seed=3) == energy_distance(b, a, seed=3)


def test_energy_distance_matches_closed_form_in_1d():
    # For N(0,1) vs N(d,1): D^2 = 2 E|Z + d| - 2 E|Z'| with Z ~ N(0, 2), Z' ~ N(0, 2)
    from scipy import stats

    d = 1.0
    s = np.sqrt(2.0)
    e_shift = s * np.sqrt(2 / np.pi) * np.exp(-(d**2) / (2 * s**2)) + d * (1 - 2 * stats.norm.cdf(-d / s))
    e_same = s * np.sqrt(2 / np.pi)
    truth = 2 * e_shift - 2 * e_same
    rng = np.random.default_rng(2)
    # unbiased: the average of 8 replicates (sd of one about 0.04) is within 10% of the truth
    est = np.mean(
        [
            energy_distance(rng.normal(size=2000) + d, rng.normal(size=2000), standardize=False)
            for _ in range(8)
        ]
    )
    assert abs(est - truth) < 0.1 * truth


def test_sliced_wasserstein_pure_shift_in_1d():
    rng = np.random.default_rng(3)
    x = rng.normal(size=1000)
    for c in (0.0, 0.7, -2.5):
        np.testing.assert_allclose(sliced_wasserstein(x + c, x), abs(c), atol=1e-10)
        np.testing.assert_allclose(sliced_wasserstein(x + c, x, p=1), abs(c), atol=1e-10)
    # unequal sizes go through common quantile levels
    y = rng.normal(size=1500)
    np.testing.assert_allclose(sliced_wasserstein(y + 1.0, y[::2][:700]), 1.0, atol=0.1)
    assert abs(sliced_wasserstein(x + 1.0, y) - 1.0) < 0.1


def test_sliced_wasserstein_multid_shift():
    # SW_2 of a shift c in d dims is |c| sqrt(E[(theta . e)^2]) = |c| / sqrt(d)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 4))
    c = np.array([2.0, 0.0, 0.0, 0.0])
    sw = sliced_wasserstein(x + c, x, num_projections=2000, seed=0)
    np.testing.assert_allclose(sw, 2.0 / 2.0, rtol=0.05)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x + c, x, seed=1) == sliced_wasserstein(x + c, x, seed=1)
