"""The evaluation harness and the `calibrate` / `evaluate` commands, with a tiny random-weight model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import oblique_affine
from test_pipeline import _pipe

from gen_sr.cli import main
from gen_sr.eval.baselines import BASELINES, baseline, baseline_note, baseline_notes, linear_axes
from gen_sr.eval.calibration import SHAPE_CANDIDATES
from gen_sr.eval.cases import simulate_case
from gen_sr.eval.evaluate import estimate_metrics, evaluate
from gen_sr.eval.metrics import foreground, psnr
from gen_sr.eval.tables import markdown_table, summarize, write_table
from gen_sr.model_card import Holdout
from gen_sr.physics import SliceAcquisition
from gen_sr.risk import Calibration, CalibrationMismatchWarning
from gen_sr.volume import Volume, load_volume, save_volume


def _hr(shape=(12, 10, 24), affine=None) -> Volume:
    rng = np.random.default_rng(0)
    data = 50 + 100 * rng.random(shape).astype(np.float32)
    data[:2] = 0  # some background
    return Volume(data, np.eye(4) if affine is None else affine)


def test_baselines_are_exact_where_the_truth_is_constant_across_slices() -> None:
    flat = np.broadcast_to(np.random.default_rng(1).random((12, 10, 1)), (12, 10, 24)).astype(np.float32) + 1
    case = simulate_case(Volume(flat.copy(), oblique_affine()), "flat", thickness=3.0)
    assert case.lr.shape[2] == 8 and case.hr.shape == case.operator.hr_shape
    for name in BASELINES:
        np.testing.assert_allclose(baseline(case, name), case.hr.data, rtol=1e-6, atol=1e-6)
    rows = evaluate(None, [case], progress=False)
    assert {r["method"] for r in rows} == set(BASELINES) and all(r["psnr"] > 100 for r in rows)


def test_a_cubic_baseline_with_too_few_slices_is_said_to_be_linear(tmp_path: Path, capsys) -> None:
    """``cubic`` is linear along an axis with fewer than 4 LR slices (gen_sr.physics falls back): baseline_note says
    so exactly where its figures are trilinear's, and where it is cubic along another axis only; gen-sr evaluate's
    table (printed, .md and .json) carries the note."""
    three = simulate_case(_hr(), "three", thickness=8.0)  # 24 mm: 3 slices
    four = simulate_case(_hr(), "four", thickness=6.0)  # 4 slices
    assert (three.lr.shape[2], four.lr.shape[2]) == (3, 4)
    np.testing.assert_array_equal(baseline(three, "cubic"), baseline(three, "trilinear"))
    assert linear_axes(three.operator, "cubic") == (2,) and linear_axes(three.operator, "trilinear") == ()
    assert baseline_note(three.operator, "cubic") == (
        "cubic: the input has too few slices for a cubic spline (at least 4) along RAS+ axis 2 (3 slices), where it "
        "was computed as linear interpolation, so its figures are trilinear's")
    assert not np.allclose(baseline(four, "cubic"), baseline(four, "trilinear"))
    assert baseline_note(four.operator, "cubic") is None
    assert all(baseline_note(three.operator, name) is None for name in ("trilinear", "sinc"))
    both = simulate_case(_hr(shape=(12, 24, 24)), "both", transforms=[SliceAcquisition(1, 4.0),
                                                                      SliceAcquisition(2, 8.0)])
    assert both.lr.shape[1:] == (6, 3) and not np.allclose(baseline(both, "cubic"), baseline(both, "trilinear"))
    assert baseline_note(both.operator, "cubic").endswith("(3 slices), where it was computed as linear "
                                                          "interpolation, so it is cubic along the other axes only")
    assert baseline_notes([three, four]) == [f"{baseline_note(three.operator, 'cubic')} (volumes three)"]
    # gen-sr evaluate on 3 slices: the note under its table
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    hr = save_volume(_hr(), tmp_path / "hr.nii.gz")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", str(hr), "--output-dir", str(out), "--samples", "2",
                 "--steps", "2", "--slice-thickness", "8"]) == 0
    note = baseline_note(three.operator, "cubic")
    assert f"note:     {note}\n" in capsys.readouterr().out
    assert f"\n{note}.\n" in (out / "evaluation.md").read_text()
    assert json.loads((out / "evaluation.json").read_text())["notes"] == [note]


def test_evaluate_rows_summary_and_files(tmp_path: Path) -> None:
    cases = [simulate_case(_hr(), f"v{i}", thickness=4.0, snr=20.0, seed=i) for i in range(2)]
    assert cases[0].noise_std > 0
    rows = evaluate(_pipe(2), cases, progress=False, num_samples=2, num_inference_steps=2)
    ours = [r for r in rows if r["method"] == "gen_sr"]
    assert len(ours) == 2 and all(-1 <= r["spearman"] <= 1 and 0 <= r["coverage_2sigma"] <= 1 for r in ours)
    assert all(r["relative_residual"] < 0.2 for r in ours)  # soft projection: at the noise level, not 0
    table = summarize(rows)
    assert [t["method"] for t in table] == ["gen_sr", *BASELINES] and all(t["volumes"] == 2 for t in table)
    paths = write_table(tmp_path, rows, meta={"what": "test"})
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"] == {"what": "test"} and len(payload["rows"]) == len(rows)
    assert "| gen_sr | foreground | 2 |" in paths["md"].read_text() and "LPIPS" in paths["md"].read_text()
    assert paths["csv"].read_text().count("\n") == len(rows) + 1


def test_calibrate_then_super_resolve_reports_calibrated_risk(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    hr = save_volume(_hr(shape=(24, 10, 24)), tmp_path / "hr.nii.gz")
    args = ["calibrate", "--model", str(model), "--data", str(hr), "--blocks", "24", "--samples", "2", "--steps", "2",
            "--method", "crc"]
    assert main(args) == 0
    cal = json.loads((model / "calibration.json").read_text())
    assert cal["method"] == "crc" and cal["num_volumes"] == 22 and cal["scale"] > 0  # 2 background slabs: no unit
    assert "coverage" in capsys.readouterr().out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    # other sampler settings get a calibration of their own, beside the first
    assert main([*args[:-3], "3", "--method", "crc"]) == 0 and "also kept" in capsys.readouterr().out
    records = json.loads((model / "calibration.json").read_text())
    assert [r["sampling"]["num_inference_steps"] for r in records] == [2, 3] and records[0] == cal
    assert main(["info", "--model", str(model)]) == 0
    info = capsys.readouterr().out
    assert "made with 2 samples, DDIM, 2 steps" in info and "made with 2 samples, DDIM, 3 steps" in info
    lr = tmp_path / "lr.nii.gz"
    assert main(["degrade", "--input", str(hr), "--output", str(lr), "--slice-thickness", "4", "--axis", "2"]) == 0
    out = tmp_path / "sr.nii.gz"
    assert main(["super-resolve", "--model", str(model), "--input", str(lr), "--output", str(out), "--samples", "2",
                 "--steps", "2"]) == 0
    risk = json.loads((tmp_path / "sr.json").read_text())["risk"]
    assert risk["calibrated"] is True and risk["made_with"]["num_inference_steps"] == 2
    assert risk["scale"] == cal["scale"]
    assert main(["super-resolve", "--model", str(model), "--input", str(lr), "--output", str(out), "--samples", "2",
                 "--steps", "3", "--overwrite"]) == 0  # the run uses the calibration made with its settings
    risk = json.loads((tmp_path / "sr.json").read_text())["risk"]
    assert risk["made_with"]["num_inference_steps"] == 3 and risk["scale"] == records[1]["scale"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(hr), "--output-dir", str(tmp_path / "eval"),
                 "--samples", "2", "--steps", "2"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| method"))
    assert "coverage_calibrated" in header  # a calibrated model's table shows its intervals' coverage


def test_calibrate_chooses_an_interval_shape_by_leaving_volumes_out(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    paths = [str(save_volume(_hr(shape=(24, 10, 24)), tmp_path / f"hr{k}.nii.gz")) for k in range(3)]
    args = ["calibrate", "--model", str(model), "--data", *paths[:2], "--blocks", "12", "--samples", "2",
            "--steps", "2", "--method", "crc", "--interval", "auto"]
    assert main(args) == 2 and "at least 3 volumes" in capsys.readouterr().err
    assert not (model / "calibration.json").exists()
    # rcps certifies with 44 units, but not with the 22 left when a volume is out: no transfer check, said so
    rcps = [*args[:6], "--blocks", "24", "--samples", "2", "--steps", "2", "--method", "rcps"]
    assert main(rcps) == 0 and "(no transfer check: with a volume left out" in capsys.readouterr().out
    args.append("--overwrite")
    args[5:5] = paths[2:]
    assert main(args) == 0
    out = capsys.readouterr().out
    cal = Calibration.load(model)
    assert cal.num_volumes == 36 and cal.details["interval"] == "auto"  # 12 units of equal brain volume each
    assert cal.shape in SHAPE_CANDIDATES and "transfer: coverage of each volume calibrated on the others" in out
    assert len(cal.details["leave_one_volume_out_coverage"]) == 3 and cal.describe() in out


def test_calibrate_per_grid_keeps_a_record_per_output_grid_and_a_run_uses_its_own(tmp_path: Path, capsys) -> None:
    """``--per-grid``: volumes on a 1 mm and on a 1.5 mm grid give one record each (beside the pooled one, which stays
    the default), and a run uses the record of its output grid; calibrating the same grids again needs --overwrite."""
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    paths = [str(save_volume(_hr(shape=(24, 10, 24)), tmp_path / f"hr{k}.nii.gz")) for k in range(2)]
    for k in range(2):  # the same kind of head on a 1.5 mm grid
        hr = _hr(shape=(16, 8, 16))
        paths.append(str(save_volume(hr.with_data(hr.data, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / f"c{k}.nii.gz")))
    args = ["calibrate", "--model", str(model), "--data", *paths, "--blocks", "6", "--samples", "2", "--steps", "2",
            "--method", "crc", "--slice-thickness", "3"]
    assert main(args) == 0
    pooled = Calibration.load(model)
    assert main([*args, "--per-grid"]) == 0
    out = capsys.readouterr().out
    assert "the record for 1 mm grids" in out and "the record for 1.5 mm grids" in out
    pipe = LatentDiffusionSRPipeline.from_pretrained(model)
    records = list(pipe.calibrations)
    assert records[0] == pooled and [r.grid_spacing for r in records] == [None, 1.0, 1.5]
    assert [r.num_volumes for r in records] == [24, 12, 12]
    settings = pipe.sampling_settings(num_samples=2, num_inference_steps=2)
    for grid, record in ((1.0, records[1]), (1.06, records[1]), (1.5, records[2]), (1.25, records[0])):
        assert pipe.calibration_for(settings, grid_spacing=grid) is record
    lr = Volume(np.random.default_rng(0).random((16, 8, 4)).astype(np.float32) + 1, np.diag([1.5, 1.5, 6.0, 1.0]))
    out = pipe(lr, num_samples=2, num_inference_steps=2, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert out.metadata["risk"]["scale"] == records[2].scale and out.metadata["risk"]["grid_spacing"] == 1.5
    assert main([*args, "--per-grid"]) == 2 and "on 1, 1.5 mm grids" in capsys.readouterr().err
    evaluation = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model), "--data", paths[2], "--output-dir", str(evaluation), "--samples",
                 "2", "--steps", "2", "--slice-thickness", "3"]) == 0
    meta = json.loads((evaluation / "evaluation.json").read_text())["meta"]
    assert meta["calibration_by_grid"]["1.5 mm"]["scale"] == records[2].scale  # the record its runs used


def test_calibrate_per_mm_fits_one_scale_for_the_std_times_the_voxel_size(tmp_path: Path, capsys) -> None:
    """``--per-mm``: one scale for ``std × voxel size`` over volumes on a 1 mm and a 1.5 mm grid, equal to the plain-std
    scale fitted on those volumes with each std weighed by its grid; it replaces the per-grid records of its settings,
    and a run on a 1.5 mm grid uses 1.5 times it. Settings it does not serve are refused before any work."""
    from gen_sr.eval.calibration import calibrate, calibration_volumes, fit_volumes
    from gen_sr.eval.cases import simulate_cases
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    model, made = tmp_path / "model", _pipe(2)
    made.model_card = replace(made.model_card, refit_disagreement=True)  # as models/heads2d: runs with a noise refit
    made.save_pretrained(model)
    paths = [str(save_volume(_hr(shape=(24, 10, 24)), tmp_path / "hr.nii.gz"))]
    hr = _hr(shape=(16, 8, 16))
    paths.append(str(save_volume(hr.with_data(hr.data, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "c.nii.gz")))
    args = ["calibrate", "--model", str(model), "--data", *paths, "--blocks", "12", "--samples", "2", "--steps", "2",
            "--method", "crc", "--slice-thickness", "3", "--snr", "30"]
    assert main([*args, "--per-grid"]) == 0
    for wrong in (["--per-grid"], ["--interval", "auto"]):
        assert main([*args, "--per-mm", *wrong]) == 2 and "--per-mm" in capsys.readouterr().err
    assert main([*args[:-2], "--per-mm"]) == 2 and "with --snr" in capsys.readouterr().err
    assert main([*args, "--per-mm"]) == 2 and "pass --overwrite to replace" in capsys.readouterr().err  # per grid
    missing = [*args[:4], str(tmp_path / "missing.nii.gz"), *args[6:], "--per-grid"]  # the data's error, not "again"
    assert main(missing) == 2 and "no such data file or folder" in capsys.readouterr().err
    assert main([args[0], "--model", str(tmp_path / "nothere"), *args[3:]]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main([*args, "--per-mm", "--overwrite"]) == 0
    assert "mean ± " in capsys.readouterr().out
    pipe = LatentDiffusionSRPipeline.from_pretrained(model)
    settings = pipe.sampling_settings(num_samples=2, num_inference_steps=2)
    assert [r.grid_spacing for r in pipe.calibrations if r.sampling == settings] == [None]  # per-grid ones replaced
    record = pipe.calibrations.find(settings)
    cases = simulate_cases([(p, load_volume(p)) for p in paths], axis=2, thickness=3.0, snr=30.0, seed=0)
    volumes = calibration_volumes(pipe, cases, progress=False, num_samples=2, num_inference_steps=2,
                                  generator=torch.Generator().manual_seed(0))
    weighed = [replace(v, std=v.std * g) for v, g in zip(volumes, (1.0, 1.5), strict=True)]
    expected = fit_volumes(weighed, method="crc", blocks=12).calibration.scale
    assert record.scale_per_mm == pytest.approx(expected) and record.scale == record.scale_per_mm
    assert record.fitted_grids == (1.0, 1.5) and record.mismatch(settings, 2.0) == "grid"  # fitted on these grids only
    with pytest.raises(ValueError, match="noise-free"):  # in Python too, before any sampling
        calibrate(pipe, simulate_cases([(p, load_volume(p)) for p in paths], axis=2, thickness=3.0), per_mm=True,
                  method="crc", blocks=12)
    assert main([*args, "--per-grid"]) == 2 and "per mm of the voxel size" in capsys.readouterr().err
    assert main([*args, "--per-mm", "--overwrite", "--no-refit-disagreement"]) == 2  # would replace noise-free records
    assert "--per-mm calibrates runs that refit the data where they disagree" in capsys.readouterr().err
    lr = Volume(np.random.default_rng(0).random((16, 8, 4)).astype(np.float32) + 1, np.diag([1.5, 1.5, 6.0, 1.0]))
    out = pipe(lr, num_samples=2, num_inference_steps=2, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert out.metadata["risk"]["scale"] == pytest.approx(1.5 * record.scale_per_mm)
    assert out.metadata["risk"]["scale_per_mm"] == record.scale_per_mm
    assert "per mm of the finest output spacing (1.5 mm)" in out.metadata["risk"]["definition"]
    with pytest.warns(CalibrationMismatchWarning, match="fitted on 1-1.5 mm grids together, and this run's output "
                                                        "grid is 2 mm: its coverage does not hold here"):
        far = pipe(lr.with_data(lr.data, np.diag([2.0, 2.0, 6.0, 1.0])), num_samples=2,
                   num_inference_steps=2, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert far.metadata["risk"]["mismatch"] == "grid" and not far.metadata["risk"]["holds"]
    one_grid = [*args[:4], paths[0], *args[6:], "--per-mm", "--overwrite", "--blocks", "24"]
    assert main(one_grid) == 0 and "every calibration volume is on one output grid" in capsys.readouterr().err
    pipe.calibration = record  # the only record: a run with other settings falls back to it, at its own grid
    with pytest.warns(UserWarning, match="which no calibration of the model was made with"):
        other = pipe(lr, num_samples=2, num_inference_steps=1, noise_std=0.5,
                     generator=torch.Generator().manual_seed(0))
    assert other.metadata["risk"]["scale"] == pytest.approx(1.5 * record.scale_per_mm)
    assert out.metadata["risk"]["holds"] and not other.metadata["risk"]["holds"]  # made for 2 steps, not 1
    assert "its coverage does not hold for this run" in other.metadata["risk"]["definition"]


def test_calibrate_noise_unknown_makes_the_record_that_runs_without_air_use(tmp_path: Path, capsys) -> None:
    """``--noise-unknown 0 30``: every volume at each SNR, run without its noise std, fitted with the interval ``std +
    0.5 σ̂`` (σ̂ read in-plane); a run on a scan without air (``noise_std="auto"``) uses that record and counts its own
    σ̂, while before it, with only a noise-free record, it used that one and warned that it under-covers."""
    from gen_sr.pipelines import LatentDiffusionSRPipeline
    from gen_sr.risk import NOISE_UNKNOWN_SHAPE

    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    paths = [str(save_volume(_hr(shape=(24, 10, 24)), tmp_path / f"hr{k}.nii.gz")) for k in range(2)]
    args = ["calibrate", "--model", str(model), "--data", *paths, "--blocks", "6", "--samples", "2", "--steps", "2",
            "--method", "crc", "--slice-thickness", "3"]
    assert main(args) == 0
    airless = Volume(np.random.default_rng(0).random((24, 10, 8)).astype(np.float32) + 1, np.diag([1, 1, 3.0, 1]))
    run = {"num_samples": 2, "num_inference_steps": 2, "noise_std": "auto", "generator": torch.Generator()}
    with pytest.warns(UserWarning, match="made on noise-free slices\\) under-covers a noisy scan"):
        before = LatentDiffusionSRPipeline.from_pretrained(model)(airless, **run)
    assert before.metadata["noise_known"] is False and before.metadata["risk"]["scale"] == Calibration.load(model).scale
    assert main([*args, "--noise-unknown", "0", "30"]) == 0
    assert "noise std not known" in capsys.readouterr().out
    pipe = LatentDiffusionSRPipeline.from_pretrained(model)
    record = list(pipe.calibrations)[1]
    assert record.for_unknown_noise and record.shape == NOISE_UNKNOWN_SHAPE and record.num_volumes == 24
    assert record.details["snr"] == [0, 30] and record.details["noise_known"] is False
    with pytest.warns(UserWarning, match="its risk map's interval counts the noise read in-plane"):
        out = pipe(airless, **run | {"generator": torch.Generator().manual_seed(0)})
    sigma = out.metadata["noise_std_in_plane"]
    assert out.metadata["noise_known"] is False and sigma > 0 and out.metadata["risk"]["scale"] == record.scale
    scale = pipe.intensity_normalization(airless.data).scale
    np.testing.assert_allclose(out.risk, record.halfwidth(out.std, out.mean, sigma) / scale, rtol=1e-4, atol=1e-6)
    # the audit of such a run, reused, counts the same in-plane noise: the same risk map, and its card says so
    scan = save_volume(airless, tmp_path / "airless.nii.gz")
    sr, std, risk = (tmp_path / f"{k}.nii.gz" for k in ("sr", "std", "risk"))
    assert main(["super-resolve", "--model", str(model), "--input", str(scan), "--output", str(sr), "--std", str(std),
                 "--risk", str(risk), "--samples", "2", "--steps", "2"]) == 0
    assert main(["audit", "--model", str(model), "--input", str(scan), "--output-dir", str(tmp_path / "audit"),
                 "--reuse", str(sr), str(std)]) == 0
    np.testing.assert_allclose(load_volume(tmp_path / "audit" / "risk.nii.gz").data, load_volume(risk).data,
                               rtol=1e-5, atol=1e-7)
    card = json.loads((tmp_path / "audit" / "report.json").read_text())["card"]
    assert card["noise_std_in_plane"] == json.loads((tmp_path / "sr.json").read_text())["noise_std_in_plane"] > 0
    assert main([*args, "--noise-unknown", "0", "--snr", "30"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_evaluate_command_and_its_errors(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    hr = save_volume(_hr(), tmp_path / "hr.nii.gz")
    args = ["evaluate", "--model", str(model), "--data", str(hr), "--output-dir", str(tmp_path / "eval"),
            "--samples", "2", "--steps", "2"]
    assert main(args) == 0
    assert "| cubic | foreground | 1 |" in (printed := capsys.readouterr()).out
    assert "warning" not in printed.err  # a 1 mm volume is a fine truth to simulate slices from
    assert (tmp_path / "eval" / "evaluation.csv").is_file()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--region", "heldout"]) == 2
    assert "records no held-out slab" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--region", "calibration"]) == 2
    assert "records no calibration slab" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "missing.nii.gz"), *args[5:], "--overwrite"]) == 2
    assert main([*args, "--overwrite", "--slice-thickness", "100"]) == 2
    assert "cannot simulate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--samples", "0"])


def test_stress_test_command(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    data = np.zeros((20, 20, 20), dtype=np.float32)
    data[2:18, 2:18, 2:18] = 100.0  # a bright cube with room for lesions
    hr = save_volume(Volume(data, np.eye(4)), tmp_path / "hr.nii.gz")
    args = ["stress-test", "--model", str(model), "--data", str(hr), "--output-dir", str(tmp_path / "st"),
            "--samples", "2", "--steps", "2", "--diameters", "2", "5", "--lesions-per-size", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "erasure:" in printed and "what the slices alone carry" in printed
    assert all((tmp_path / "st" / f"stress_test.{e}").is_file() for e in ("md", "csv", "json", "png"))
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # no lesion to plant: argparse's one line, before any sampling
        main([*args, "--overwrite", "--contrast", "0"])
    assert exc.value.code == 2 and "expected a nonzero number" in capsys.readouterr().err


def test_heldout_case_is_the_recorded_slab_cropped_to_the_foreground() -> None:
    from gen_sr.eval.cases import heldout_case

    pipe = _pipe(2)
    with pytest.raises(ValueError, match="no held-out slab"):
        heldout_case(pipe, _hr())
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.5))
    data = np.zeros((16, 20, 24), dtype=np.float32)
    data[3:13, 2:18, 4:22] = 1.0 + np.random.default_rng(0).random((10, 16, 18))
    case = heldout_case(pipe, Volume(data, np.eye(4)), margin=1, thickness=3.0)
    assert case.hr.shape == (12, 9, 20)  # x 2..13, y 10..18 (the far half, up to the foreground + 1), z 3..22
    np.testing.assert_array_equal(case.hr.data, data[2:14, 10:19, 3:23])
    np.testing.assert_allclose(case.hr.affine[:3, 3], [2, 10, 3])


def test_a_central_slab_bounds_the_cost_and_keeps_the_geometry() -> None:
    from gen_sr.eval.cases import central_slab, load_hr_volumes

    data = np.random.default_rng(0).random((6, 20, 8)).astype(np.float32)
    affine = np.diag([1.0, 2.0, 1.0, 1.0])
    cut = central_slab(Volume(data, affine), 8.0)  # 4 voxels of 2 mm through the centre: y 8..11
    np.testing.assert_array_equal(cut.data, data[:, 8:12])
    np.testing.assert_allclose(cut.affine[:3, 3], [0, 16, 0])
    assert central_slab(Volume(data, affine), 0).shape == data.shape
    assert central_slab(Volume(data, affine), 1000).shape == data.shape
    (name, whole), = load_hr_volumes(["mni152"])
    (_, slab), = load_hr_volumes(["mni152"], slab_mm=10)
    assert name == "mni152" and slab.shape == (whole.shape[0], 10, whole.shape[2])


def test_training_slabs_tile_the_training_region_only() -> None:
    from gen_sr.eval.cases import training_slabs

    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.25))
    data = np.zeros((16, 22, 24), dtype=np.float32)
    data[3:13] = 1.0 + np.random.default_rng(0).random((10, 22, 24))
    slabs = training_slabs(pipe, Volume(data, np.eye(4)), margin=1)
    # held out: y 16..21 (6 voxels); training slabs of 6 from y 15 down, and the last 4 (at least half of 6)
    assert [n for n, _ in slabs] == ["y10-15", "y4-9", "y0-3"]
    for (_, v), (lo, hi) in zip(slabs, ((10, 16), (4, 10), (0, 4)), strict=True):
        assert v.shape == (12, hi - lo, 24) and v.affine[1, 3] == lo
        np.testing.assert_array_equal(v.data, data[2:14, lo:hi])


def test_calibration_slabs_are_the_reserved_slab_in_pieces_of_equal_brain_volume() -> None:
    from gen_sr.eval.cases import calibration_slabs, has_calibration_slab, training_slabs

    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.25))
    with pytest.raises(ValueError, match="no calibration slab"):
        calibration_slabs(pipe, _hr())
    assert not has_calibration_slab(pipe)
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.25, 0.25))
    assert has_calibration_slab(pipe)
    data = np.zeros((30, 24, 20), dtype=np.float32)
    data[4:26] = 1.0 + np.random.default_rng(0).random((22, 24, 20))  # brain: x 4..25, everywhere in y and z
    vol = Volume(data, np.eye(4))
    # y: training 0..11, calibration 12..17, held out 18..23
    assert [n for n, _ in training_slabs(pipe, vol, margin=1)] == ["y6-11", "y0-5"]
    ((name, whole),) = calibration_slabs(pipe, vol, margin=1)
    assert name == "y12-17" and whole.shape == (24, 6, 20) and whole.affine[0, 3] == 3 and whole.affine[1, 3] == 12
    np.testing.assert_array_equal(whole.data, data[3:27, 12:18])
    pieces = calibration_slabs(pipe, vol, pieces=2, margin=1)
    assert [n for n, _ in pieces] == ["y12-17 x3-14", "y12-17 x15-26"]
    # each half of the brain (x 4..14 and 15..25, 11 slices each), with the margin outside; pieces do not overlap
    for (_, v), (lo, hi) in zip(pieces, ((3, 15), (15, 27)), strict=True):
        assert v.affine[0, 3] == lo and v.affine[1, 3] == 12
        np.testing.assert_array_equal(v.data, data[lo:hi, 12:18])


def _with_operator(tmp_path: Path, *acquisition: str) -> tuple[Path, Path, Path, list[str]]:
    """A tiny model folder, an HR volume, the operator JSON of ``degrade`` with ``acquisition`` (along axis 2), and
    the arguments of ``evaluate`` with that operator: ``(model, hr, op, args)``."""
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    hr = save_volume(_hr(), tmp_path / "hr.nii.gz")
    op = tmp_path / "op.json"
    assert main(["degrade", "--input", str(hr), "--output", str(tmp_path / "lr.nii.gz"), *acquisition, "--axis", "2",
                 "--save-operator", str(op)]) == 0
    args = ["evaluate", "--model", str(model), "--data", str(hr), "--output-dir", str(tmp_path / "eval"),
            "--samples", "2", "--steps", "2", "--operator", str(op)]
    return model, hr, op, args


def test_evaluate_with_an_operator_file_from_degrade(tmp_path: Path, capsys) -> None:
    model, hr, op, args = _with_operator(tmp_path, "--slice-thickness", "3", "--slice-spacing", "4", "--profile",
                                         "rect")
    assert main(args) == 0
    meta = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["meta"]
    assert meta["operator"] == str(op) and meta["slice_thickness"] is None and meta["profile"] is None  # the file's
    wrong = tmp_path / "wrong.json"
    assert main(["degrade", "--input", str(hr), "--output", str(tmp_path / "lr0.nii.gz"), "--slice-thickness", "3",
                 "--axis", "0", "--save-operator", str(wrong)]) == 0
    capsys.readouterr()
    assert main([*args[:-1], str(wrong), "--overwrite"]) == 2
    assert "super-resolves axis 2" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main([*args[:-1], str(tmp_path / "junk.json"), "--overwrite"]) == 2
    # a model trained for every slice axis takes the sagittal acquisition, and is evaluated along it
    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, trained_for=replace(pipe.model_card.trained_for, any_axis=True))
    pipe.save_pretrained(model)
    capsys.readouterr()
    assert main([*args[:-1], str(wrong), "--overwrite"]) == 0


def test_region_volumes_are_cropped_to_the_brain(tmp_path: Path) -> None:
    from gen_sr.eval.cases import load_hr_volumes

    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, holdout=Holdout(1, 0.5))
    data = np.zeros((30, 20, 36), dtype=np.float32)
    data[8:18, 2:18, 10:28] = 1.0 + np.random.default_rng(0).random((10, 16, 18))
    path = save_volume(Volume(data, np.eye(4)), tmp_path / "hr.nii.gz")
    [(name, slab)] = load_hr_volumes([str(path)], pipe, "heldout", "m")
    assert name == "hr" and slab.shape == (18, 10, 26)  # the far half, cut to the foreground + 4 voxels
    np.testing.assert_array_equal(slab.data, data[4:22, 10:20, 6:32])
    [(_, whole)] = load_hr_volumes([str(path)], pipe, "all", "m")
    assert whole.shape == data.shape  # --region all keeps the volume as given


def test_calibration_volumes_cache_their_outputs(tmp_path: Path) -> None:
    from gen_sr.eval.calibration import calibration_volumes

    cases = [simulate_case(_hr(), "case a", thickness=4.0, snr=20.0)]
    first = calibration_volumes(_pipe(2), cases, cache=tmp_path, progress=False, num_samples=2,
                                num_inference_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_a.npz"]  # no temporary file left
    again = calibration_volumes(None, cases, cache=tmp_path, progress=False)  # no pipeline needed: from the cache
    for a, b in zip(first, again, strict=True):
        assert a.name == b.name and a.noise_std == b.noise_std > 0
        for key in ("error", "mean", "std", "mask"):  # float32 on disk
            np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-5)


def test_evaluate_warns_of_a_volume_already_coarse_along_the_slices(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    _pipe(2).save_pretrained(model)
    hr = _hr(shape=(12, 10, 8))
    thick = save_volume(Volume(hr.data, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "thick.nii.gz")  # 3 mm slices
    args = ["evaluate", "--model", str(model), "--data", str(thick), "--output-dir", str(tmp_path / "eval"),
            "--samples", "2", "--steps", "2", "--slice-thickness", "6"]
    assert main(args) == 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert f"{thick} is already coarse along RAS+ axis 2 (3 mm against 1 mm in-plane)" in warning
    assert "a second time" in warning and "give high-resolution (near-isotropic) volumes" in warning
    with pytest.warns(UserWarning, match="already coarse along RAS[+] axis 0"):  # the axis the slices are along
        simulate_case(Volume(hr.data, np.diag([2.0, 1.0, 1.0, 1.0])), "sagittal", axis=0, thickness=4.0)


def test_an_operator_file_refuses_the_slice_options_it_sets(tmp_path: Path, capsys) -> None:
    _, _, op, args = _with_operator(tmp_path, "--slice-thickness", "3")
    for flags in (["--slice-thickness", "5"], ["--slice-spacing", "4"], ["--profile", "rect"],
                  ["--slice-profile", "rect"]):
        capsys.readouterr()
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert f"--operator {op} sets the slices' thickness, spacing and profile, so {flags[0]} would be ignored" in err
        assert "leave them out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eval").exists()  # refused before any work
    assert main([*args[:-2], "--slice-thickness", "5"]) == 0  # without the file, the thickness is what is recorded
    meta = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["meta"]
    assert meta["operator"] is None and meta["slice_thickness"] == 5.0 and meta["profile"] == "gaussian"


def test_the_foreground_is_labelled_as_such_and_a_brain_mask_as_the_brain() -> None:
    case = simulate_case(_hr(), "v", thickness=4.0)
    assert {r["region"] for r in evaluate(None, [case], progress=False)} == {"foreground"}
    ref = case.hr.data.astype(np.float64)
    head, brain = foreground(ref), np.zeros(ref.shape, bool)
    brain[4:10, 2:8, 4:20] = True
    rows = evaluate(None, [case], masks=lambda c: {"brain": brain, "foreground": head}, baselines=["cubic"],
                    progress=False)
    assert [r["region"] for r in rows] == ["brain", "foreground"]
    # one data range for every region: the brain's
    assert rows[1]["psnr"] == pytest.approx(psnr(baseline(case, "cubic"), ref, head, float(np.ptp(ref[brain]))))


def test_the_markdown_table_shows_every_uncertainty_figure() -> None:
    rng = np.random.default_rng(0)
    truth, mask = rng.random((8, 8, 8)), np.ones((8, 8, 8), bool)
    std = 0.05 + 0.1 * rng.random(truth.shape)
    rows = [{"volume": f"v{k}", "method": "gen_sr", "region": "foreground", "seconds": 1.0}
            | estimate_metrics(truth + std * rng.standard_normal(truth.shape), truth, mask, 1.0, std=std)
            for k in range(2)]
    table = summarize(rows)
    header, _, row = markdown_table(table).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | "), strict=True))
    for column in ("uce", "ence", "coverage_1sigma", "coverage_2sigma", "spearman", "ause"):
        assert cells[column] != "—", column
    assert float(cells["coverage_1sigma"].split(" ± ")[0]) == pytest.approx(table[0]["coverage_1sigma"], rel=1e-3)
