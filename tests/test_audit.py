"""`gen-sr audit` end to end with a tiny random-weight model: maps, report, metrics against baselines, reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import head_in_air, oblique_affine
from markupsafe import escape
from test_mistakes import _network_calls
from test_pipeline import RUN, _gens, _pipe, counted_commands

from gen_sr.audit import audit
from gen_sr.audit.audit import reuse_outputs
from gen_sr.audit.summary import DISAGREEMENT_STAGES
from gen_sr.cli import main
from gen_sr.eval.baselines import BASELINES, baseline_note
from gen_sr.model_card import Adaptation
from gen_sr.physics import SliceAcquisition, simulate_acquisition
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import MISMATCH_WORDING, Calibration, Calibrations, IntervalShape, SamplingSettings, mismatch_text
from gen_sr.run_record import RunRecord
from gen_sr.volume import Volume, load_volume, save_volume


def _files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    data = np.zeros((14, 12, 24), dtype=np.float32)
    data[2:12, 2:10, 3:21] = 60 + 40 * rng.random((10, 8, 18))
    hr = Volume(data, oblique_affine(spacing=(1.0, 1.0, 1.0)))  # SR lands on this grid with default settings
    gm = hr.with_data((data > 80).astype(np.float32))
    _pipe(2).save_pretrained(tmp_path / "model")
    files = {"model": tmp_path / "model", "hr": save_volume(hr, tmp_path / "hr.nii.gz"),
             "gm": save_volume(gm, tmp_path / "gm.nii.gz")}
    axis = next(a for a in range(3) if hr.axis_to_canonical(a) == 2)  # the file axis that runs inferior-superior
    files["lr"] = tmp_path / "lr.nii.gz"
    assert main(["degrade", "--input", str(files["hr"]), "--output", str(files["lr"]), "--slice-thickness", "3",
                 "--axis", str(axis)]) == 0
    return files


def test_audit_with_reference_writes_maps_report_and_metrics(tmp_path: Path, capsys) -> None:
    f = _files(tmp_path)
    out = tmp_path / "audit"
    args = ["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out), "--reference",
            str(f["hr"]), "--tissue", f"GM={f['gm']}", "--samples", "2", "--steps", "2", "--slice-thickness", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "report.html" in printed
    payload = json.loads((out / "report.json").read_text())
    assert set(payload["metrics"]) == {"gen_sr", *BASELINES}
    assert 0 <= payload["metrics"]["gen_sr"]["coverage_2sigma"] <= 1
    assert len(payload["calibration_curve"]["observed"]) == len(payload["calibration_curve"]["nominal"])
    mean = load_volume(out / "sr_mean.nii.gz")
    hr = load_volume(f["hr"])  # 8 LR slices of 3 mm cover the 24 mm HR exactly: the SR grid is the HR grid
    assert mean.shape == (14, 12, 24) and np.allclose(mean.affine, hr.affine, atol=1e-4)
    page = (out / "report.html").read_text()
    assert "<script" not in page
    assert payload["card"]["capped_fraction"] == 0 and "Exact fits capped for the noise gain" in page  # 3 mm at 3 mm
    # what the 3 mm slices keep of thin structures, from the run's operator, along the one axis it super-resolved
    thin = payload["thin_structures"]
    assert "What the slices cannot show" in page and str(escape(thin["text"])) in page
    assert [r["size_mm"] for r in thin["rows"]] == [1.0, 2.0, 3.0, 5.0, 8.0]
    assert len({r["axis"] for r in thin["rows"]}) == 1
    kept = [r["best_percent"] for r in thin["rows"]]
    assert 0 < kept[0] < 50 and kept == sorted(kept) and kept[-1] > 95
    assert all(r["worst_percent"] <= r["best_percent"] for r in thin["rows"])
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    # no noise std (none given, none read: the box has no air): no data-disagreement map, and the report says why
    assert payload["data_disagreement"] is None and not (out / "data_disagreement.nii.gz").exists()
    assert "Where the output departs from the data" in page and "the run had no noise std" in page
    # the threshold as an error size in input units: risk threshold × the input's robust intensity range
    pipe = LatentDiffusionSRPipeline.from_pretrained(f["model"])
    scale = pipe.intensity_normalization(load_volume(f["lr"]).canonical().data).scale
    assert payload["verdict"]["error_size"] == pytest.approx(0.1 * scale)
    assert isinstance(payload["outside_training"], list) and payload["geometry"]["oblique"] is True


def test_audit_reuses_a_super_resolve_run(tmp_path: Path, capsys) -> None:
    f = _files(tmp_path)
    # a calibration whose interval uses every term, so the reused risk must recompute all of them
    Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="hb", num_volumes=30, risk_hat=0.09,
                risk_upper=0.1, shape=IntervalShape(smoothing=1.0, noise_floor=1.0, edge_weight=0.5)).save(f["model"])
    sr, std = tmp_path / "sr.nii.gz", tmp_path / "std.nii.gz"
    assert main(["super-resolve", "--model", str(f["model"]), "--input", str(f["lr"]), "--output", str(sr), "--std",
                 str(std), "--risk", str(tmp_path / "risk.nii.gz"), "--dc-residual", str(tmp_path / "dc.nii.gz"),
                 "--data-disagreement", str(tmp_path / "dd.nii.gz"),
                 "--samples", "2", "--steps", "2", "--slice-thickness", "3", "--noise-std", "2.0"]) == 0
    record = json.loads((tmp_path / "sr.json").read_text())
    assert f"risk:     {record['risk']['definition']}" in capsys.readouterr().out  # the interval and its λ
    recorded = record.pop("outside_training")  # as in runs recorded before the check: the audit checks now
    (tmp_path / "sr.json").write_text(json.dumps(record))
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(sr), str(std)]) == 0
    printed = capsys.readouterr().out
    assert "departs from the measured slices beyond their noise" in printed and "risk:     the half-width" in printed
    assert json.loads((out / "report.json").read_text())["outside_training"] == recorded
    # recomputed from the reused mean and std, they equal what the run wrote (up to float32 storage of the mean)
    np.testing.assert_allclose(load_volume(out / "risk.nii.gz").data, load_volume(tmp_path / "risk.nii.gz").data,
                               rtol=1e-5, atol=1e-7)
    peak = float(load_volume(f["lr"]).data.max())
    np.testing.assert_allclose(load_volume(out / "dc_residual.nii.gz").data, load_volume(tmp_path / "dc.nii.gz").data,
                               atol=1e-6 * peak)
    np.testing.assert_allclose(load_volume(out / "data_disagreement.nii.gz").data,
                               load_volume(tmp_path / "dd.nii.gz").data, rtol=1e-4, atol=1e-4)
    section = json.loads((out / "report.json").read_text())["data_disagreement"]
    assert 0 <= section["flagged_percent"] <= 100 and section["threshold"] > 0
    page = (out / "report.html").read_text()
    assert str(escape(section["text"])) in page and "Data disagreement over the SR mean" in page
    capsys.readouterr()
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(f["hr"]), str(std), "--overwrite"]) == 2
    assert "no run record" in capsys.readouterr().err
    other = load_volume(f["lr"])  # the same grid, other data: not the scan this run super-resolved
    save_volume(other.with_data(other.data * 1.01), tmp_path / "other.nii.gz")
    assert main(["audit", "--model", str(f["model"]), "--input", str(tmp_path / "other.nii.gz"), "--output-dir",
                 str(out), "--reuse", str(sr), str(std), "--overwrite"]) == 2
    assert "sr.nii.gz: was made from another input than" in capsys.readouterr().err
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(sr), str(sr), "--overwrite"]) == 2  # the mean given as the std
    assert "sr.nii.gz: is not the std this run record was written with" in capsys.readouterr().err
    shifted = load_volume(f["lr"])  # a record from before the digest: the field of view tells a scan elsewhere
    moved = shifted.affine.copy()
    moved[:3, 3] += 28.0
    save_volume(shifted.with_data(shifted.data, moved), tmp_path / "moved.nii.gz")
    old = {k: v for k, v in json.loads((tmp_path / "sr.json").read_text()).items() if k != "input_digest"}
    (tmp_path / "sr.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="predates the scan's digest"):
        reuse_outputs(LatentDiffusionSRPipeline.from_pretrained(f["model"]), load_volume(f["lr"]), sr, std)
    assert main(["audit", "--model", str(f["model"]), "--input", str(tmp_path / "moved.nii.gz"), "--output-dir",
                 str(out), "--reuse", str(sr), str(std), "--overwrite"]) == 2
    assert "does not lie over this input: its field of view is" in capsys.readouterr().err
    # a brain mask (here half of the SR grid) is where the verdict counts, whatever the foreground
    hr = load_volume(f["hr"])
    half = np.zeros(hr.shape, dtype=np.float32)
    half[:, :, : hr.shape[2] // 2] = 1
    mask = save_volume(hr.with_data(half), tmp_path / "mask.nii.gz")
    audit_mask = ["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out), "--reuse",
                  str(sr), str(std), "--overwrite", "--mask"]
    assert main([*audit_mask, str(mask)]) == 0
    verdict = json.loads((out / "report.json").read_text())["verdict"]
    assert verdict["foreground"] == "brain (the given brain mask)" and verdict["foreground_voxels"] == half.sum()
    assert "% of the brain flagged" in verdict["text"]
    capsys.readouterr()
    for run_flag in (["--noise-std", "5"], ["--samples", "4"], ["--target-spacing", "1,1,1"],  # the record's
                     ["--slice-profile", "rect"], ["--no-share-first-call"]):  # an alias is the option it names
        assert main([*audit_mask[:-1], *run_flag]) == 2
        assert f"so {run_flag[0]} would change nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # an abbreviation is no option: it cannot slip past that check
        main([*audit_mask[:-1], "--sam", "4"])
    assert exc.value.code == 2 and "unrecognized arguments: --sam 4" in capsys.readouterr().err
    assert main([*audit_mask, str(f["lr"])]) == 2  # an image, not a mask: one line, before anything is written
    assert "is not a brain mask: its values run from" in capsys.readouterr().err
    moved = hr.affine.copy()
    moved[0, 3] += 200.0  # the same mask 200 mm away: not this scan's
    elsewhere = save_volume(Volume(half, moved), tmp_path / "elsewhere.nii.gz")
    grid = "the SR grid, 12 × 14 × 24 RAS+ voxels of 1 × 1 × 1 mm"
    assert main([*audit_mask, str(elsewhere)]) == 2  # one line: the file, what is wrong, the advice for a mask
    assert capsys.readouterr().err.splitlines()[-1] == (f"gen-sr audit: error: {elsewhere}: does not cover {grid} "
                                                        "(give a brain mask on the input's field of view)")
    assert main([*audit_mask[:-1], "--tissue", f"GM={elsewhere}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"gen-sr audit: error: {elsewhere}: does not cover {grid} "
                                                        "(give the GM tissue map on the input's field of view)")
    outside = np.zeros((*hr.shape[:2], 3 * hr.shape[2]), dtype=np.float32)
    outside[:, :, 2 * hr.shape[2]:] = 1  # covers the SR grid, holds 1 only beyond it
    taller = save_volume(Volume(outside, hr.affine), tmp_path / "taller.nii.gz")
    assert main([*audit_mask, str(taller)]) == 2 and "holds no voxel of the SR grid" in capsys.readouterr().err


def test_a_scan_finer_in_plane_than_the_target_is_resampled_and_its_run_audited(tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """``--target-spacing 1,1,1`` on a 0.5 mm in-plane scan: the command says it resampled the input in-plane, the
    output is on the 1 mm grid over the input's field of view, and the audit of that run (reused, or sampled anew)
    works on the grid the run measured and says so on its card. Each command resamples the scan once, though the
    audit looks at it for its output grid, its run and its views, and with ``--reuse`` for the record's check and its
    views (the pipeline's :data:`~test_pipeline.INPUT_WORK` counted, each command keeping nothing of another's)."""
    counted = counted_commands(monkeypatch)

    def command(argv: list[str]) -> int:
        code, calls = counted(argv)
        assert calls["coarsen"] == 1 and max(calls.values()) == 1, calls
        return code

    f = _files(tmp_path)
    rng = np.random.default_rng(1)
    data = np.zeros((28, 24, 8), dtype=np.float32)
    data[4:24, 4:20, 1:7] = 60 + 40 * rng.random((20, 16, 6))
    scan = save_volume(Volume(data, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "fine.nii.gz")
    sr, std = tmp_path / "sr.nii.gz", tmp_path / "std.nii.gz"
    run = ["--model", str(f["model"]), "--input", str(scan), "--samples", "2", "--steps", "2", "--target-spacing",
           "1,1,1", "--noise-std", "2"]
    assert command(["super-resolve", *run, "--output", str(sr), "--std", str(std)]) == 0
    assert "resampled from 0.5 x 0.5 x 3 to 1 x 1 x 3 mm voxels" in capsys.readouterr().out
    mean = load_volume(sr)
    assert mean.shape == (14, 12, 24) and np.allclose(mean.spacing, 1.0)
    assert json.loads((tmp_path / "sr.json").read_text())["noise_std"] < 2.0  # four voxels' average: about half
    region = save_volume(Volume((data > 0).astype(np.float32), np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "m.nii.gz")
    for extra in (["--reuse", str(sr), str(std)], []):  # a calibration region is a mask on the given scan's grid
        out = tmp_path / ("reused" if extra else "sampled")
        given = run[:4] if extra else run  # a reused run's settings are its record's
        assert command(["audit", *given, "--output-dir", str(out), "--calibration-region", str(region), *extra]) == 0
        card = json.loads((out / "report.json").read_text())["card"]
        assert card["coarsened_input"]["to_spacing"] == [1.0, 1.0, 3.0] and card["lr_spacing_mm"] == [1.0, 1.0, 3.0]
        assert "Input resampled" in (out / "report.html").read_text()


def test_the_noise_std_read_from_the_air_is_printed_recorded_and_on_the_audit_card(tmp_path: Path, capsys) -> None:
    """The commands read the scan's noise std from its air by default (``--noise-std auto``); ``--noise-std 0``
    asks for the noise-free projections."""
    f = _files(tmp_path)
    scan = save_volume(Volume(head_in_air((40, 40, 4), sigma=2.0, radius=11).astype(np.float32),
                              np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "air.nii.gz")
    run = ["--model", str(f["model"]), "--input", str(scan), "--samples", "1", "--steps", "2"]
    assert main(["super-resolve", *run, "--output", str(tmp_path / "sr.nii.gz")]) == 0
    assert "read from the scan's background air" in capsys.readouterr().out
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["noise_std_estimated"] is True and record["noise_std"] == pytest.approx(2.0, rel=0.1)
    assert main(["audit", *run, "--output-dir", str(tmp_path / "audit")]) == 0
    assert "read from the scan's background air" in capsys.readouterr().out
    card = json.loads((tmp_path / "audit" / "report.json").read_text())["card"]
    assert card["noise_std_estimated"] is True and card["noise_std"] == record["noise_std"]
    assert "read from the scan&#39;s background air" in (tmp_path / "audit" / "report.html").read_text()
    assert main(["super-resolve", *run, "--output", str(tmp_path / "exact.nii.gz"), "--noise-std", "0"]) == 0
    assert "background air" not in capsys.readouterr().out
    exact = json.loads((tmp_path / "exact.json").read_text())
    assert exact["noise_std_estimated"] is False and exact["noise_std"] == 0
    # the degraded box has no air (zeros around it): the data disagreement cannot be mapped, said before any work
    assert main(["super-resolve", "--model", str(f["model"]), "--input", str(f["lr"]), "--output",
                 str(tmp_path / "box.nii.gz"), "--data-disagreement", str(tmp_path / "dd.nii.gz")]) == 2
    assert "has no background air to read its noise std from" in capsys.readouterr().err
    assert not (tmp_path / "box.nii.gz").exists()


def test_a_reference_that_does_not_fit_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    f = _files(tmp_path)
    small = save_volume(load_volume(f["hr"]).crop((0, 0, 0), (14, 12, 6)), tmp_path / "small.nii.gz")
    out = tmp_path / "audit"
    with _network_calls() as calls:  # refused from the SR grid alone, before any sampling
        assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                     "--reference", str(small), "--samples", "2", "--steps", "2"]) == 2
    assert calls == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"gen-sr audit: error: {small}: does not cover the SR grid, 12 × 14 × 24 RAS+ voxels of 1 × 1 × 1 mm (give the "
        "HR volume the LR was made from, or another that covers the input's field of view)")
    assert not out.exists()  # not even the folder
    record = tmp_path / "sr.json"
    save_volume(load_volume(f["hr"]), tmp_path / "sr.nii.gz")
    record.write_text("{not json")
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(tmp_path / "sr.nii.gz"), str(tmp_path / "sr.nii.gz")]) == 2
    assert "is not a super-resolve run record" in capsys.readouterr().err


def test_audit_of_two_coarse_axes_says_what_each_stack_of_slices_keeps(tmp_path: Path) -> None:
    """A 1 x 3 x 6 mm stack: the report's thin-structure table has rows for both sliced RAS+ axes, and the 6 mm
    slices keep less of a 2 mm layer than the 3 mm ones."""
    pipe = _pipe(2)
    pipe.model_card = dataclasses.replace(pipe.model_card, trained_for=dataclasses.replace(
        pipe.model_card.trained_for, any_axis=True))
    hr = Volume(np.random.default_rng(2).random((12, 30, 48)).astype(np.float32) + 1, oblique_affine())
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(1, 3.0), SliceAcquisition(2, 6.0)])
    payload = audit(pipe, lr, tmp_path, input_name="two stacks", num_samples=2, generator=_gens(0, 1), **RUN)
    three, six = hr.axis_to_canonical(1), hr.axis_to_canonical(2)
    rows = {(r["axis"], r["size_mm"]): r for r in payload["thin_structures"]["rows"]}
    assert {axis for axis, _ in rows} == {three, six}
    assert rows[six, 2.0]["best_percent"] < rows[three, 2.0]["best_percent"]


def test_the_audit_says_when_its_cubic_baseline_was_linear(tmp_path: Path, capsys) -> None:
    """Three slices are too few for a cubic spline: the report's cubic row is trilinear's, and the table (page, JSON
    and terminal) says so in baseline_note's words."""
    f = _files(tmp_path)
    hr = load_volume(f["hr"])
    lr, operator, _ = simulate_acquisition(hr, [SliceAcquisition(2, 8.0)])  # RAS+ axis 2: 24 mm in 3 slices
    assert operator.lr_shape[2] == 3
    three = save_volume(lr, tmp_path / "three.nii.gz")
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(f["model"]), "--input", str(three), "--output-dir", str(out),
                 "--reference", str(f["hr"]), "--samples", "2", "--steps", "2", "--slice-thickness", "8"]) == 0
    note = baseline_note(operator, "cubic")
    assert note is not None and f"* {note}" in capsys.readouterr().out
    payload = json.loads((out / "report.json").read_text())
    assert payload["baseline_notes"] == {"cubic": note} and payload["metrics"]["cubic"] == payload["metrics"][
        "trilinear"]
    page = (out / "report.html").read_text()
    assert "<td>cubic *</td>" in page and f"* {escape(note)}." in page and "<td>trilinear</td>" in page


def test_the_audit_of_a_refitted_run_says_where_the_prior_departed_from_the_data(tmp_path: Path, capsys) -> None:
    f = _files(tmp_path)
    run = ["--samples", "2", "--steps", "2", "--slice-thickness", "3", "--noise-std", "2.0", "--refit-disagreement"]
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out), *run]) == 0
    assert f"beyond their noise, {DISAGREEMENT_STAGES['before_refit']} (" in capsys.readouterr().out
    payload = json.loads((out / "report.json").read_text())
    section, caption = payload["data_disagreement"], _caption(payload, "view_disagreement")
    assert section["stage"] == "before_refit" and f"This map is {DISAGREEMENT_STAGES['before_refit']}." in section[
        "text"]
    assert caption.endswith(DISAGREEMENT_STAGES["before_refit"])  # the image says what the text says
    # reusing a refitted run: the map is of its output, after the refit, and says so
    sr, std = tmp_path / "sr.nii.gz", tmp_path / "std.nii.gz"
    assert main(["super-resolve", "--model", str(f["model"]), "--input", str(f["lr"]), "--output", str(sr), "--std",
                 str(std), *run]) == 0
    again = tmp_path / "again"
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(again),
                 "--reuse", str(sr), str(std)]) == 0
    payload = json.loads((again / "report.json").read_text())
    section, caption = payload["data_disagreement"], _caption(payload, "view_disagreement")
    assert section["stage"] == "after_refit" and f"This map is {DISAGREEMENT_STAGES['after_refit']}." in section[
        "text"]
    assert caption.endswith(DISAGREEMENT_STAGES["after_refit"]) and "before the refit" not in caption
    assert str(escape(caption)) in (again / "report.html").read_text()


def _caption(payload: dict, figure: str) -> str:
    """The title of a report's figure."""
    return next(f["title"] for f in payload["figures"] if f["id"] == figure)


def test_a_reused_run_is_described_with_the_calibration_its_risk_was_recomputed_with(tmp_path: Path, capsys) -> None:
    """``audit --reuse`` recomputes the risk with the model's current calibration: after the model's records were
    replaced (here by one made for another grid), the printed risk line, the card's risk record and the page say the
    new λ and why it does not hold, not what the run's own record said."""
    f = _files(tmp_path)
    plain = {"alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb", "num_volumes": 30, "risk_hat": 0.09,
             "risk_upper": 0.1}
    Calibration(scale=2.0, **plain).save(f["model"])
    sr, std = tmp_path / "sr.nii.gz", tmp_path / "std.nii.gz"
    assert main(["super-resolve", "--model", str(f["model"]), "--input", str(f["lr"]), "--output", str(sr), "--std",
                 str(std), "--risk", str(tmp_path / "risk.nii.gz"), "--samples", "2", "--steps", "2",
                 "--slice-thickness", "3", "--noise-std", "2.0"]) == 0
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["risk"]["scale"] == 2.0 and record["risk"]["holds"] and record["risk"]["mismatch"] is None
    # the records replaced: one made with the run's settings, but for 2 mm grids (the run's is 1 mm)
    Calibration(scale=5.0, **plain, sampling=RunRecord.from_dict(record).sampling, grid_spacing=2.0).save(f["model"])
    capsys.readouterr()
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(sr), str(std)]) == 0
    printed, warned = capsys.readouterr()
    assert "uses the one for 2 mm grids" in warned
    payload = json.loads((out / "report.json").read_text())
    card = payload["card"]
    assert card["risk"]["scale"] == card["calibration"]["scale"] == 5.0 and card["interval"] == "mean ± 5 × (std)"
    assert card["risk"]["holds"] is False and card["risk"]["mismatch"] == payload["calibration_mismatch"] == "grid"
    assert f"risk:     {card['risk']['definition']}" in printed and "mean ± 5 × (std)" in card["risk"]["definition"]
    assert mismatch_text("grid") in card["risk"]["definition"] and "mean ± 2" not in printed
    assert "calibrated for another grid" in payload["verdict"]["text"] and not payload["calibration_holds"]
    # a flag is explained at the scale the map was made with (std > error size ÷ 5), as a calibration that does not
    # hold, not as none
    meaning = payload["verdict"]["meaning"]
    size = payload["verdict"]["error_size"]
    assert (f"the samples' standard deviation exceeds {size / 5:.3g} input intensity units ({size:.3g} ÷ the scale 5)"
            in meaning)
    assert mismatch_text("grid") in meaning and "Without a calibration" not in meaning
    page = " ".join((out / "report.html").read_text().split())
    assert str(escape(mismatch_text("grid"))) in page and "other sampler settings" not in page
    # the map is the new scale's: 5/2 of the run's (a plain-std interval)
    np.testing.assert_allclose(load_volume(out / "risk.nii.gz").data, 2.5 * load_volume(tmp_path / "risk.nii.gz").data,
                               rtol=1e-5, atol=1e-7)


def test_the_pipeline_says_why_a_calibration_does_not_hold(tmp_path: Path, capsys) -> None:
    """Each reason a calibration does not hold for a run, from the pipeline (its run record, plan and ``info``):
    other settings, another grid, another scan (a per-scan record of an adapted model) and a run whose noise is not
    known falling back to a record made for a known one."""
    f = _files(tmp_path)
    pipe = LatentDiffusionSRPipeline.from_pretrained(f["model"])
    pipe.model_card = dataclasses.replace(pipe.model_card, num_inference_steps=2)  # the default run: 2 steps
    pipe.save_pretrained(f["model"])
    lr = load_volume(f["lr"])  # a box in zeros: no air to read the noise std from
    plan = pipe.plan(lr, num_samples=2)
    assert plan.noise_std is None and plan.calibration is None and plan.calibration_mismatch is None
    unknown = pipe.sampling_settings(num_samples=2, noise_std=0.0, noise_known=False)
    canon, grid = lr.canonical(), plan.grid_spacing
    plain = {"alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb", "num_volumes": 30, "risk_hat": 0.09,
             "risk_upper": 0.1}
    known = Calibration(scale=2.0, **plain, sampling=dataclasses.replace(unknown, noise_known=True))
    cases = {"settings": Calibration(scale=2.0, **plain, sampling=SamplingSettings("other", 9, 9)),
             "grid": Calibration(scale=2.0, **plain, sampling=unknown, grid_spacing=2 * grid),
             "noise_unknown": known, None: Calibration(scale=2.0, **plain, sampling=unknown)}
    for reason, calibration in cases.items():
        assert pipe.calibration_mismatch(calibration, unknown, canon, grid) == reason
    # the converse: a record for runs whose noise std is not known (a per-scan one of a scan without air), used by a
    # run given one, which also refits the data (the refit follows the noise): the noise is why, not "settings"
    given = dataclasses.replace(unknown, noise_known=True, refit_disagreement=True)
    assert pipe.calibration_mismatch(cases[None], given, canon, grid) == "noise_known"
    assert pipe.calibration_mismatch(known, dataclasses.replace(unknown, refit_disagreement=True), canon,
                                     grid) == "noise_unknown"
    assert "--noise-std" in MISMATCH_WORDING["noise_known"].advice
    assert pipe.calibration_mismatch(None, unknown, canon, grid) is None  # uncalibrated: nothing to hold
    # a per-scan record binds an adapted model to its scan; any other record does not
    per_scan = Calibration(scale=2.0, **plain, details={"per_scan": True})
    assert per_scan.per_scan and not known.per_scan
    (tmp_path / "cal").mkdir()
    per_scan.save(tmp_path / "cal")  # read from details: calibration.json keeps its format, and reads back
    assert Calibration.load(tmp_path / "cal").per_scan and "per_scan" not in dataclasses.asdict(per_scan)
    assert not any(r.per_scan for r in Calibrations.load(Path(__file__).parents[1] / "models" / "heads2d"))
    pipe.model_card = dataclasses.replace(pipe.model_card, adapted=Adaptation(source="other.nii.gz",
                                                                              lr_shape=(9, 9, 9)))
    assert pipe.calibration_mismatch(per_scan, unknown, canon, grid) == "scan"
    assert pipe.calibration_mismatch(per_scan, None, canon, grid) == "scan"  # a record without its settings
    assert pipe.calibration_mismatch(known, unknown, canon, grid) == "noise_unknown"
    # the run whose noise is not known falls back to the record for a known one: its record and info say so
    pipe = LatentDiffusionSRPipeline.from_pretrained(f["model"])
    pipe.calibration = known
    with pytest.warns(UserWarning, match="no background air"):
        meta = pipe(lr, num_samples=2, noise_std="auto", output_type="np", generator=_gens(0, 1)).metadata
    assert meta["risk"]["holds"] is False and meta["risk"]["mismatch"] == "noise_unknown"
    assert meta["risk"]["definition"].endswith(mismatch_text("noise_unknown"))
    known.save(f["model"])
    capsys.readouterr()
    assert main(["info", str(f["lr"]), "--model", str(f["model"]), "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"; {mismatch_text('noise_unknown')}" in printed and "other sampler settings" not in printed


def test_audit_reads_a_record_without_a_noise_std_as_noise_free(tmp_path: Path, capsys) -> None:
    """A run record whose ``noise_std`` is null (or missing) is read as noise-free everywhere an audit reads it, the
    reused maps and the calibration plot against a reference alike (one default: ``RunRecord.from_dict``)."""
    f = _files(tmp_path)
    Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="hb", num_volumes=30, risk_hat=0.09,
                risk_upper=0.1, shape=IntervalShape(noise_floor=1.0)).save(f["model"])
    sr, std = tmp_path / "sr.nii.gz", tmp_path / "std.nii.gz"
    assert main(["super-resolve", "--model", str(f["model"]), "--input", str(f["lr"]), "--output", str(sr), "--std",
                 str(std), "--samples", "2", "--steps", "2", "--slice-thickness", "3", "--noise-std", "0"]) == 0
    record = json.loads((tmp_path / "sr.json").read_text())
    assert record["noise_std"] == 0
    (tmp_path / "sr.json").write_text(json.dumps({**record, "noise_std": None}))
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(f["model"]), "--input", str(f["lr"]), "--output-dir", str(out),
                 "--reuse", str(sr), str(std), "--reference", str(f["hr"])]) == 0
    payload = json.loads((out / "report.json").read_text())
    assert payload["card"]["noise_std"] == 0.0 and payload["calibration_curve"]["calibrated"]
