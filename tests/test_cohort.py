"""Cohorts: finding scans, BIDS names, skipping finished scans, reporting failed ones, and two processes giving the
same outputs as one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import astuple, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_pipeline, write_nifti

from gen_sr.cli import main
from gen_sr.cohort import find_scans, scan_outputs
from gen_sr.errors import InputError
from gen_sr.io import sidecar_path
from gen_sr.risk import Calibration, Calibrations, mismatch_text
from gen_sr.run_record import CohortRecord, RunRecord
from gen_sr.volume import load_volume

ROOT = Path(__file__).parents[1]


def test_bids_files_keep_their_entities_and_others_get_a_suffix(tmp_path: Path) -> None:
    root, out = tmp_path / "bids", tmp_path / "out"
    scan = root / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_acq-thick_desc-raw_T2w.nii.gz"
    paths = scan_outputs(scan, root, out)
    anat = out / "sub-01" / "ses-2" / "anat"
    assert paths.mean == anat / "sub-01_ses-2_acq-thick_desc-sr_T2w.nii.gz"
    assert paths.std == anat / "sub-01_ses-2_acq-thick_desc-srstd_T2w.nii.gz"
    assert paths.risk == anat / "sub-01_ses-2_acq-thick_desc-risk_T2w.nii.gz"
    assert paths.sidecar == anat / "sub-01_ses-2_acq-thick_desc-sr_T2w.json"
    other = scan_outputs(root / "case 7.nii", root, out)
    assert (other.mean, other.sidecar) == (out / "case 7_sr.nii.gz", out / "case 7_sr.json")


def _cohort(folder: Path, n: int = 4) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for k in range(n):
        sub = folder / f"sub-{k:02d}" / "anat"
        sub.mkdir(parents=True)
        data = rng.random((12, 10, 5)).astype(np.float32) * 100 + 50
        files.append(write_nifti(sub / f"sub-{k:02d}_T1w.nii.gz", data, np.diag([1.0, 1.0, 3.0, 1.0])))
    return files


def test_scans_are_found_in_folders_and_globs_and_a_missing_input_is_clear(tmp_path: Path) -> None:
    files = _cohort(tmp_path / "bids")
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\n")
    assert [f for f, _ in find_scans([tmp_path / "bids"])] == sorted(f.resolve() for f in files)
    globbed = find_scans([str(tmp_path / "bids" / "sub-0[01]" / "anat" / "*_T1w.nii.gz")])
    assert [f.name for f, _ in globbed] == ["sub-00_T1w.nii.gz", "sub-01_T1w.nii.gz"]
    with pytest.raises(InputError, match="no such file"):
        find_scans([tmp_path / "nothing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no"):
        find_scans([tmp_path / "empty"])
    # outputs written into the input folder (or one inside it) are not read back as scans
    for name, inside in (("same", "."), ("nested", "sr")):
        scans = _cohort(tmp_path / name)
        out = tmp_path / name / inside
        for f, root in find_scans([tmp_path / name]):
            paths = scan_outputs(f, root, out)
            for written in astuple(paths)[:3]:
                written.parent.mkdir(parents=True, exist_ok=True)
                written.write_bytes(f.read_bytes())
            paths.sidecar.write_text(json.dumps({"input": str(f)}))  # the run record names its scan
        assert len(find_scans([tmp_path / name])) == 4 * len(scans)  # read back as scans, without output_dir
        assert [f for f, _ in find_scans([tmp_path / name], output_dir=out)] == sorted(f.resolve() for f in scans)
    # a scan of its own where another's output would go (a_sr.nii.gz beside a.nii.gz) is named, not dropped
    (tmp_path / "own").mkdir()
    for stem in ("a", "a_sr"):
        write_nifti(tmp_path / "own" / f"{stem}.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(InputError, match=r"a_sr\.nii\.gz: is a scan, and where the output of a\.nii\.gz would go"):
        find_scans([tmp_path / "own"], output_dir=tmp_path / "own")


SMALL = ["--samples", "2", "--steps", "2", "--seed", "3"]


def test_a_cohort_runs_reports_a_failed_scan_and_a_rerun_skips_the_finished_ones(tmp_path: Path, capsys) -> None:
    tiny_pipeline().save_pretrained(tmp_path / "model")
    files = _cohort(tmp_path / "bids")
    (tmp_path / "bids" / "sub-09" / "anat").mkdir(parents=True)
    (tmp_path / "bids" / "sub-09" / "anat" / "sub-09_T1w.nii.gz").write_bytes(b"not a nifti file")
    args = ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "bids"),
            "--output-dir", str(tmp_path / "out"), *SMALL]
    assert main(args) == 1  # one scan failed; the others are done
    captured = capsys.readouterr()
    assert "4 done, 0 skipped" in captured.out and "1 failed" in captured.out
    assert captured.err.count("sub-09_T1w.nii.gz") == 1  # named once on its line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 1, "calibration_does_not_hold": 4}
    rows = (tmp_path / "out" / "summary.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:4] == ["scan", "status", "seconds", "noise_std"] and len(rows) == 6
    done = [r for r in summary["scans"] if r["status"] == "done"]
    assert all(r["noise_std"] is None for r in done)  # boxes in zeros: no air to read a noise std from, not known
    mean = tmp_path / "out" / "sub-00" / "anat" / "sub-00_desc-sr_T1w.nii.gz"
    assert nib.load(mean).shape == (12, 10, 15)
    sidecar = json.loads(mean.with_name("sub-00_desc-sr_T1w.json").read_text())
    assert sidecar["input"] == str(files[0].resolve()) and 0 <= sidecar["flagged_fraction"] <= 1
    run, cohort = RunRecord.from_dict(sidecar), CohortRecord.from_dict(sidecar)  # the run's keys, then the cohort's
    assert json.dumps({**run.to_dict(), **cohort.to_dict()}) == json.dumps(sidecar)  # as written, in that order
    assert cohort.finished is True and cohort.risk_threshold == 0.1 and cohort.cohort_settings["seed"] == 3
    std = mean.with_name("sub-00_desc-srstd_T1w.nii.gz")  # what audit --reuse checks a cohort's maps against
    assert sidecar["output_digests"] == {"mean": load_volume(mean).digest(), "std": load_volume(std).digest()}
    stamp = mean.stat().st_mtime_ns
    assert main(args) == 1
    assert "0 done, 4 skipped" in capsys.readouterr().out and mean.stat().st_mtime_ns == stamp
    rerun = json.loads((tmp_path / "out" / "summary.json").read_text())["scans"]
    for before, after in zip(summary["scans"], rerun, strict=True):  # a skipped scan's figures from its sidecar
        assert after["noise_std"] == before["noise_std"]
        assert after["flagged_fraction"] == before["flagged_fraction"]
        assert after["seconds"] == before["seconds"] or before["status"] == "failed"  # a failed scan is tried again
    (tmp_path / "model" / "README.md").write_text("notes on this model\n")  # not read by loading it
    assert main([*args, "--batch-size", "1"]) == 1  # a memory knob: the same settings
    assert "0 done, 4 skipped" in capsys.readouterr().out
    assert main([*args, "--seed", "5"]) == 2  # other settings: refused before any sampling, nothing rewritten
    err = capsys.readouterr().err
    assert "4 scan(s) here were finished by an earlier run with other settings (seed 3 → 5)" in err
    assert "--overwrite" in err and err.count("\n") == 1 and mean.stat().st_mtime_ns == stamp
    assert main([*args, "--samples", "3"]) == 2
    assert "(num_samples 2 → 3)" in capsys.readouterr().err
    os.utime(files[1], ns=(1, 1))  # a time changed, not the content (copied, checked out): still finished
    (files[0].parent / "sub-00_T1w.json").write_text('{"SliceThickness": 3}')  # an input changed: redone, alone
    assert main(args) == 1 and "1 done, 3 skipped" in capsys.readouterr().out
    assert mean.stat().st_mtime_ns != stamp
    recalibrated = Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="hoeffding", num_volumes=4,
                               risk_hat=0.1, risk_upper=0.1)
    Calibrations([recalibrated]).save(tmp_path / "model")  # the model folder changed in place
    assert main(args) == 2 and "calibration.json none → '" in capsys.readouterr().err  # the file that changed
    files[1].write_bytes(b"broken")  # --overwrite redoes every scan, and leaves none of a failed one's old outputs
    old = tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-sr_T1w.nii.gz"
    assert old.is_file() and main([*args, "--overwrite"]) == 1 and not old.exists()
    assert not old.with_name("sub-01_desc-sr_T1w.json").exists()
    (tmp_path / "bids" / "sub-00" / "anat" / "sub-00_T1w.nii").write_bytes(files[0].read_bytes())  # a.nii, a.nii.gz
    assert main(args) == 2 and "would write the same outputs" in capsys.readouterr().err
    (tmp_path / "bids" / "sub-00" / "anat" / "sub-00_T1w.nii").unlink()
    foreign = tmp_path / "mine" / "sub-02" / "anat" / "sub-02_desc-sr_T1w.json"  # a file of the user's, not a record
    foreign.parent.mkdir(parents=True)
    foreign.write_text('{"note": "mine"}')
    elsewhere = [*[a if a != str(tmp_path / "out") else str(tmp_path / "mine") for a in args], "--overwrite"]
    assert main(elsewhere) == 1 and "is not a run record of this scan" in capsys.readouterr().err
    assert foreign.read_text() == '{"note": "mine"}'  # neither taken as finished nor removed


def test_the_summary_says_whose_risk_maps_are_not_calibrated_for_their_runs(tmp_path: Path, capsys) -> None:
    """Each row says whether the scan's risk map is calibrated for its run (from its run record), and why not; the
    end of the run says how many are not, in the one wording of each reason; a skipped scan's come from its record."""
    tiny_pipeline().save_pretrained(tmp_path / "model")
    _cohort(tmp_path / "bids", n=2)
    out = tmp_path / "out"
    args = ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "bids"), "--output-dir",
            str(out), *SMALL]

    def summary() -> tuple[list[dict], list[list[str]], str]:
        rows = [r.split("\t") for r in (out / "summary.tsv").read_text().splitlines()]
        said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("risk:")]
        return json.loads((out / "summary.json").read_text())["scans"], rows, "\n".join(said)

    assert main(args) == 0  # the model has no calibration
    scans, rows, said = summary()
    columns = rows[0].index("calibration_holds"), rows[0].index("calibration_mismatch")
    assert rows[0][columns[0] - 1] == "flagged_fraction" and columns[1] == columns[0] + 1
    assert [[r[c] for c in columns] for r in rows[1:]] == [["False", "uncalibrated"]] * 2
    assert said == ("risk:     the risk maps of 2 of 2 scans are not calibrated for their runs (2 uncalibrated), so "
                    "their flagged fractions bound nothing")
    record = json.loads(sidecar_path(Path(scans[0]["output"])).read_text())
    settings = RunRecord.from_dict(record).sampling
    plain = {"alpha": 0.1, "delta": 0.1, "method": "crc", "bound": "hb", "num_volumes": 4, "risk_hat": 0.1,
             "risk_upper": 0.1}
    Calibration(scale=2.0, **plain, sampling=replace(settings, num_samples=8)).save(tmp_path / "model")
    assert main([*args, "--overwrite"]) == 0
    scans, rows, said = summary()
    assert [(r["calibration_holds"], r["calibration_mismatch"]) for r in scans] == [(False, "settings")] * 2
    assert said == ("risk:     the risk maps of 2 of 2 scans are not calibrated for their runs (2 calibrated for "
                    f"other settings), so their flagged fractions bound nothing: {mismatch_text('settings')}")
    assert main(args) == 0  # skipped: from their records
    scans, _, again = summary()
    assert {r["status"] for r in scans} == {"skipped"} and again == said
    assert json.loads((out / "summary.json").read_text())["counts"]["calibration_does_not_hold"] == 2
    Calibration(scale=2.0, **plain, sampling=settings).save(tmp_path / "model")  # made with the runs' settings
    assert main([*args, "--overwrite"]) == 0
    scans, rows, said = summary()
    assert [(r["calibration_holds"], r["calibration_mismatch"]) for r in scans] == [(True, None)] * 2
    assert [[r[c] for c in columns] for r in rows[1:]] == [["True", "n/a"]] * 2 and said == ""


def test_two_processes_write_the_same_outputs_as_one_and_a_rerun_skips_all(tmp_path: Path) -> None:
    tiny_pipeline().save_pretrained(tmp_path / "model")
    _cohort(tmp_path / "bids")
    args = ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "bids"), *SMALL]
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--num_processes", "2", "--main_process_port",
              str(port), "-m", "gen_sr.cli", *args, "--output-dir", str(tmp_path / "two")]
    for expected in ("4 done", "4 skipped"):
        result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert expected in result.stdout
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["counts"]["skipped"] == 4
    for k in range(4):
        name = Path(f"sub-{k:02d}") / "anat" / f"sub-{k:02d}_desc-sr_T1w.nii.gz"
        a, b = (np.asarray(nib.load(tmp_path / run / name).dataobj) for run in ("one", "two"))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_a_moved_input_folder_keeps_its_finished_scans_and_a_file_of_the_users_is_never_removed(tmp_path: Path,
                                                                                                capsys) -> None:
    """Records name their scan by path, or by file name once the folders moved; a file at an output place with no run
    record beside it is the user's: the scan fails and keeps it (``--overwrite`` replaces it)."""
    tiny_pipeline().save_pretrained(tmp_path / "model")
    _cohort(tmp_path / "bids", n=2)

    def run(source: str, out: str, *extra: str) -> int:
        return main(["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / source),
                     "--output-dir", str(tmp_path / out), *SMALL, *extra])

    assert run("bids", "out") == 0
    (tmp_path / "bids").rename(tmp_path / "moved")
    capsys.readouterr()
    assert run("moved", "out") == 0 and "0 done, 2 skipped" in capsys.readouterr().out
    record = tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-sr_T1w.json"  # as a run killed while writing left it
    record.write_text(json.dumps({"input": str(tmp_path / "moved" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"),
                                  "finished": False}))
    assert run("moved", "out") == 0 and "1 done, 1 skipped" in capsys.readouterr().out  # its own leftovers: redone
    mine = tmp_path / "out2" / "sub-00" / "anat" / "sub-00_desc-srstd_T1w.nii.gz"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's")
    assert run("moved", "out2") == 1 and "is there and is no output of a run of this scan" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's"
    assert run("moved", "out2", "--overwrite") == 0 and nib.load(mine).shape == (12, 10, 15)


def _cohort_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "bids"), "--output-dir",
            str(tmp_path / out), *SMALL, *extra]


def test_a_rerun_reads_each_run_record_once(tmp_path: Path, capsys, monkeypatch) -> None:
    tiny_pipeline().save_pretrained(tmp_path / "model")
    _cohort(tmp_path / "bids", n=2)
    assert main(_cohort_args(tmp_path, "out")) == 0
    opened: list[str] = []
    path_open = Path.open

    def counted(self: Path, *args, **kwargs):  # pathlib's own open, counted: read_text and read_bytes go through it
        if self.name.endswith("_desc-sr_T1w.json"):
            opened.append(self.name)
        return path_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counted)
    capsys.readouterr()
    assert main(_cohort_args(tmp_path, "out")) == 0 and "0 done, 2 skipped" in capsys.readouterr().out
    assert Counter(opened) == {"sub-00_desc-sr_T1w.json": 1, "sub-01_desc-sr_T1w.json": 1}


def test_a_finished_scan_whose_risk_a_newer_version_wrote_is_still_finished(tmp_path: Path, capsys) -> None:
    """A sidecar written by a newer gen_sr, whose risk record's ``made_with`` holds a key this version does not know,
    reads as it did (the key left out, as at the top level): the scan is finished and skipped, not a traceback
    that stops the cohort. One whose ``made_with`` is no mapping reads as a run without a risk record, as any value
    that is no risk record does: still finished."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    made_with = pipe.sampling_settings(num_samples=2, num_inference_steps=2)
    Calibration(scale=2.0, alpha=0.1, delta=0.1, method="crc", bound="hb", num_volumes=4, risk_hat=0.1,
                risk_upper=0.1, sampling=made_with).save(tmp_path / "model")
    _cohort(tmp_path / "bids", n=1)
    assert main(_cohort_args(tmp_path, "out")) == 0
    sidecar = tmp_path / "out" / "sub-00" / "anat" / "sub-00_desc-sr_T1w.json"
    record = json.loads(sidecar.read_text())
    assert RunRecord.from_dict(record).risk.made_with == made_with
    for value in ({**record["risk"]["made_with"], "sampler_variant": "x"}, "8 samples"):
        sidecar.write_text(json.dumps({**record, "risk": {**record["risk"], "made_with": value}}))
        capsys.readouterr()
        assert main(_cohort_args(tmp_path, "out")) == 0 and "0 done, 1 skipped" in capsys.readouterr().out
        risk = RunRecord.from_dict(json.loads(sidecar.read_text())).risk
        assert risk.made_with == made_with if isinstance(value, dict) else risk is None


def test_a_rerun_compares_the_acquisition_as_each_scan_takes_it(tmp_path: Path, capsys) -> None:
    """The same settings are the same acquisition model for every scan: a slice profile, thickness or target spacing
    given as each scan's JSON sidecar (or the default) makes them is the same setting; one that makes another is
    refused, naming what it changes and for how many scans."""
    tiny_pipeline().save_pretrained(tmp_path / "model")
    files = _cohort(tmp_path / "bids", n=2)
    for f, profile in zip(files, ("rect", "gaussian"), strict=True):  # 3 mm slices, of two profiles
        sidecar_path(f).write_text(json.dumps({"SliceThickness": 3, "SliceProfile": profile}))
    assert main(_cohort_args(tmp_path, "out")) == 0
    mean = tmp_path / "out" / "sub-00" / "anat" / "sub-00_desc-sr_T1w.nii.gz"
    stamp = mean.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_cohort_args(tmp_path, "out", "--slice-thickness", "3", "--target-spacing", "1,1,1")) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out and mean.stat().st_mtime_ns == stamp
    assert main(_cohort_args(tmp_path, "out", "--profile", "rect")) == 2  # sub-01's sidecar says gaussian
    err = capsys.readouterr().err
    assert "1 scan(s) here were finished by an earlier run with other settings (slice profile (axis 2) " \
           "'gaussian' → 'rect')" in err and err.count("\n") == 1
    assert main(_cohort_args(tmp_path, "out", "--slice-thickness", "4")) == 2
    assert "2 scan(s)" in (err := capsys.readouterr().err) and "slice thickness (axis 2) 3.0 → 4.0" in err
    assert main(_cohort_args(tmp_path, "out", "--seed", "5", "--slice-thickness", "3")) == 2  # as given, alike
    assert "other settings (seed 3 → 5)" in capsys.readouterr().err
    assert mean.stat().st_mtime_ns == stamp
    sidecar_path(files[1]).write_text(json.dumps({"SliceThickness": 3, "SliceProfile": "rect"}))  # sub-01 is redone
    assert main(_cohort_args(tmp_path, "out", "--profile", "rect")) == 0  # and sub-00's sidecar says rect
    assert "1 done, 1 skipped" in capsys.readouterr().out and mean.stat().st_mtime_ns == stamp
    assert main(_cohort_args(tmp_path, "out", "--profile", "rect", "--slice-thickness", "3")) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


def test_a_single_scan_runs_outputs_at_a_cohorts_paths_are_taken_where_their_record_proves_them(tmp_path: Path,
                                                                                               capsys) -> None:
    """``super-resolve --input a.nii.gz --output`` (with ``--std`` and ``--risk``) at the very paths a cohort uses:
    taken as finished where its record proves the scan and the settings; other settings refuse the rerun as a
    cohort's would; a record that proves less (no std and risk maps, written before records kept the scan's stamp
    and settings) keeps the scan failing, its files kept."""
    tiny_pipeline().save_pretrained(tmp_path / "model")
    files = _cohort(tmp_path / "bids", n=2)

    def single(out: str, *extra: str, maps: tuple[str, ...] = ("std", "risk")) -> Path:
        paths = scan_outputs(files[0].resolve(), (tmp_path / "bids").resolve(), tmp_path / out)
        paths.mean.parent.mkdir(parents=True)
        given = [a for m in maps for a in (f"--{m}", str(getattr(paths, m)))]
        assert main(["super-resolve", "--model", str(tmp_path / "model"), "--input", str(files[0]), "--output",
                     str(paths.mean), *given, *SMALL, *extra]) == 0
        return paths.mean

    mean = single("out")
    sidecar = mean.with_name("sub-00_desc-sr_T1w.json")
    written = json.loads(sidecar.read_text())  # a box in zeros: no air, its noise std not known
    assert written["noise_std"] is None and written["noise_known"] is False and not written["refit_disagreement"]
    asked = written["cohort_settings"]["sampling_as_asked"]  # the same for every scan: as asked, not as resolved
    assert "noise_known" not in asked and "sampling" not in written["cohort_settings"]
    assert written["cohort_settings"]["noise_std"] == "auto"
    assert RunRecord.from_dict(written).noise_std is None and not RunRecord.from_dict(written).sampling.noise_known
    earlier = {**written, "noise_std": 0.0,  # as the version before wrote it: 0, and the settings under "sampling"
               "cohort_settings": {**{k: v for k, v in written["cohort_settings"].items() if k != "sampling_as_asked"},
                                   "sampling": {**asked, "noise_known": True}}}
    sidecar.write_text(json.dumps(earlier))
    assert RunRecord.from_dict(earlier).noise_std is None  # read as not known all the same
    stamp = mean.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_cohort_args(tmp_path, "out")) == 0 and "1 done, 1 skipped" in capsys.readouterr().out
    assert mean.stat().st_mtime_ns == stamp
    taken = json.loads((tmp_path / "out" / "summary.json").read_text())["scans"][0]
    assert taken["status"] == "skipped" and taken["seconds"] is None  # not recorded by a single-scan run: n/a
    assert main(_cohort_args(tmp_path, "fresh")) == 0  # what the cohort makes of it: the same
    fresh = tmp_path / "fresh" / mean.relative_to(tmp_path / "out")
    np.testing.assert_allclose(nib.load(mean).get_fdata(), nib.load(fresh).get_fdata(), rtol=0, atol=1e-4)
    other = single("other", "--seed", "4")
    capsys.readouterr()
    assert main(_cohort_args(tmp_path, "other")) == 2
    assert "1 scan(s) here were finished by an earlier run with other settings (seed 4 → 3)" in capsys.readouterr().err
    assert main(_cohort_args(tmp_path, "other", "--overwrite")) == 0
    np.testing.assert_allclose(nib.load(other).get_fdata(), nib.load(fresh).get_fdata(), rtol=0, atol=1e-4)
    alone = single("alone", maps=())  # no std or risk map: not taken, not removed
    old = single("old")  # a record from before they kept the scan's stamp and settings
    record = json.loads(old.with_name("sub-00_desc-sr_T1w.json").read_text())
    old.with_name("sub-00_desc-sr_T1w.json").write_text(json.dumps({k: v for k, v in record.items()
                                                                    if k not in ("input_stamp", "cohort_settings")}))
    for out, kept, flags, said_first in (
            ("old", old, ["--overwrite"], "is not a run record of this scan that a cohort can take"),  # never removed
            ("alone", alone, [], "is a single-scan run's record of this scan as it was before it changed, or without "
                                 "its std and risk maps: pass --overwrite to redo it")):
        stamp = kept.stat().st_mtime_ns
        capsys.readouterr()
        assert main(_cohort_args(tmp_path, out, *flags)) == 1 and kept.stat().st_mtime_ns == stamp
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
        assert len(said) == 1 and f"sub-00_desc-sr_T1w.json {said_first}" in said[0] \
            and said[0].endswith("give another --output-dir")
    assert main(_cohort_args(tmp_path, "alone", "--overwrite")) == 0  # a single-scan run's own outputs: redone
    np.testing.assert_allclose(nib.load(alone).get_fdata(), nib.load(fresh).get_fdata(), rtol=0, atol=1e-4)
    edited = single("edited")  # the scan changed after a single-scan run: refused as above, redone with --overwrite
    files[0].write_bytes(files[1].read_bytes())
    capsys.readouterr()
    assert main(_cohort_args(tmp_path, "edited")) == 1 and "pass --overwrite to redo it" in capsys.readouterr().err
    assert main(_cohort_args(tmp_path, "edited", "--overwrite")) == 0
    rows = json.loads((tmp_path / "edited" / "summary.json").read_text())["scans"]
    assert [r["status"] for r in rows] == ["done", "done"] and edited.is_file()
    assert main(_cohort_args(tmp_path, "edited")) == 0  # skipped: their seconds are the cohort's own
    rows = json.loads((tmp_path / "edited" / "summary.json").read_text())["scans"]
    assert all(r["seconds"] is not None for r in rows)


def test_a_one_sample_run_writes_its_constant_std_as_an_output(tmp_path: Path, capsys) -> None:
    """A one-sample run's std (and so its risk) is 0 everywhere: an output all the same, not refused as a constant
    input when its digest is recorded, in a single-scan run and in a cohort."""
    tiny_pipeline().save_pretrained(tmp_path / "model")
    files = _cohort(tmp_path / "bids", n=1)
    one = ["--samples", "1", "--steps", "2", "--seed", "3"]
    out = tmp_path / "single"
    out.mkdir()
    assert main(["super-resolve", "--model", str(tmp_path / "model"), "--input", str(files[0]), "--output",
                 str(out / "sr.nii.gz"), "--std", str(out / "std.nii.gz"), "--risk", str(out / "risk.nii.gz"),
                 *one]) == 0
    record = json.loads((out / "sr.json").read_text())
    assert np.all(np.asarray(nib.load(out / "std.nii.gz").dataobj) == 0) and set(record["output_digests"]) == {
        "mean", "std"}
    assert main(["super-resolve", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "bids"),
                 "--output-dir", str(tmp_path / "out"), *one]) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
