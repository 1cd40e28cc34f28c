"""Output checks and atomic writes (gen_sr.io): a failed write raises its own error and leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gen_sr.errors import InputError
from gen_sr.io import (
    atomic_write,
    check_output_dir,
    check_output_file,
    check_output_path,
    sidecar_path,
    sidecar_slice_profile,
    sidecar_slice_thickness,
    slice_sidecar,
    write_json,
)


def test_a_failing_writer_raises_its_own_error_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("{")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_writing_into_an_unwritable_folder_raises_the_real_error(unwritable: Path) -> None:
    with pytest.raises(OSError) as info:
        atomic_write(unwritable / "x.json", lambda tmp: tmp.write_text("{}"))
    assert "x.partial" in str(info.value)  # the write's own error, naming the file it tried, not a clean-up's


def test_output_checks_name_the_problem(tmp_path: Path, unwritable: Path, hr_file: Path) -> None:
    with pytest.raises(InputError, match="not writable"):
        check_output_file(unwritable / "a.json")
    with pytest.raises(InputError, match="the output folder's parent does not exist"):  # two folders missing
        check_output_file(tmp_path / "missing" / "deeper" / "a.json")
    with pytest.raises(InputError, match="is a file; an output folder is needed"):
        check_output_file(hr_file / "a.json")
    with pytest.raises(InputError, match=r"must end in \.nii or \.nii\.gz"):
        check_output_path(tmp_path / "a.nrrd")
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="--overwrite"):
        check_output_path(tmp_path / "a.nii.gz")
    assert check_output_path(tmp_path / "a.nii.gz", overwrite=True) == tmp_path / "a.nii.gz"
    with pytest.raises(InputError, match="same file as an input"):
        check_output_path(tmp_path / "a.nii.gz", overwrite=True, inputs=[tmp_path / "a.nii.gz"])
    (tmp_path / "a.json").write_text("{}")  # the input's sidecar: an output a.nii would write its record there
    with pytest.raises(InputError, match=r"output is the JSON sidecar of the input a\.nii\.gz, where a run reads"):
        check_output_file(tmp_path / "a.json", overwrite=True, inputs=[tmp_path / "a.nii.gz"])
    with pytest.raises(InputError, match=r"JSON sidecar of the input b\.nii\.gz"):  # before it exists too
        check_output_file(tmp_path / "b.json", inputs=[tmp_path / "b.nii.gz"])
    (tmp_path / "ain").mkdir()  # an audit folder holding its input: report.json is that input's sidecar
    (tmp_path / "ain" / "report.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"JSON sidecar of the input report\.nii\.gz"):
        check_output_dir(tmp_path / "ain", True, ["report.json"], inputs=[tmp_path / "ain" / "report.nii.gz"])
    with pytest.raises(InputError, match="same file as an input"):
        check_output_dir(tmp_path / "ain", True, ["report.nii.gz"], inputs=[tmp_path / "ain" / "report.nii.gz"])
    with pytest.raises(InputError, match="is a file"):
        check_output_dir(tmp_path / "a.nii.gz")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.html").write_text("")
    with pytest.raises(InputError, match=r"holds outputs already \(report.html\)"):
        check_output_dir(tmp_path / "run", markers=["report.html", "report.json"])
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"  # its parent is writable: created when written
    assert list(tmp_path.iterdir()) != [] and not any(p.name.startswith(".gen_sr-probe") for p in tmp_path.iterdir())


def test_an_output_file_may_go_into_a_folder_not_made_yet_which_its_write_makes(tmp_path: Path) -> None:
    """As an output folder may be missing where its parent is there (``audit --output-dir``), so may an output
    file's folder (``super-resolve --output out/sr.nii.gz``): checked before any work, made when written."""
    target = check_output_file(tmp_path / "out" / "sr.json")
    assert not (tmp_path / "out").exists()  # the check makes nothing
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in (tmp_path / "out").iterdir()] == ["sr.json"]


def test_json_is_strict_and_sidecars_sit_beside_their_volume(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": np.float32(1.5), "bad": math.nan, "t": (1, 2), 3: np.arange(2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5, "bad": None, "t": [1, 2], "3": [0, 1]}
    assert sidecar_path(tmp_path / "sr.nii.gz") == tmp_path / "sr.json"
    assert sidecar_path("sr.nii") == Path("sr.json")


@pytest.mark.parametrize("profile", ["rect", (0.0, 0.5, 1.0, 0.5, 0.0)])
def test_a_slice_sidecar_is_read_back_as_written(tmp_path: Path, profile: str | tuple[float, ...]) -> None:
    """The entries ``gen-sr degrade`` writes about its slices (:func:`slice_sidecar`) are what a run reads back from
    the sidecar beside the scan, a profile's samples included."""
    scan = tmp_path / "lr.nii.gz"
    write_json(sidecar_path(scan), {**slice_sidecar(3.5, 4.0, profile), "EchoTime": 0.01})
    assert json.loads(sidecar_path(scan).read_text())["SpacingBetweenSlices"] == 4.0
    assert sidecar_slice_thickness(scan) == 3.5 and sidecar_slice_profile(scan) == profile
