"""The typed run record and plan (:mod:`gen_sr.run_record`): the JSON beside a run's outputs reads back into one
record, with one set of defaults for what older records lack, and a call prepares from the plan ``plan`` returns."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import tiny_pipeline

from gen_sr.io import json_ready
from gen_sr.risk import Calibration, CalibrationMismatchWarning, describe_risk
from gen_sr.run_record import RunPlan, RunRecord, run_calibration
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
    assert record.to_dict() == written and record == out.record
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
