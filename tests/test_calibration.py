"""Calibration on synthetic data whose error distribution is known: the guarantee holds as stated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from gen_sr.errors import InputError
from gen_sr.eval.calibration import (
    CalibrationVolume,
    check_calibration_settings,
    choose_shape,
    fit_calibration,
    hb_p_value,
    split_units,
    transfer_coverage,
    upper_bound,
)
from gen_sr.eval.uncertainty import miss_rate
from gen_sr.risk import Calibration, Calibrations, IntervalShape, SamplingSettings

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


def test_a_record_says_which_bound_its_rule_holds_and_counts_units() -> None:
    """RCPS records its upper confidence bound (``bound``, ``risk_upper``); CRC uses none: its record has no bound
    name and its ``risk_upper`` is the conformal miss rate ``(n R̂ + 1) / (n + 1)`` that the rule keeps at or below
    α. ``num_volumes`` counts the units the scale was fitted on (``num_units``)."""
    errors, stds = _volumes(np.random.default_rng(2), n=30)
    rcps = fit_calibration(errors, stds, method="rcps")
    assert rcps.bound == "hb" and rcps.risk_upper == pytest.approx(upper_bound(rcps.risk_hat, 30, 0.1))
    crc = fit_calibration(errors, stds, method="crc")
    assert crc.bound == "" and crc.risk_upper == pytest.approx((30 * crc.risk_hat + 1) / 31)
    assert crc.risk_hat < crc.risk_upper <= crc.alpha and crc.num_units == crc.num_volumes == 30


def test_conformal_risk_control_is_tight_in_expectation() -> None:
    alpha, n = 0.1, 100
    risks = [_true_risk(fit_calibration(*_volumes(np.random.default_rng(s), n, voxels=500), alpha=alpha,
                                        method="crc").scale) for s in range(100)]
    assert np.mean(risks) <= alpha + 0.005
    assert np.mean(risks) >= alpha - 0.02  # on new volumes from the same distribution: within 2 points of 90 %


def test_a_model_keeps_one_calibration_per_sampler_setting(tmp_path: Path) -> None:
    """``calibration.json`` holds one record as an object (the single-calibration format) and several as a list;
    a record is found by its exact settings, a record without settings stands for any, and adding one for the same
    settings replaces it in its place."""
    errors, stds = _volumes(np.random.default_rng(0), n=30)
    fit = fit_calibration(errors, stds)
    ddim, dpm = SamplingSettings("DDIM", 25, 8), SamplingSettings("DPM", 5, 8)
    a, b = dataclasses.replace(fit, sampling=ddim), dataclasses.replace(fit, scale=2 * fit.scale, sampling=dpm)
    records = Calibrations([a]).with_record(b, first=True)
    assert list(records) == [b, a] and records.find(ddim) is a and records.find(SamplingSettings("DDIM", 10, 8)) is None
    records.save(tmp_path)
    assert isinstance(json.loads((tmp_path / "calibration.json").read_text()), list)
    loaded = Calibrations.load(tmp_path)
    assert list(loaded) == [b, a] and Calibration.load(tmp_path) == b  # the first is the default settings' record
    c = dataclasses.replace(a, scale=3.0)
    assert list(loaded.with_record(c)) == [b, c]  # replaced, not added
    legacy = Calibrations([dataclasses.replace(fit, sampling=None), b])
    assert legacy.find(dpm) is b and legacy.find(ddim).sampling is None
    with pytest.raises(ValueError, match="same sampler settings"):
        Calibrations([a, c])
    Calibrations([a]).save(tmp_path)  # one record: the object format of a single calibration
    assert json.loads((tmp_path / "calibration.json").read_text())["scale"] == a.scale
    assert Calibrations.load(tmp_path / "nothing").find(ddim) is None and not Calibrations.load(tmp_path / "x")
    # a record per output grid: a run on that grid (within 10 %) uses it, others the record made on any grid
    fine = dataclasses.replace(a, scale=5.0, grid_spacing=1.0)
    per_grid = Calibrations([a]).with_record(fine)
    assert per_grid.find(ddim, 1.05) is fine and per_grid.find(ddim, 1.5) is a and per_grid.find(ddim) is a
    replaced = list(per_grid.with_record(dataclasses.replace(fine, scale=6.0)))  # its grid's record only
    assert replaced[0] is a and replaced[1].scale == 6.0 and len(replaced) == 2
    assert "for 1 mm grids" in per_grid.describe()[1]
    per_grid.save(tmp_path)
    assert list(Calibrations.load(tmp_path)) == [a, fine]
    with pytest.raises(ValueError, match="same sampler settings and grid"):
        Calibrations([fine, dataclasses.replace(fine, scale=1.0)])


def test_a_calibration_file_whose_shape_or_settings_a_newer_version_extended_loads(tmp_path: Path) -> None:
    """``calibration.json``'s ``shape`` and ``sampling`` read as a risk record's do (:func:`gen_sr.config.
    record_from_dict`): a key this version does not know is left out; a value that is no mapping is the file's one
    clear error."""
    errors, stds = _volumes(np.random.default_rng(0), n=30)
    fit = dataclasses.replace(fit_calibration(errors, stds), shape=IntervalShape(noise_floor=0.5),
                              sampling=SamplingSettings("DDIM", 25, 8))
    fit.save(tmp_path)
    written = json.loads((tmp_path / "calibration.json").read_text())
    newer = {**written, "shape": {**written["shape"], "new_term": 1.0},
             "sampling": {**written["sampling"], "sampler_variant": "x"}}
    (tmp_path / "calibration.json").write_text(json.dumps(newer))
    assert list(Calibrations.load(tmp_path)) == [fit]
    (tmp_path / "calibration.json").write_text(json.dumps({**written, "sampling": ["DDIM", 25, 8]}))
    with pytest.raises(InputError, match=r"is not a calibration record or a list of them \(SamplingSettings: "
                                         r"expected a mapping, got list\)"):
        Calibrations.load(tmp_path)


def test_a_record_per_mm_of_the_voxel_size_holds_on_every_grid_at_its_own_scale(tmp_path: Path) -> None:
    """A record per mm (``scale_per_mm``): a run on a 1.25 mm grid uses 1.25 λ, described as such; it replaces the
    per-grid records of its settings (they would win on their grids) and only those; it survives a save."""
    errors, stds = _volumes(np.random.default_rng(0), n=30)
    fit = fit_calibration(errors, stds)
    ddim, dpm = SamplingSettings("DDIM", 25, 8), SamplingSettings("DPM", 5, 8)
    a, other = dataclasses.replace(fit, sampling=ddim), dataclasses.replace(fit, sampling=dpm, grid_spacing=1.0)
    fine = dataclasses.replace(a, scale=5.0, grid_spacing=1.0)
    records = Calibrations([other, fine, a])
    per_mm = dataclasses.replace(a, scale=3.0, scale_per_mm=3.0)
    assert a.at_grid(1.25) is a and per_mm.at_grid(None) is per_mm  # any other record, or no grid: as it is
    updated = records.with_record(per_mm)
    assert list(updated) == [other, per_mm]  # in the place of the first record it replaced
    assert list(Calibrations([fine, other]).with_record(per_mm)) == [per_mm, other]  # per-grid records only
    with pytest.raises(ValueError, match="holds at an output grid only"):
        per_mm.halfwidth(np.ones((2, 2, 2)), np.ones((2, 2, 2)))  # λ per mm, with no grid to scale it
    with pytest.raises(ValueError, match="kept for its range of grids"):
        updated.with_record(updated.find(ddim, 1.5))  # a run's resolved record is not a record to keep
    run = updated.find(ddim, 1.25)
    assert run.scale == pytest.approx(3.75) and run.grid_spacing == 1.25 and run.scale_per_mm == 3.0
    assert run.describe() == "mean ± 3.75 × (std) (3 per mm of the finest output spacing (1.25 mm))"
    assert per_mm.describe() == "mean ± 3 × voxel size (mm) × (std)" and updated.find(ddim) is per_mm
    assert updated.find(dpm, 1.0) is other
    updated.save(tmp_path)
    assert list(Calibrations.load(tmp_path)) == [other, per_mm]
    with pytest.raises(ValueError, match="one scale, not one per region"):
        dataclasses.replace(per_mm, outside_scale=2.0)
    assert list(updated.with_record(fine)) == [other, fine]  # a per-grid record replaces the per-mm one: never mixed
    with pytest.raises(ValueError, match="jump between them"):
        Calibrations([per_mm, fine])
    fitted = dataclasses.replace(per_mm, fitted_grids=[1.0, 1.5])  # holds near the grids it was fitted on
    assert per_mm.mismatch(ddim, 4.0) is None and fitted.fitted_grids == (1.0, 1.5)
    assert [fitted.mismatch(ddim, g) for g in (0.85, 0.95, 1.25, 1.6, 1.7)] == ["grid", None, None, None, "grid"]
    pooled = dataclasses.replace(a, fitted_grids=(1.0, 1.5))  # fitted on grids together, not per mm: the same range
    assert pooled.mismatch(ddim, 1.2) is None and pooled.mismatch(ddim, 2.0) == "grid" and a.mismatch(ddim, 2.0) is None
    assert "fitted on 1-1.5 mm grids together" in Calibrations([pooled]).describe()[0]


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
    with pytest.raises(ValueError, match=r"even there 0\.100 of the voxels miss \(with 30 units crc allows 0\.070\)"):
        fit_calibration([np.ones(10)] * 30, [np.r_[np.zeros(1), np.ones(9)]] * 30, method="crc")
    with pytest.raises(ValueError, match=r"0\.050 of the voxels miss \(rcps needs the miss rate's 0\.9 upper bound"):
        fit_calibration([np.ones(20)] * 30, [np.r_[np.zeros(1), np.ones(19)]] * 30, method="rcps")
    with pytest.raises(ValueError, match="needs at least 22 units"):  # 0.9²² ≤ 0.1: no fewer can certify
        fit_calibration(errors[:21], stds[:21])
    # the same limits, refused before any sampling: CRC needs 1 / (n + 1) <= alpha, so 9 units at alpha 0.1
    fit_calibration(errors[:9], [s * 50 for s in stds[:9]], method="crc")
    with pytest.raises(ValueError, match="needs at least 9"):
        fit_calibration(errors[:8], [s * 50 for s in stds[:8]], method="crc")
    with pytest.raises(ValueError, match=r"crc cannot reach .* 8 units .* at least 9"):
        check_calibration_settings(4, blocks=2, method="crc")
    with pytest.raises(ValueError, match=r"rcps cannot reach .* 21 units .* at least 22"):
        check_calibration_settings(21)
    check_calibration_settings(3, blocks=3, method="crc")


def test_interval_shape_spread_by_hand() -> None:
    rng = np.random.default_rng(0)
    std, ramp = rng.uniform(0.5, 1.5, (14, 7, 8)), np.broadcast_to(3.0 * np.arange(14.0)[:, None, None], (14, 7, 8))
    np.testing.assert_array_equal(IntervalShape().spread(std, ramp), std)
    np.testing.assert_allclose(IntervalShape(noise_floor=2.0).spread(std, ramp, noise_std=0.25), std + 0.5)
    np.testing.assert_allclose(IntervalShape(smoothing=1.5).spread(np.full_like(std, 2.0), ramp), 2.0)
    smoothed = IntervalShape(smoothing=1.0).spread(std, ramp)
    assert smoothed.std() < 0.7 * std.std() and abs(smoothed.mean() - std.mean()) < 0.02
    # the gradient magnitude of a ramp of slope 3 is 3, away from the borders the smoothing repeats
    edge = IntervalShape(edge_weight=0.5).spread(np.zeros_like(std), ramp)
    np.testing.assert_allclose(edge[5:-5], 1.5, rtol=1e-5)
    as_tensor = IntervalShape(1.0, 2.0, 0.5).spread(torch.from_numpy(std)[None, None].float(),
                                                    torch.from_numpy(ramp.copy())[None, None].float(), 0.25)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (1, 1, 14, 7, 8)
    thin = IntervalShape(1.0, 0.0, 0.5).spread(std[:, :2], ramp[:, :2])  # a slab thinner than the kernel
    assert thin.shape == (14, 2, 8) and np.isfinite(thin).all()
    np.testing.assert_allclose(as_tensor[0, 0].numpy(), IntervalShape(1.0, 2.0, 0.5).spread(std, ramp, 0.25),
                               rtol=1e-5)


def _volume(rng: np.random.Generator, cell: int, edge: float, name: str = "v") -> CalibrationVolume:
    """A piecewise-constant mean with cells of ``cell`` voxels (small cells: many edges) and errors whose scale is
    the std plus ``edge`` times the edge term: the spread of ``IntervalShape(edge_weight=edge)`` is exact."""
    shape = (24, 16, 16)
    coarse = rng.uniform(0, 10, [-(-n // cell) for n in shape])
    mean = np.kron(coarse, np.ones((cell,) * 3))[:24, :16, :16]
    std = rng.uniform(0.5, 1.5, shape)
    truth_scale = IntervalShape(edge_weight=edge).spread(std, mean)
    mask = np.ones(shape, dtype=bool)
    mask[:, :2] = False
    return CalibrationVolume(name, truth_scale * rng.standard_normal(shape), mean, std, mask)


def test_split_units_have_equal_brain_volume() -> None:
    v = _volume(np.random.default_rng(0), 4, 0.0)
    v.mask[:6] = False
    v.mask[6:12, :8] = False  # an uneven mask along the split axis
    errors, spreads, masks = split_units([v], blocks=6)
    counts = [int(m.sum()) for m in masks]
    assert len(errors) == len(spreads) == 6 and sum(counts) == v.mask.sum()
    assert max(counts) - min(counts) <= 14 * 16  # equal, up to one whole slice
    assert sum(e.shape[0] for e in errors) == 24 - 0 and errors[0].shape[0] > errors[-1].shape[0]


def test_choose_shape_finds_the_spread_that_transfers() -> None:
    rng = np.random.default_rng(0)
    volumes = [_volume(rng, cell, 0.5, f"v{k}") for k, cell in enumerate((2, 3, 4, 6, 8, 12))]
    plain, edge = IntervalShape(), IntervalShape(edge_weight=0.5)
    shape, rows = choose_shape(volumes, [plain, edge, IntervalShape(noise_floor=1.0)], blocks=24, method="crc")
    assert shape == edge and rows[1]["rms"] < 0.5 * rows[0]["rms"]
    cov = transfer_coverage(volumes, edge, blocks=24, method="crc")
    assert all(abs(c - 0.9) < 0.02 for c in cov)  # exchangeable once the spread is right
    # the plain std under-covers some volumes and over-covers those with few edges (the largest cells)
    assert min(rows[0]["coverages"]) < 0.87 and rows[0]["coverages"][-1] > 0.93
    with pytest.raises(ValueError, match="at least 3"):
        choose_shape(volumes[:2])


def test_calibration_records_its_shape(tmp_path: Path) -> None:
    errors, stds = _volumes(np.random.default_rng(0), n=30)
    cal = dataclasses.replace(fit_calibration(errors, stds), shape=IntervalShape(1.0, 0.5, 0.2))
    cal.save(tmp_path)
    assert Calibration.load(tmp_path) == cal
    assert "std smoothed over 1 voxel + 0.5 × noise std + 0.2 × |∇ mean|" in cal.describe()
    std, mean = np.ones((6, 6, 6)), np.zeros((6, 6, 6))
    np.testing.assert_allclose(cal.halfwidth(std, mean, noise_std=2.0), cal.scale * 2.0)


def test_a_calibration_records_its_sampler_settings_and_a_run_with_others_warns(tmp_path: Path) -> None:
    import warnings

    from helpers import tiny_pipeline

    from gen_sr.eval.calibration import calibrate
    from gen_sr.eval.cases import simulate_case
    from gen_sr.pipelines.pipeline_latent_sr import CalibrationMismatchWarning
    from gen_sr.risk import SamplingSettings
    from gen_sr.volume import Volume

    pipe = tiny_pipeline()
    # a card that refits where the data disagree: noise-free cases and runs do not (it does nothing there)
    pipe.model_card = dataclasses.replace(pipe.model_card, refit_disagreement=True)
    rng = np.random.default_rng(0)
    cases = [simulate_case(Volume(rng.random((16, 16, 12)).astype(np.float32) + 0.5, np.eye(4)), f"v{k}",
                           thickness=3.0) for k in range(3)]
    settings = {"num_samples": 2, "num_inference_steps": 2, "batch_size": 16}
    result = calibrate(pipe, cases, method="crc", alpha=0.3, progress=False,
                       generator=[torch.Generator().manual_seed(k) for k in range(2)], **settings)
    expected = SamplingSettings("DDIMDataConsistencyScheduler", 2, 2, 1.0)
    assert result.calibration.sampling == expected
    result.calibration.save(tmp_path)
    pipe.calibration = Calibration.load(tmp_path)
    assert pipe.calibration.sampling == expected  # through JSON
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationMismatchWarning)
        pipe(cases[0].lr, noise_std=0.0, **settings)  # the calibrated settings (noise-free cases): silent
    for other in ({"num_inference_steps": 3}, {"num_samples": 3}, {"strength": 0.5}):
        with pytest.warns(CalibrationMismatchWarning, match="made with 2 samples, DDIM, 2 steps"):
            pipe(cases[0].lr, noise_std=0.0, **(settings | other))
    # the refit where the data disagree narrows the spread there: a calibration made without it does not hold for it;
    # without noise it does nothing, so the calibration holds
    with pytest.warns(CalibrationMismatchWarning, match="refitted where the data disagree"):
        pipe(cases[0].lr, **settings, noise_std=0.05, refit_disagreement=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationMismatchWarning)
        pipe(cases[0].lr, **settings, noise_std=0.0, refit_disagreement=True)
    # calibrated per grid only, for 2 and 3 mm: a 1 mm run uses the nearest grid's record, and says so
    made = pipe.calibration
    pipe.calibrations = Calibrations([dataclasses.replace(made, scale=2.0, grid_spacing=2.0),
                                      dataclasses.replace(made, scale=3.0, grid_spacing=3.0)])
    with pytest.warns(CalibrationMismatchWarning, match="made for 1 mm output grids .* the one for 2 mm grids"):
        assert pipe.calibration_for(expected, warn=True, grid_spacing=1.0).scale == 2.0
    assert pipe.calibration_for(expected, grid_spacing=2.9).scale == 3.0
    other = dataclasses.replace(expected, num_samples=4)  # other settings: the default settings' record of this grid
    with pytest.warns(CalibrationMismatchWarning, match="which no calibration of the model was made with"):
        assert pipe.calibration_for(other, warn=True, grid_spacing=2.9).scale == 3.0


def test_the_refit_is_in_the_settings_only_where_the_runs_have_noise() -> None:
    """A model card that refits by default: runs given noise record it, noise-free ones do not (the refit does
    nothing there), and calibrations decide from their own cases (the test above)."""
    from helpers import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.model_card = dataclasses.replace(pipe.model_card, refit_disagreement=True)
    assert pipe.sampling_settings(noise_std=0.05).refit_disagreement is True
    assert pipe.sampling_settings(noise_std=0.0).refit_disagreement is False
    assert pipe.sampling_settings().refit_disagreement is True  # noise not known (a calibration's own cases decide)
    assert pipe.sampling_settings(noise_std=0.05, refit_disagreement=False).refit_disagreement is False
    assert "refitted where the data disagree" in pipe.sampling_settings(noise_std=0.05).describe()
