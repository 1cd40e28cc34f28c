"""`make demo`'s job, run for real on the embedded template with a tiny random-weight model (the committed demo
model is exercised by `make demo` itself)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_pipeline import _pipe

from gen_sr.demo import run_demo
from gen_sr.errors import InputError
from gen_sr.eval.baselines import BASELINES
from gen_sr.model_card import Holdout
from gen_sr.volume import load_volume


def test_demo_end_to_end_on_the_held_out_slab(tmp_path: Path, capsys) -> None:
    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.2))
    pipe.save_pretrained(tmp_path / "model")
    payload = run_demo(tmp_path / "out", model=tmp_path / "model", num_samples=2, num_inference_steps=2)
    out = capsys.readouterr().out
    for name in ("hr_1mm.nii.gz", "lr_4mm.nii.gz", "gm.nii.gz", "wm.nii.gz"):
        assert (tmp_path / "out" / name).exists() and name in out
    hr, lr = load_volume(tmp_path / "out" / "hr_1mm.nii.gz"), load_volume(tmp_path / "out" / "lr_4mm.nii.gz")
    assert hr.shape[1] < 47 and lr.spacing == pytest.approx((1.0, 1.0, 4.0))  # inside the anterior 20 % (47 mm)
    assert (tmp_path / "out" / "audit" / "report.html").is_file() and "report.html" in out
    assert set(payload["metrics"]) == {"gen_sr", *BASELINES}
    assert "PSNR" in out and "coverage" in out and "UNcalibrated" in out
    with pytest.raises(InputError, match="--overwrite"):
        run_demo(tmp_path / "out", model=tmp_path / "model", num_samples=2, num_inference_steps=2)
    with pytest.raises(InputError, match="no trained model"):
        run_demo(tmp_path / "other", model=tmp_path / "nothing")
