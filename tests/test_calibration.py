"""Calibration on synthetic data whose error distribution is known: the guarantee holds as stated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from gen_sr.eval.calibration import Calibration, fit_calibration, hb_p_value, miss_rate, upper_bound

SCALE_SPREAD = 0.25  # per-volume log-normal spread of the error scale: volumes differ, as real ones do


def _volumes(rng: np.random.Generator, n: int, voxels: int = 2000) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Errors ``e = s_v σ z`` with σ per voxel, a scale ``s_v`` per volume and ``z ~ N(0, 1)``."""
    stds = [rng.uniform(0.5, 1.5, voxels) for _ in range(n)]
    scales = np.exp(rng.normal(0.0, SCALE_SPREAD, n))
    return [s * sd * rng.standard_normal(voxels) for s, sd in zip(scales, stds, strict=True)], stds


_S = np.exp(norm.ppf((np.arange(4000) + 0.5) / 4000) * SCALE_SPREAD)  # quadrature of the volume scale


def _true_risk(lam: float) -> float:
    """Expected miss rate of ``mean ± λσ`` on a new volume: ``E_s[2 Φ(−λ / s)]``."""
    return float(np.mean(2 * norm.cdf(-lam / _S)))


def test_miss_rate_by_hand() -> None:
    err, std = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 1.0, 0.0])
    assert miss_rate(err, std, np.array([0.0, 1.0, 2.5])).tolist() == [0.75, 0.5, 0.25]
    assert miss_rate(err, std, 1.5, mask=np.array([True, True, True, False])) == pytest.approx(1 / 3)


def test_bounds_are_upper_bounds() -> None:
    assert upper_bound(0.05, 100, 0.1, "hoeffding") == pytest.approx(0.05 + np.sqrt(np.log(10) / 200))
    hb = upper_bound(0.05, 100, 0.1)
    assert 0.05 < hb < upper_bound(0.05, 100, 0.1, "hoeffding")  # Bentkus is tighter at small risks
    assert hb_p_value(hb, 100, 0.1) <= 0.1 + 1e-9 or hb_p_value(0.05, 100, hb) <= 0.1 + 1e-6


@pytest.mark.parametrize(("bound", "n"), [("hb", 40), ("hoeffding", 300)])
def test_rcps_violation_rate_is_at_most_delta(bound: str, n: int) -> None:
    alpha, delta, trials = 0.1, 0.1, 150
    violations, scales = 0, []
    for seed in range(trials):
        errors, stds = _volumes(np.random.default_rng(seed), n=n, voxels=500)
        cal = fit_calibration(errors, stds, alpha=alpha, delta=delta, bound=bound)
        violations += _true_risk(cal.scale) > alpha
        scales.append(cal.scale)
    # the guarantee: P(risk > α) ≤ δ; allow three binomial standard errors of the estimate
    assert violations / trials <= delta + 3 * np.sqrt(delta * (1 - delta) / trials)
    assert _true_risk(float(np.median(scales))) < alpha  # and it is not vacuous:
    assert float(np.median(scales)) < 3.0  # the oracle λ for α = 0.1 is about 1.7


def test_conformal_risk_control_is_tight_in_expectation() -> None:
    alpha, n = 0.1, 100
    risks = [_true_risk(fit_calibration(*_volumes(np.random.default_rng(s), n, voxels=500), alpha=alpha,
                                        method="crc").scale) for s in range(100)]
    assert np.mean(risks) <= alpha + 0.005
    assert np.mean(risks) >= alpha - 0.02  # on new volumes from the same distribution: within 2 points of 90 %


def test_save_load_and_errors(tmp_path: Path) -> None:
    errors, stds = _volumes(np.random.default_rng(0), n=30)
    cal = fit_calibration(errors, stds, details={"volumes": "synthetic"})
    cal.save(tmp_path)
    assert Calibration.load(tmp_path) == cal and Calibration.load(tmp_path / "nothing") is None
    assert cal.risk_hat <= cal.risk_upper <= cal.alpha + 1e-6
    with pytest.raises(ValueError, match="at least 2 volumes"):
        fit_calibration(errors[:1], stds[:1])
    with pytest.raises(ValueError, match="reaches a miss rate"):
        fit_calibration([np.ones(10)] * 3, [np.zeros(10)] * 3)
    with pytest.raises(ValueError, match="needs at least 22 volumes"):  # 0.9²² ≤ 0.1: no fewer can certify
        fit_calibration(errors[:21], stds[:21])
