"""Uncertainty-quality measures against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from gen_sr.eval.uncertainty import (
    auroc,
    calibration_curve,
    coverage,
    ence,
    sparsification,
    spearman,
    spearman_ceiling,
    uce,
    uncertainty_report,
)


def _gaussian(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """std drawn per voxel, error ~ N(0, std²): a perfectly calibrated uncertainty."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.1, 2.0, n)
    return std, rng.normal(0.0, std)


def test_auroc_by_hand() -> None:
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)  # 3 of 4 pairs
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == pytest.approx(0.5)  # a tie counts one half
    assert auroc(np.array([3.0, 1.0, 2.0]), np.array([1, 0, 0]), mask=np.array([True, True, False])) == 1.0
    assert np.isnan(auroc(np.ones(3), np.zeros(3)))


def test_spearman_is_rank_based() -> None:
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(1.0)  # against |error|
    assert spearman(x, 10 - x) == pytest.approx(-1.0)


def test_the_spearman_ceiling_is_what_a_calibrated_std_reaches_and_grows_with_the_maps_spread() -> None:
    """Errors truly drawn from N(0, std²) reach the ceiling (up to sampling); a std map that varies more ranks the
    error better even so, one that varies little cannot: 0.1-2 (20x) allows about 0.55, 0.9-1.1 about 0.06."""
    std, error = _gaussian(200_000)
    ceiling = spearman_ceiling(std, seed=1)
    assert spearman(std, error) == pytest.approx(ceiling, abs=0.01)
    assert 0.4 < ceiling < 0.6
    rng = np.random.default_rng(2)
    assert spearman_ceiling(rng.uniform(0.9, 1.1, 200_000)) < 0.1
    assert spearman_ceiling(np.exp(rng.uniform(0, 8, 200_000))) > 0.8
    assert spearman_ceiling(std, mask=std > 1.0) < ceiling  # the masked voxels' own spread


def test_sparsification_oracle_has_zero_ause_and_reverse_order_is_worse() -> None:
    err = np.random.default_rng(0).random(1000)
    perfect = sparsification(err, err)
    assert perfect["ause"] == pytest.approx(0.0) and perfect["model"][0] == 1.0
    reverse = sparsification(-err, err)
    assert reverse["ause"] > 0.3
    assert all(a >= b - 1e-12 for a, b in zip(perfect["model"], perfect["model"][1:], strict=False))  # decreasing


def test_calibrated_gaussian_errors() -> None:
    std, err = _gaussian()
    assert coverage(std, err, 1.0) == pytest.approx(norm.cdf(1) - norm.cdf(-1), abs=0.01)
    assert coverage(std, err, np.array([1.0, 2.0]))[1] == pytest.approx(norm.cdf(2) - norm.cdf(-2), abs=0.01)
    assert ence(std, err) < 0.05
    curve = calibration_curve(std, err, num_bins=5)
    np.testing.assert_allclose(curve["rmse"], curve["rmv"], rtol=0.06)
    assert uce(std, err) < 0.05
    # twice too confident: every bin's RMSE is twice its RMV
    assert ence(std / 2, err) == pytest.approx(1.0, abs=0.06)
    assert uce(std / 2, err) == pytest.approx(np.mean(std**2) * 0.75, rel=0.05)
    report = uncertainty_report(std, err)
    assert report["spearman"] > 0.3 and report["coverage_2sigma"] > report["coverage_1sigma"]
