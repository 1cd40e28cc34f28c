"""`make demo`'s job, run for real on the embedded template."""

from __future__ import annotations

from pathlib import Path

import pytest

from gen_sr.demo import run_demo
from gen_sr.volume import load_volume


def test_demo_walkthrough(tmp_path: Path, capsys) -> None:
    figures = run_demo(tmp_path)
    out = capsys.readouterr().out
    for name in ("hr_1mm.nii.gz", "lr_4mm.nii.gz", "pinv_1mm.nii.gz", "soft_projection_1mm.nii.gz", "operator.json"):
        assert (tmp_path / name).exists() and name in out
    lr = load_volume(tmp_path / "lr_4mm.nii.gz")
    assert lr.shape == (197, 233, 47) and lr.spacing == pytest.approx((1.0, 1.0, 4.0))
    assert figures["pinv_residual"] < 1e-6  # exact consistency
    assert figures["soft_projection_residual"] == pytest.approx(figures["noise_relative"], rel=1e-3)
    assert figures["pinv_psnr"] > 20
