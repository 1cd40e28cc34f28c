"""Volumes: exact geometry through load, orientation changes and save; normalisation; atomic writes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import oblique_affine, tiny_pipeline, write_nifti
from nibabel.affines import voxel_sizes

from gen_sr.errors import InputError
from gen_sr.io import atomic_dir, atomic_write, sidecar_slice_profile, sidecar_slice_thickness
from gen_sr.physics import SliceAcquisition, simulate_acquisition
from gen_sr.sample_data import load_mni152
from gen_sr.volume import IntensityNormalization, Volume, VolumeMemo, load_volume, save_volume


def _volume(shape=(6, 7, 8), affine=None) -> Volume:
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    return Volume(data=data, affine=oblique_affine() if affine is None else affine)


def test_a_memo_computes_once_per_volume_and_never_answers_for_other_voxels() -> None:
    """``VolumeMemo``: the same voxels and affine (another object, another name) get the kept result; a voxel
    changed in place, the same values in another dtype, another affine or another ``what`` are computed anew; only
    the last ``volumes`` volumes are kept."""
    memo, computed = VolumeMemo(volumes=2), []

    def total(volume: Volume, what: str = "sum") -> float:
        return memo.get(volume, what, lambda: computed.append(what) or float(volume.data.sum()))

    a = _volume()
    assert total(a) == total(Volume(a.data.copy(), a.affine.copy(), source="elsewhere.nii")) and len(computed) == 1
    a.data[1, 2, 3] += 1  # changed in place: the same object is another volume now
    assert total(a) == pytest.approx(float(a.data.sum())) and len(computed) == 2
    total(a, "another")
    total(a)
    assert computed == ["sum", "sum", "another"]
    wider, moved = Volume(a.data.astype(np.float64), a.affine), Volume(a.data, a.affine * 1.001)
    for other in (wider, moved, wider):  # the same values in float64, another affine: other volumes
        total(other)
    assert len(computed) == 5
    total(a)  # dropped: two volumes came after it
    assert len(computed) == 6


def test_save_load_round_trip_keeps_data_and_geometry(tmp_path: Path) -> None:
    vol = _volume()
    path = save_volume(vol, tmp_path / "v.nii.gz")
    back = load_volume(path)
    assert np.array_equal(back.data, vol.data)
    assert np.allclose(back.affine, vol.affine, atol=1e-6)
    img = nib.load(path)
    assert np.allclose(img.header.get_zooms()[:3], vol.spacing, atol=1e-6)  # pixdim matches the affine
    assert np.allclose(img.get_qform(), vol.affine, atol=1e-5) and np.allclose(img.get_sform(), vol.affine)
    assert img.header.get_xyzt_units()[0] == "mm"


def test_a_sheared_affine_is_written_as_the_sform_alone_and_read_back_exactly(tmp_path: Path) -> None:
    affine = oblique_affine()
    affine[:3, :3] = affine[:3, :3] @ np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0]])  # a shear
    source = nib.Nifti1Header()
    source["qform_code"], source["sform_code"] = 1, 1  # a scanner's codes: the output must not keep the qform's
    vol = Volume(data=_volume().data, affine=affine, header=source)
    for name in ("once.nii.gz", "twice.nii.gz"):  # the second from the first, as loaded (header included)
        path = save_volume(vol, tmp_path / name)
        img = nib.load(path)
        qform, qform_code = img.get_qform(coded=True)
        assert qform_code == 0 and qform is None  # the qform can only hold the affine without its shear
        assert int(img.header["sform_code"]) == 1 and np.allclose(img.get_sform(), affine, atol=1e-6)
        assert np.allclose(img.header.get_zooms()[:3], vol.spacing, atol=1e-6)
        vol = load_volume(path)
        assert np.allclose(vol.affine, affine, atol=1e-6)


def _turned(affine: np.ndarray, degrees: float = 1.0) -> np.ndarray:
    """``affine`` turned by ``degrees`` about the world's z axis and moved by (2, -1, 0.5) mm."""
    a = np.deg2rad(degrees)
    world = np.eye(4)
    world[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    world[:3, 3] = (2.0, -1.0, 0.5)
    return world @ affine


def _sheared(affine: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[:3, :3] = out[:3, :3] @ np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.1], [0.0, 0.0, 1.0]])
    return out


TRANSFORM_CASES = {  # name: (sform, its code, qform (nibabel writes a sheared one without its shear), its code)
    "qform turned 1 degree from the sform": (oblique_affine((1.0, 1.0, 3.0)), 2, _turned(oblique_affine((1, 1, 3))), 1),
    "qform only": (np.eye(4), 0, oblique_affine((1.0, 1.0, 3.0)), 1),
    "sform only": (oblique_affine((1.0, 1.0, 3.0)), 4, np.eye(4), 0),
    "both the same (ordinary)": (oblique_affine((1.0, 1.0, 3.0)), 1, oblique_affine((1.0, 1.0, 3.0)), 1),
    "sheared sform, qform without the shear": (_sheared(oblique_affine((1.0, 1.0, 3.0))), 2,
                                               _sheared(oblique_affine((1.0, 1.0, 3.0))), 1),
}


def _two_transform_scan(path: Path, sform: np.ndarray, sform_code: int, qform: np.ndarray, qform_code: int,
                        shape=(12, 10, 5)) -> Path:
    """A scan whose header holds ``sform`` and ``qform`` with their own codes (0: present but not to be used)."""
    img = nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32) * 100 + 50, None)
    img.header.set_sform(sform, code=sform_code)
    img.header.set_qform(qform, code=qform_code)
    nib.save(img, path)
    return path


def _check_transforms_carried(scan: nib.Nifti1Image, out: nib.Nifti1Image) -> None:
    """Every transform of ``scan`` is in ``out`` with its code, moved only by the voxel-grid change
    ``T = inv(scan.affine) @ out.affine``; one ``scan`` does not use (code 0) stays unused."""
    grid_change = np.linalg.inv(scan.affine) @ out.affine  # output voxel -> input voxel
    for name in ("qform", "sform"):
        before, code = getattr(scan.header, f"get_{name}")(coded=True)
        after, code_out = getattr(out.header, f"get_{name}")(coded=True)
        assert code_out == code, (name, code, code_out)
        if code:
            assert np.allclose(after, before @ grid_change, atol=1e-4), name
    qform, qform_code = out.header.get_qform(coded=True)
    assert np.allclose(out.header.get_zooms()[:3], voxel_sizes(qform if qform_code else out.affine), atol=1e-5)


@pytest.mark.parametrize("case", list(TRANSFORM_CASES))
def test_each_of_the_inputs_transforms_is_carried_with_its_code_through_a_grid_change(tmp_path: Path, case) -> None:
    """An input's qform and sform, each with its own code, come out of the grid change a run makes (RAS+, the
    finer slice grid, and back to the file's axes) moved only by that change: a reader that prefers either places
    the output where it places the input. A transform the input does not use stays unused."""
    scan = _two_transform_scan(tmp_path / "in.nii.gz", *TRANSFORM_CASES[case])
    vol = load_volume(scan)
    assert (vol.sform_to_qform is None) == (case in ("qform only", "sform only", "both the same (ordinary)"))
    canon = vol.canonical()
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, :3] = np.diag(1 / np.asarray(canon.spacing))  # 1 mm voxels along every axis, from the first centre
    shape = tuple(round((n - 1) * h) + 1 for n, h in zip(canon.shape, canon.spacing, strict=True))
    out = canon.with_data(np.random.default_rng(1).random(shape, np.float32), canon.affine @ fine)
    out = out.reorient(vol.orientation)
    out = out.crop((1, 0, 2), out.shape)  # and a crop
    for name in ("once.nii.gz", "twice.nii.gz"):  # and again from the output, as loaded
        written = save_volume(out, tmp_path / name)
        _check_transforms_carried(nib.load(scan), nib.load(written))
        assert np.allclose(nib.load(written).affine, out.affine, atol=1e-5)  # nibabel's choice is the affine
        out = load_volume(written)


def test_a_super_resolved_scan_keeps_the_inputs_qform_and_sform(tmp_path: Path) -> None:
    """Through the pipeline (a tiny real model), from a file and as a nibabel image: the mean, its maps and the
    samples' 4D image carry the input's two transforms, a 1-degree turn apart, each with its code."""
    scan = _two_transform_scan(tmp_path / "in.nii.gz", *TRANSFORM_CASES["qform turned 1 degree from the sform"])
    pipe = tiny_pipeline()
    for given in (scan, nib.load(scan)):
        out = pipe(given, num_samples=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                   slice_thickness=3.0, output_type="nifti", num_inference_steps=2, noise_std=0.0)
        assert out.mean.shape[2] == 15  # 5 slices of 3 mm on 1 mm voxels
        for image in (out.mean, out.std, out.risk, out.samples):
            _check_transforms_carried(nib.load(scan), image)


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("A", "S", "L"), ("I", "R", "P")])
def test_reorientation_preserves_world_geometry(axcodes) -> None:
    vol = _volume()
    other = vol.reorient(axcodes)
    assert other.orientation == axcodes
    # the same world point carries the same value: compare sorted (world, value) lists
    pts = vol.world_coordinates().reshape(-1, 3)
    pts_other = other.world_coordinates().reshape(-1, 3)
    order, order_other = np.lexsort(np.round(pts, 6).T), np.lexsort(np.round(pts_other, 6).T)
    assert np.allclose(pts[order], pts_other[order_other])
    assert np.array_equal(vol.data.reshape(-1)[order], other.data.reshape(-1)[order_other])
    back = other.reorient(vol.orientation)
    assert np.array_equal(back.data, vol.data) and np.allclose(back.affine, vol.affine)


def test_canonical_axis_mapping() -> None:
    vol = _volume()
    canon = vol.canonical()
    assert canon.orientation == ("R", "A", "S")
    for axis in range(3):
        assert canon.shape[vol.axis_to_canonical(axis)] == vol.shape[axis]


def test_normalization_inverts_exactly() -> None:
    data = np.random.default_rng(0).gamma(2.0, 300.0, size=(10, 10, 10))
    norm = IntensityNormalization.fit(data, 1.0, 99.0)
    x = norm(data)
    assert np.percentile(x, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert np.percentile(x, 99.0) == pytest.approx(1.0)
    assert np.allclose(norm.inverse(x), data)
    assert norm.inverse_scale(np.float64(0.5)) == pytest.approx(0.5 * (norm.high - norm.low))
    with pytest.raises(ValueError, match="constant"):
        IntensityNormalization.fit(np.ones((4, 4, 4)))


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"

    def failing_writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing_writer)
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_a_folder_whole_or_leaves_it_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.json").write_text("old")

    def half_written(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "unet.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(folder, half_written)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in folder.iterdir()] == ["old.json"]

    def whole(tmp: Path) -> str:
        tmp.mkdir()
        (tmp / "new.json").write_text("new")
        return "written"

    assert atomic_dir(folder, whole) == "written"
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in folder.iterdir()] == ["new.json"]


def test_atomic_dir_keeps_the_old_folder_when_the_new_one_cannot_be_put_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.json").write_text("old")
    real_replace = os.replace
    renames: list[str] = []

    def replace_failing_onto_the_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames.append(Path(src).name)
        if Path(dst) == folder and Path(src).name.startswith(".model.partial"):
            raise OSError("interrupted")  # the new folder cannot be moved in, after the old one was moved aside
        real_replace(src, dst)

    def whole(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "new.json").write_text("new")

    monkeypatch.setattr(os, "replace", replace_failing_onto_the_folder)
    with pytest.raises(OSError, match="interrupted"):
        atomic_dir(folder, whole)
    assert renames[0] == "model"  # the old folder was moved aside first, and then moved back
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (folder / "old.json").read_text() == "old"


def test_atomic_dir_names_an_old_folder_that_a_killed_write_left_aside(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    left = tmp_path / ".model.old-123-abcdef12"  # a write killed between its two renames
    left.mkdir()

    def whole(tmp: Path) -> None:
        tmp.mkdir()

    with pytest.warns(UserWarning, match=r"an earlier write of .*model was interrupted .* \.model\.old-123-abcdef12"):
        atomic_dir(folder, whole)
    assert left.is_dir() and folder.is_dir()  # the user's to remove, never removed here
    left.rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atomic_dir(folder, whole)  # nothing left aside: no warning


def test_the_slice_thickness_of_a_bids_sidecar(tmp_path: Path) -> None:
    scan = save_volume(_volume(), tmp_path / "sub-01_T2w.nii.gz")
    assert sidecar_slice_thickness(scan) is None  # no sidecar
    for text, expected in (('{"SliceThickness": 5, "SpacingBetweenSlices": 6.5}', 5.0), ('{"EchoTime": 0.1}', None)):
        (tmp_path / "sub-01_T2w.json").write_text(text)
        assert sidecar_slice_thickness(scan) == expected, text
    (tmp_path / "sub-01_T2w.json").write_bytes('\ufeff{"SliceThickness": 3}'.encode())  # saved with a byte-order mark
    assert sidecar_slice_thickness(scan) == 3.0
    for text in ("[5]", "not json"):  # what it says would be dropped: the file is named instead
        (tmp_path / "sub-01_T2w.json").write_text(text)
        with pytest.raises(InputError, match=r"sub-01_T2w\.json: the scan's JSON sidecar"):
            sidecar_slice_thickness(scan)
    assert sidecar_slice_thickness("synthetic subject 3 (deformed)") is None and sidecar_slice_thickness(None) is None


def test_the_slice_profile_of_a_sidecar(tmp_path: Path) -> None:
    """gen_sr's own ``SliceProfile`` key (``gen-sr degrade`` writes it): a profile, or a clear error naming the file."""
    scan = save_volume(_volume(), tmp_path / "lr.nii.gz")
    assert sidecar_slice_profile(scan) is None and sidecar_slice_profile(None) is None  # no sidecar, no file
    for text, expected in (('{"SliceProfile": "rect", "SliceThickness": 4}', "rect"), ('{"SliceThickness": 4}', None),
                           ('{"SliceProfile": [0, 1, 0.5, 0]}', (0.0, 1.0, 0.5, 0.0))):
        (tmp_path / "lr.json").write_text(text)
        assert sidecar_slice_profile(scan) == expected, text
    for text in ('{"SliceProfile": "rect",\n}', '["rect"]'):  # a hand edit's trailing comma; not an object
        (tmp_path / "lr.json").write_text(text)
        with pytest.raises(InputError, match=r"lr\.json: the scan's JSON sidecar (cannot be read|is not a JSON obj)"):
            sidecar_slice_profile(scan)
    for text in ('{"SliceThickness": 0}', '{"SliceThickness": "4"}', '{"SliceThickness": -4}'):
        (tmp_path / "lr.json").write_text(text)
        with pytest.raises(InputError, match=r"lr\.json: SliceThickness .* is not a thickness in mm"):
            sidecar_slice_thickness(scan)
    for text in ('{"SliceProfile": "Gauss"}', '{"SliceProfile": 3}', '{"SliceProfile": [true, false]}',
                 '{"SliceProfile": []}'):
        (tmp_path / "lr.json").write_text(text)
        with pytest.raises(InputError, match=r"lr\.json: SliceProfile .* is not a slice profile"):
            sidecar_slice_profile(scan)
    pipe, canon = tiny_pipeline(), load_volume(scan).canonical()
    (tmp_path / "lr.json").write_text('{"SliceThickness": 1, "SliceProfile": "rect"}')  # a 3D scan's, as dcm2niix
    simulated, _, _ = simulate_acquisition(load_volume(scan), [SliceAcquisition(2, 4.0)])  # slices made from it
    assert pipe.resolved_slices(simulated.canonical(), (2,))[1:] == (None, {"slice_profile_from": "default",
                                                                             "slice_thickness_from": "default"})
    for text in ('{"SliceProfile": [1, -1]}', '{"SliceProfile": [1]}'):  # samples that make no profile: a run says so
        (tmp_path / "lr.json").write_text(text)
        with pytest.raises(InputError, match=r"lr\.json: SliceProfile \[.*\] is not a slice profile: "):
            pipe.resolved_slices(canon, (2,))


def test_refuses_existing_output_without_overwrite(tmp_path: Path) -> None:
    vol = _volume()
    path = save_volume(vol, tmp_path / "v.nii")
    with pytest.raises(InputError, match="--overwrite"):
        save_volume(vol, path)
    save_volume(vol.with_data(vol.data * 2), path, overwrite=True)
    assert np.allclose(load_volume(path).data, vol.data * 2)


def test_four_d_series_needs_a_volume_index(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    path = write_nifti(tmp_path / "series.nii.gz", data)
    with pytest.raises(InputError, match="--volume"):
        load_volume(path)
    assert np.array_equal(load_volume(path, volume_index=2).data, data[..., 2])
    single = write_nifti(tmp_path / "single.nii.gz", data[..., :1])
    assert load_volume(single).shape == (5, 6, 7)


def test_mni152_sample_data_is_embedded() -> None:
    t1 = load_mni152("t1")
    assert t1.shape == (197, 233, 189) and t1.spacing == (1.0, 1.0, 1.0)
    assert t1.orientation == ("R", "A", "S") and float(t1.data.max()) > 0.5
    gm = load_mni152("gm")
    assert gm.shape == t1.shape and np.allclose(gm.affine, t1.affine)
    assert 0.0 <= float(gm.data.min()) and float(gm.data.max()) <= 1.0
