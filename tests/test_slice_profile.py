"""Slice-profile estimation from the scan itself (``--slice-profile auto``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from gen_sr.errors import InputError
from gen_sr.eval.cases import simulate_case
from gen_sr.slice_profile import estimate_slice_profile
from gen_sr.volume import Volume


def _isotropic(shape: tuple[int, int, int] = (64, 64, 96), seed: int = 0) -> Volume:
    """A stationary, isotropic texture at 1 mm: the assumption the estimate rests on holds by construction."""
    rng = np.random.default_rng(seed)
    texture = sum(gaussian_filter(rng.standard_normal(shape), s) * s for s in (0.7, 1.5, 3.0))
    return Volume((texture - texture.min()).astype(np.float32), np.eye(4))


@pytest.mark.parametrize(("fwhm", "spacing"), [(4.0, 4.0), (3.0, 4.0), (6.0, 5.0)])
def test_a_gaussian_slice_thickness_is_estimated_from_the_spectra(fwhm: float, spacing: float) -> None:
    case = simulate_case(_isotropic(), "texture", axis=2, thickness=fwhm, spacing=spacing)
    estimate = estimate_slice_profile(case.lr, shapes=("gaussian",))
    assert estimate.axis == 2 and estimate.profile == "gaussian"
    assert estimate.thickness == pytest.approx(fwhm, rel=0.12)
    # a wrong guess fits worse: the estimate is not the grid's middle by default
    assert estimate.misfit < estimate_slice_profile(case.lr, shapes=("gaussian",), widths=[2.0 * fwhm / spacing]).misfit


def test_the_pipeline_estimates_the_thickness_with_slice_profile_auto() -> None:
    from helpers import tiny_pipeline

    pipe = tiny_pipeline()
    case = simulate_case(_isotropic((16, 16, 48)), "texture", axis=2, thickness=3.0)  # too small to be accurate
    run = {"num_samples": 1, "num_inference_steps": 2, "noise_std": 0.0}
    out = pipe(case.lr, slice_profile="auto", **run)
    slices = out.metadata["operator"]["transforms"][0]
    assert out.metadata["slice_profile_estimated"] and slices["profile"] == "gaussian"
    assert out.metadata["slice_profile_from"] == out.metadata["slice_thickness_from"] == "estimated"
    assert slices["thickness"] == estimate_slice_profile(case.lr, shapes=("gaussian",)).thickness
    with pytest.raises(InputError, match="takes no slice thickness"):
        pipe(case.lr, slice_profile="auto", slice_thickness=3.0, **run)


def test_a_scans_slice_thickness_is_estimated_once_for_every_pipeline_that_runs_it(monkeypatch) -> None:
    """A plan, a run and the run of another pipeline (as ``--adapt`` makes one) on one scan estimate its thickness
    once (the input memo), and a scan changed since anew."""
    from helpers import count_calls, tiny_pipeline

    import gen_sr.pipelines.pipeline_latent_sr as pipeline_module
    from gen_sr.volume import VolumeMemo

    monkeypatch.setattr(pipeline_module, "_INPUTS", VolumeMemo())
    calls = count_calls(pipeline_module, ["estimate_slice_profile"], monkeypatch.setattr)
    case = simulate_case(_isotropic((16, 16, 48)), "texture", axis=2, thickness=3.0)
    run = {"num_samples": 1, "num_inference_steps": 2, "noise_std": 0.0, "slice_profile": "auto"}
    first = tiny_pipeline()
    first.plan(case.lr, slice_profile="auto")
    thickness = first(case.lr, **run).record.operator["transforms"][0]["thickness"]
    assert tiny_pipeline(seed=1)(case.lr, **run).record.operator["transforms"][0]["thickness"] == thickness
    assert calls["estimate_slice_profile"] == 1
    first(case.lr.with_data(case.lr.data * 2), **run)
    assert calls["estimate_slice_profile"] == 2


def test_only_commands_with_a_scan_take_slice_profile_auto(tmp_path, capsys) -> None:
    from gen_sr.cli import main
    from gen_sr.volume import save_volume

    hr = save_volume(_isotropic((16, 16, 16)), tmp_path / "hr.nii.gz")
    args = ["degrade", "--input", str(hr), "--output", str(tmp_path / "lr.nii.gz"), "--slice-thickness", "4",
            "--axis", "2", "--slice-profile", "auto"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "to simulate one, give it" in capsys.readouterr().err
