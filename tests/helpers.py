"""Small helpers for tests: oblique affines, tiny NIfTI files, and the real heads of the data cache."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def oblique_affine(spacing=(1.0, 0.9, 1.1), angles=(0.3, -0.2, 0.15), origin=(-12.0, 7.5, 3.25)) -> np.ndarray:
    """A rotated, anisotropic voxel-to-world affine whose closest orientation is not RAS."""
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    flip = np.diag([-1.0, 1.0, 1.0])[[1, 0, 2]]  # swap the first two axes and flip one: an LAS-like order
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ flip @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def cached_head(name: str):
    """A real head of the data cache (:mod:`gen_sr.sample_data`), or a skip that says why it is missing."""
    from gen_sr.sample_data import REGISTRY_SOURCES, data_cache, load_sample

    if not (data_cache() / REGISTRY_SOURCES[name].file).is_file():
        pytest.skip(f"{name} is not in the data cache {data_cache()}: run `make data` (its registry was not "
                    "reachable when make test ran)")
    return load_sample(name)
