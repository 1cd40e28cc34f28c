"""`make demo`'s job, run for real on the held-out head (Colin27, from the data cache) with a tiny random-weight
model (the committed demo model is exercised by `make demo` itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cached_head
from test_pipeline import _pipe

from gen_sr.demo import run_demo
from gen_sr.errors import InputError
from gen_sr.eval.baselines import BASELINES
from gen_sr.risk import Calibration
from gen_sr.volume import load_volume


def test_demo_end_to_end_on_the_held_out_head(tmp_path: Path, capsys) -> None:
    cached_head("colin27")
    cached_head("colin27_brain")
    pipe = _pipe(2)
    pipe.save_pretrained(tmp_path / "model")
    payload = run_demo(tmp_path / "out", model=tmp_path / "model", num_samples=2, num_inference_steps=2, slab_mm=4)
    out = capsys.readouterr().out
    for name in ("hr_1mm.nii.gz", "lr_4mm.nii.gz", "brain_mask.nii.gz"):
        assert (tmp_path / "out" / name).exists() and name in out
    hr, lr = load_volume(tmp_path / "out" / "hr_1mm.nii.gz"), load_volume(tmp_path / "out" / "lr_4mm.nii.gz")
    mask = load_volume(tmp_path / "out" / "brain_mask.nii.gz")
    assert hr.shape[1] == 4 and lr.spacing == pytest.approx((1.0, 1.0, 4.0)) and "colin27" in out
    assert mask.shape == hr.shape and 0.1 < float(mask.data.mean()) < 0.9  # the brain, not the whole crop
    assert (tmp_path / "out" / "audit" / "report.html").is_file() and "report.html" in out
    assert set(payload["metrics"]) == {"gen_sr", *BASELINES}
    assert "PSNR" in out and "coverage" in out and "UNcalibrated" in out
    assert payload["verdict"]["text"] in out  # the brain's flagged share and its largest cluster there
    with pytest.raises(InputError, match="--overwrite"):
        run_demo(tmp_path / "out", model=tmp_path / "model", num_samples=2, num_inference_steps=2, slab_mm=4)
    with pytest.raises(InputError, match="no trained model"):
        run_demo(tmp_path / "other", model=tmp_path / "nothing")
    # calibrated per grid: the summary names the interval and the record of the run's 1 mm grid
    settings = pipe.sampling_settings(num_samples=2, num_inference_steps=2, noise_std=1.0)  # the demo gives its noise
    pipe.calibration = Calibration(scale=2.5, alpha=0.1, delta=0.1, method="crc", bound="", num_volumes=8,
                                   risk_hat=0.1, risk_upper=0.1, sampling=settings, grid_spacing=1.0)
    pipe.save_pretrained(tmp_path / "calibrated")
    run_demo(tmp_path / "out2", model=tmp_path / "calibrated", num_samples=2, num_inference_steps=2, slab_mm=4)
    assert "calibrated 90 % intervals (mean ± 2.5 × (std), the record for 1 mm grids):" in capsys.readouterr().out
