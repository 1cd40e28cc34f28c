"""Synthetic subjects: the MNI152 template under seeded deformations (``gen_sr.sample_data``)."""

from __future__ import annotations

import numpy as np
import pytest

from gen_sr.sample_data import load_mni152, subject_deformation, synthetic_subject


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
