"""The HR grid derived from an LR input covers the LR field of view exactly, also for float32 (oblique) affines."""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import oblique_affine
from nibabel.affines import apply_affine
from test_pipeline import _pipe

from gen_sr.physics import GeometryWarning, SliceAcquisition, operator_from_spacings, simulate_acquisition
from gen_sr.pipelines.pipeline_latent_sr import LatentDiffusionSRPipeline
from gen_sr.volume import Volume, covers, load_volume


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(4)
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    return m


def _float32(affine: np.ndarray) -> np.ndarray:
    """The affine as a NIfTI sform stores it."""
    return np.asarray(affine, dtype=np.float32).astype(np.float64)


@functools.cache
def _any_axis_pipe() -> LatentDiffusionSRPipeline:
    """A tiny pipeline whose model card takes any slice axis."""
    pipe = _pipe(2)
    pipe.model_card = replace(pipe.model_card, trained_for=replace(pipe.model_card.trained_for, any_axis=True))
    return pipe


def _pipeline_operator(canon: Volume, target=None):
    """The operator ``gen-sr super-resolve`` builds for this (RAS+) input: the pipeline's own."""
    return _any_axis_pipe().operator_for(canon, target_spacing=target)


def _grid(shape, affine) -> Volume:
    return Volume(np.zeros(shape, dtype=np.float32), affine)


def _check_covers(lr: Volume, op, hr_reference: Volume | None = None) -> None:
    """The HR grid's outermost voxel centres lie inside the LR field of view (and the reference's grid)."""
    hr = _grid(op.hr_shape, op.hr_affine(lr.affine))
    assert covers(lr, hr, tolerance=0.5), "an HR voxel centre lies outside the LR field of view"
    if hr_reference is not None:
        assert covers(hr_reference, hr, tolerance=1e-3)


def test_oblique_mni_input_gets_the_hr_grid_it_was_made_from(tmp_path) -> None:
    """MNI152 cropped, in PIR order, rotated by 14° and 9°, 4 mm slices along file axis 1: a 50x20x80 input whose
    float32 affine gives a slice spacing a hair above 4 mm must come back 50x80x80, not 50x81x80."""
    from gen_sr.sample_data import load_mni152

    hr = load_mni152("t1").crop((60, 80, 60), (140, 160, 140)).reorient(("P", "I", "R")).crop((0, 0, 0), (50, 80, 80))
    hr = hr.with_data(hr.data, _rotation(2, 14) @ _rotation(0, 9) @ hr.affine)
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(1, 4.0)])
    assert lr.shape == (50, 20, 80)
    path = tmp_path / "lr.nii.gz"
    nib.save(lr.to_nifti(), path)
    hr_path = tmp_path / "hr.nii.gz"
    nib.save(hr.to_nifti(), hr_path)
    canon, reference = load_volume(path).canonical(), load_volume(hr_path).canonical()
    spacing = np.asarray(canon.spacing)
    assert spacing.max() != 4.0  # the float32 round-off this test is about
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        op = _pipeline_operator(canon)
    assert op.hr_shape == reference.shape == (80, 50, 80)
    assert op.lr_shape == canon.shape
    _check_covers(canon, op, reference)  # what `gen-sr audit --reference` checks
    hr_out = _grid(op.hr_shape, op.hr_affine(canon.affine)).reorient(hr.orientation)
    assert hr_out.shape == (50, 80, 80)
    assert np.allclose(hr_out.affine, reference.reorient(hr.orientation).affine, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 0.9999])
def test_4x4x5_oblique_input_with_a_4_9995_mm_header(scale: float) -> None:
    """A 4x4x5 mm oblique input whose slice spacing reads 4.9995 mm: 20 slices come back as 25 voxels of 4 mm.
    With the in-plane spacing read as exactly 4 mm the 99.99 mm field of view is not a whole number of 4 mm voxels
    (a warning says by how much); with every spacing read 0.01% short it is."""
    affine = _float32(oblique_affine(spacing=(4.0 * scale, 4.0 * scale, 4.9995), angles=(0.2, -0.15, 0.1)))
    lr = Volume(np.random.default_rng(0).random((12, 10, 20), dtype=np.float32), affine)
    canon = lr.canonical()
    axis = lr.axis_to_canonical(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = _pipeline_operator(canon)
    geometry = [str(w.message) for w in caught if issubclass(w.category, GeometryWarning)]
    assert op.hr_shape[axis] == 25
    assert op.lr_shape == canon.shape
    _check_covers(canon, op)
    if scale == 1.0:
        assert len(geometry) == 1 and "0.01 mm longer" in geometry[0], geometry
    else:
        assert not geometry, geometry


ROTATIONS = [(0.0, 0.0, 0.0), (0.3, -0.2, 0.15), (np.deg2rad(14), np.deg2rad(9), 0.0), (-0.41, 0.07, 0.33),
             (0.05, 0.6, -0.25)]
# (HR spacing, slice thickness = LR spacing, number of slices): HR spacings that divide the slice spacing
SPACINGS = [(1.0, 4.0, 13), (1.0, 5.0, 9), (1.0, 3.0, 17), (0.9, 4.5, 8), (1.1, 2.2, 14), (0.7, 2.8, 11),
            (1.0, 1.5, 12)]


@pytest.mark.parametrize("angles", ROTATIONS)
@pytest.mark.parametrize("h,thickness,n_lr", SPACINGS)
def test_simulated_lr_round_trips_to_the_hr_shape_with_float32_affines(angles, h, thickness, n_lr) -> None:
    n_hr = round(n_lr * thickness / h)
    for file_axis in (0, 2):
        shape = [6, 7, 5]
        shape[file_axis] = n_hr
        hr = Volume(np.random.default_rng(1).random(shape, dtype=np.float32),
                    _float32(oblique_affine(spacing=(h, h, h), angles=angles)))
        lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(file_axis, thickness)])
        assert lr.shape[file_axis] == n_lr
        lr = lr.with_data(lr.data, _float32(lr.affine))  # as read back from its NIfTI file
        canon, reference = lr.canonical(), hr.canonical()
        axis = lr.axis_to_canonical(file_axis)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GeometryWarning)
            op = operator_from_spacings(reference.spacing, canon.spacing, lr_shape=canon.shape, slice_axes=[axis])
            assert _pipeline_operator(canon, list(reference.spacing)).hr_shape == reference.shape
        assert op.hr_shape == reference.shape
        assert op.lr_shape == canon.shape
        assert np.allclose(op.hr_affine(canon.affine), reference.affine, atol=1e-4)
        _check_covers(canon, op, reference)


@pytest.mark.parametrize("s,n_lr,n_hr,how", [(2.6, 7, 18, "0.2 mm shorter"), (2.6, 8, 21, "0.2 mm longer"),
                                          (2.5, 5, 13, "0.5 mm longer")])
def test_non_dividing_target_rounds_to_the_nearest_voxel_and_warns(s: float, n_lr: int, n_hr: int, how: str) -> None:
    """2.6 mm slices onto a 1 mm grid: 7 slices (18.2 mm) give 18 voxels, 8 (20.8 mm) give 21; a tie (5 slices of
    2.5 mm, 12.5 mm) rounds up, covering the whole field of view."""
    with pytest.warns(GeometryWarning, match=f"axis 2 .*{how}") as caught:
        op = operator_from_spacings((1, 1, 1), (1, 1, s), lr_shape=(3, 4, n_lr))
    assert len(caught) == 1
    assert op.hr_shape == (3, 4, n_hr) and op.lr_shape == (3, 4, n_lr)
    _check_covers(Volume(np.zeros(op.lr_shape), np.diag([1.0, 1.0, s, 1.0])), op)
    assert abs(n_hr - n_lr * s) == pytest.approx(float(how.split()[0]))  # the difference the message states


def test_non_dividing_target_keeps_every_slice_centre_on_the_hr_grid() -> None:
    """5 mm slices onto a 4 mm grid: 21 slices (105 mm) would round to 26 voxels, but the last slice centre lies
    past the 26th voxel centre, so the grid takes 27 (3 mm longer) and says so."""
    with pytest.warns(GeometryWarning, match="3 mm longer"):
        op = operator_from_spacings((4, 4, 4), (4, 4, 5), lr_shape=(3, 3, 21))
    assert op.hr_shape == (3, 3, 27) and op.lr_shape == (3, 3, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        assert operator_from_spacings((4, 4, 4), (4, 4, 5), lr_shape=(3, 3, 20)).hr_shape == (3, 3, 25)


def _fov_corners(volume: Volume) -> np.ndarray:
    """``(8, 3)`` world positions (mm) of the outer corners of ``volume``'s first and last voxels."""
    edges = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in volume.shape], indexing="ij")).reshape(3, -1).T
    return apply_affine(volume.affine, edges)


@pytest.mark.parametrize("thickness", [3.0, 5.0, 6.5, 1.0])  # a gap, contiguous slices, an overlap, a big gap
@pytest.mark.parametrize("h,spacing,n_lr", [(1.0, 5.0, 6), (0.7, 2.8, 9)])
def test_the_slice_spacing_not_the_thickness_decides_the_field_of_view(thickness, h, spacing, n_lr) -> None:
    """Slices with a gap, contiguous or overlapping: ``n`` slices every ``s`` mm span ``n × s`` mm whatever their
    thickness. Made from an HR volume of that extent, their voxels' outer edges are the HR volume's; and going back,
    the HR grid (the pipeline's, no warning) is that volume's, edge to edge, with an exact adjoint."""
    n_hr = round(n_lr * spacing / h)
    hr = Volume(np.random.default_rng(1).random((7, 6, n_hr), dtype=np.float32),
                _float32(oblique_affine(spacing=(h, h, h))))
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(2, thickness, spacing)])
    assert lr.shape[2] == n_lr
    lr = lr.with_data(lr.data, _float32(lr.affine))  # as read back from its NIfTI file
    assert np.allclose(_fov_corners(lr), _fov_corners(hr), atol=1e-4)
    canon = lr.canonical()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        op = _any_axis_pipe().operator_for(canon, target_spacing=[h, h, h], slice_thickness=thickness)
    assert op.hr_shape == hr.canonical().shape and op.lr_shape == canon.shape
    sr = _grid(op.hr_shape, op.hr_affine(canon.affine))
    assert np.allclose(_fov_corners(sr), _fov_corners(canon), atol=1e-4)  # both RAS+: corner for corner
    assert np.allclose(sr.affine, hr.canonical().affine, atol=1e-4)
    x = torch.from_numpy(np.random.default_rng(2).random((1, 1, *op.hr_shape)))
    y = torch.from_numpy(np.random.default_rng(3).random((1, 1, *op.lr_shape)))
    assert float((op(x) * y).sum()) == pytest.approx(float((x * op.adjoint(y)).sum()), rel=1e-12)


def test_the_hr_grid_of_slices_with_a_gap_or_overlap_is_as_long_as_their_field_of_view() -> None:
    """6 slices every 5 mm (30 mm) onto 1 mm voxels: 30 voxels for 3 mm (a gap), 5 mm and 6 mm (an overlap) slices,
    not 28 or 31; 2.6 mm slices every 3 mm (7 of them, 21 mm) onto 1 mm: 21, where the 2.6 mm thickness alone
    would not divide."""
    for thickness in (3.0, 5.0, 6.0):
        with warnings.catch_warnings():
            warnings.simplefilter("error", GeometryWarning)
            op = operator_from_spacings((1, 1, 1), (1, 1, 5), lr_shape=(3, 4, 6), slice_thickness=thickness)
        assert op.hr_shape == (3, 4, 30), thickness
        assert op.lr_index_to_hr_index()[2, 3] == pytest.approx(2.0)  # the first slice's voxel starts the grid
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        assert operator_from_spacings((1, 1, 1), (1, 1, 3), lr_shape=(3, 4, 7), slice_thickness=2.6).hr_shape[2] == 21
