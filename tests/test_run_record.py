"""The typed run record and plan (:mod:`gen_sr.run_record`): the JSON beside a run's outputs reads back into one
record, with one set of defaults for what older records lack, and a call prepares from the plan ``plan`` returns."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from helpers import tiny_pipeline

from gen_sr.io import json_ready
from gen_sr.risk import Calibration, CalibrationMismatchWarning, IntervalShape, SamplingSettings, mismatch_text
from gen_sr.run_record import (
    CohortRecord,
    RiskRecord,
    RunPlan,
    RunRecord,
    TimeEstimate,
    describe_risk,
    run_calibration,
)
from gen_sr.volume import Volume

PLAIN = {"alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb", "num_volumes": 30, "risk_hat": 0.09,
         "risk_upper": 0.1}


def _lr() -> Volume:
    data = np.random.default_rng(0).random((12, 10, 5)).astype(np.float32) * 100 + 50
    return Volume(data, np.diag([1.0, 1.0, 3.0, 1.0]))


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_runs_record_reads_back_from_its_json_as_it_was_written() -> None:
    pipe = tiny_pipeline(2)
    out = pipe(_lr(), num_samples=2, generator=_gens(4, 5), noise_std=2.0)
    written = json.loads(json.dumps(json_ready(out.metadata)))  # as super-resolve writes it and audit reads it
    record = RunRecord.from_dict(written)
    assert json.dumps(record.to_dict()) == json.dumps(written) and record == out.record  # its keys in their order
    assert record.seeds == (4, 5) and record.noise_std == 2.0 and record.shared_first_call == (False,)
    assert record.sampling == pipe.sampling_settings(num_samples=2, noise_std=2.0)
    assert record.grid_spacing == 1.0 and record.max_relative_residual == max(written["relative_residual"])
    assert record.acquisition().to_dict() == written["operator"]
    assert "adaptation" not in written and "output_digests" not in written  # set by the commands that write files
    # what a cohort adds to its scans' records is not the run's
    assert RunRecord.from_dict({**written, "input": "a.nii.gz", "finished": True, "seconds": 3.0}) == record
    with pytest.raises(ValueError, match="not a run record"):
        RunRecord.from_dict({"input": "a.nii.gz", "finished": False})


def test_a_record_written_before_a_field_existed_reads_with_one_set_of_defaults() -> None:
    """Each field a record lacks takes its documented default, in one place (``RunRecord.from_dict``); a record
    without its sampler takes the model's default calibration at the run's grid."""
    pipe = tiny_pipeline(2)
    full = json.loads(json.dumps(json_ready(pipe(_lr(), num_samples=2, generator=_gens(0, 1),
                                                 noise_std=0.0).metadata)))
    later = ("strength", "share_first_call", "shared_first_call", "refit_disagreement", "noise_known",
             "noise_std_in_plane", "capped_fraction", "outside_training", "input_digest", "timings")
    old = RunRecord.from_dict({**{k: v for k, v in full.items() if k not in later}, "noise_std": None})
    assert (old.strength, old.share_first_call, old.refit_disagreement, old.noise_known) == (1.0, False, False, True)
    assert old.noise_std == 0.0 and old.shared_first_call == () and old.timings == {}
    assert old.capped_fraction is None and old.outside_training is None and old.input_digest is None
    assert old.sampling == pipe.sampling_settings(num_samples=2, noise_std=0.0)
    unsampled = RunRecord.from_dict({k: v for k, v in full.items() if k != "scheduler"})
    assert unsampled.sampling is None and run_calibration(pipe, unsampled) is None
    pipe.calibration = Calibration(scale=3.0, **PLAIN, sampling=pipe.sampling_settings(num_samples=5),
                                   scale_per_mm=3.0, fitted_grids=(1.0,))
    assert run_calibration(pipe, unsampled).scale == pytest.approx(3.0 * unsampled.grid_spacing)


def test_the_call_prepares_from_the_plan_that_plan_returns() -> None:
    """``plan`` and the call share one preparation: what the plan finds is what the run records, and only the call
    warns (here: a calibration made for other settings, and overlapping slices fitted only partially)."""
    pipe = tiny_pipeline(2)
    pipe.calibration = Calibration(scale=2.0, **PLAIN, sampling=pipe.sampling_settings(num_samples=5))
    lr = _lr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = pipe.plan(lr, slice_thickness=6.0, noise_std=0.0, num_samples=2)
    with pytest.warns(CalibrationMismatchWarning, match="which no calibration of the model was made with"), \
            pytest.warns(UserWarning, match="fitted only partially"):
        out = pipe(lr, slice_thickness=6.0, noise_std=0.0, num_samples=2, generator=_gens(0, 1))
    record = out.record
    assert isinstance(plan, RunPlan) and plan.settings == record.sampling and plan.axes == record.sr_axes
    assert plan.operator.to_dict() == record.operator and plan.grid_spacing == record.grid_spacing
    assert (plan.noise_std, plan.noise_std_in_plane) == (record.noise_std, record.noise_std_in_plane)
    assert plan.outside_training == record.outside_training and plan.capped_fraction == record.capped_fraction > 0
    assert plan.calibration_mismatch == "settings"
    assert record.risk == describe_risk(plan.calibration, plan.calibration_mismatch, calibration_region=False)
    assert plan.memory_bytes == pipe.memory_estimate(plan.output_shape, 2, keep_samples=False)


CALIBRATED_KEYS = ["calibrated", "holds", "mismatch", "per_scan", "scale", "outside_scale", "alpha", "delta", "method",
                   "shape", "made_with", "grid_spacing", "scale_per_mm", "definition", "calibration_region"]
"""The keys of a calibrated run's ``risk``, in their order, as written since records said ``mismatch``."""


def test_a_runs_risk_is_a_typed_record_written_as_before() -> None:
    """``risk`` reads back into a RiskRecord whose JSON has the keys (and their order) that records on disk have:
    all of them for a calibrated run, three for one without a calibration."""
    pipe = tiny_pipeline(2)
    made_with = pipe.sampling_settings(num_samples=5)  # not the run's: the calibration does not hold
    pipe.calibration = Calibration(scale=2.0, **PLAIN, shape=IntervalShape(noise_floor=0.5), sampling=made_with)
    with pytest.warns(CalibrationMismatchWarning):
        out = pipe(_lr(), num_samples=2, generator=_gens(0, 1), noise_std=2.0)
    written = json.loads(json.dumps(json_ready(out.metadata)))
    risk = RunRecord.from_dict(written).risk
    assert list(written["risk"]) == CALIBRATED_KEYS and json.dumps(risk.to_dict()) == json.dumps(written["risk"])
    assert (risk.calibrated, risk.holds, risk.mismatch, risk.scale, risk.alpha) == (True, False, "settings", 2.0, 0.1)
    assert risk.shape == IntervalShape(noise_floor=0.5) and risk.made_with == made_with
    assert risk.definition.endswith(mismatch_text("settings")) and risk.calibration_region is False
    pipe.calibration = None
    plain = RunRecord.from_dict(json.loads(json.dumps(json_ready(pipe(_lr(), num_samples=2, generator=_gens(0, 1),
                                                                      noise_std=2.0).metadata)))).risk
    assert plain.to_dict() == {"calibrated": False, "definition": "std / robust intensity range (uncalibrated)",
                               "calibration_region": False}
    assert plain.holds is None and plain.scale is None and plain.shape is None


def test_a_risk_record_written_before_a_field_existed_reads_with_one_set_of_defaults() -> None:
    """Older records' ``risk`` lacks what was added since (``per_scan``, ``made_with``, ``holds``, ``mismatch``,
    ``calibration_region``) or holds a key since dropped (``between_grids``): each reads with its default, and so
    says what it said (``holds`` ``None``: not recorded); a value that is no risk record reads as none."""
    record = json.loads(json.dumps(json_ready(tiny_pipeline(2)(_lr(), num_samples=2, generator=_gens(0, 1),
                                                                 noise_std=0.0).metadata)))
    first = {"calibrated": True, "scale": 2.5, "alpha": 0.1, "delta": 0.1, "method": "rcps",
             "shape": {"smoothing": 1.0, "noise_floor": 0.0, "edge_weight": 0.0},
             "definition": "the half-width of the interval mean ± 2.5 × (std smoothed over 1 voxel) ..."}
    oldest = RunRecord.from_dict({**record, "risk": first}).risk
    assert oldest == RiskRecord(calibrated=True, scale=2.5, alpha=0.1, delta=0.1, method="rcps",
                                shape=IntervalShape(smoothing=1.0), definition=first["definition"])
    assert (oldest.holds, oldest.mismatch, oldest.per_scan, oldest.made_with, oldest.calibration_region) == (
        None, None, False, None, False)
    sampler = {"scheduler": "DDIMScheduler", "num_inference_steps": 2, "num_samples": 8, "strength": 1.0}
    between = RiskRecord.from_dict({**first, "per_scan": False, "outside_scale": None, "made_with": sampler,
                                    "grid_spacing": None, "between_grids": False, "holds": False})
    assert between.made_with == SamplingSettings(**sampler) and between.holds is False and between.mismatch is None
    assert RunRecord.from_dict({**record, "risk": "n/a"}).risk is None
    assert "risk" not in record or RunRecord.from_dict({k: v for k, v in record.items() if k != "risk"}).risk is None
    with pytest.raises(ValueError, match=r"^RiskRecord: no calibrated and definition$"):
        RiskRecord.from_dict({"scale": 2.5})


def test_a_risk_record_of_a_newer_version_reads_and_one_that_is_none_is_one_kind_of_error() -> None:
    """A newer gen_sr may add fields to the risk record and to the records it holds (``made_with`` has gained fields
    twice): a key this version does not know is left out at every level, as at the top. A ``made_with`` or ``shape``
    that is no mapping is one ``ValueError`` (one line), which a run record reads as no risk record, as a value
    that is none; the audit page shows it as it stands."""
    from gen_sr.audit.page import _plain, _risk

    pipe = tiny_pipeline(2)
    pipe.calibration = Calibration(scale=2.0, **PLAIN, shape=IntervalShape(noise_floor=0.5),
                                   sampling=pipe.sampling_settings(num_samples=2))
    record = json.loads(json.dumps(json_ready(pipe(_lr(), num_samples=2, generator=_gens(0, 1),
                                                   noise_std=2.0).metadata)))
    written = record["risk"]
    newer = {**written, "made_with": {**written["made_with"], "sampler_variant": "x"},
             "shape": {**written["shape"], "new_term": 1.0}, "new_key": True}
    risk = RunRecord.from_dict({**record, "risk": newer}).risk
    assert risk == RunRecord.from_dict(record).risk and risk.made_with == pipe.calibration.sampling
    assert _risk(newer) == _risk(written) == "the calibrated interval's half-width ÷ the input's robust intensity range"
    for key, expected in (("made_with", "made_with: SamplingSettings: expected a mapping, got str"),
                          ("shape", "shape: IntervalShape: expected a mapping, got list")):
        broken = {**written, key: "8 samples" if key == "made_with" else [0.0, 0.5]}
        with pytest.raises(ValueError) as raised:
            RiskRecord.from_dict(broken)
        assert str(raised.value) == expected
        assert RunRecord.from_dict({**record, "risk": broken}).risk is None and _risk(broken) == _plain(broken)
    with pytest.raises(ValueError, match=r"^made_with: SamplingSettings: no num_inference_steps$"):
        RiskRecord.from_dict({**written, "made_with": {"scheduler": "DDIM", "num_samples": 8}})


def test_a_cohort_record_reads_the_keys_a_cohort_keeps_beside_the_run() -> None:
    """A scan's sidecar holds the run's record and then a cohort's keys (:class:`CohortRecord`), each only where set:
    a cohort's run under way, a single-scan run's, and one written before they were kept read with their defaults."""
    run = json.loads(json.dumps(json_ready(tiny_pipeline(2)(_lr(), num_samples=2, generator=_gens(0, 1),
                                                              noise_std=0.0).metadata)))
    started = {"input": "a.nii.gz", "finished": False, "cohort_settings": {"seed": 3}}
    assert CohortRecord.from_dict(started).under_way and CohortRecord.from_dict(started).to_dict() == started
    single = {**run, "input_stamp": {"scan": [1, 2, "ab"], "sidecar": None}, "cohort_settings": {"seed": 3}}
    taken = CohortRecord.from_dict(single)
    assert taken.input is None and taken.finished is None and not taken.under_way and taken.seconds is None
    assert {**RunRecord.from_dict(single).to_dict(), **taken.to_dict()} == single
    old = CohortRecord.from_dict({**run, "input": "a.nii.gz", "finished": True})  # before settings and stamps
    assert not old.under_way and old.cohort_settings is None and old.input_stamp is None and old.seconds is None
    assert CohortRecord.from_dict(run) == CohortRecord() and CohortRecord().to_dict() == {}


def test_a_time_estimate_times_a_central_slab_and_scales_it_to_the_output() -> None:
    """``time_estimate`` of a tiny pipeline: a real call on a slab ``probe_thickness`` voxels thick across the
    longest axis the run does not super-resolve, timed within the estimate's own wall time, and its share of the
    output voxels; the estimate is that time scaled to the whole output. (``info --time`` prints it: test_cli.)"""
    pipe = tiny_pipeline(2)
    lr = _lr()  # 12 x 10 x 5 voxels, 3 mm slices along axis 2: the slab lies across axis 0, the longest in-plane
    for thickness, fraction in ((8, 8 / 12), (3, 3 / 12), (20, 1.0)):
        tic = time.perf_counter()
        took = pipe.time_estimate(lr, num_samples=2, noise_std=0.0, probe_thickness=thickness)
        wall = time.perf_counter() - tic
        assert isinstance(took, TimeEstimate) and took.probe_fraction == pytest.approx(fraction)
        assert 0 < took.probe_seconds <= wall and took.seconds == pytest.approx(took.probe_seconds / fraction)
