"""Shared fixtures: seeded randomness and tiny NIfTI files. Everything here is real code at tiny size."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import oblique_affine, write_nifti


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def hr_file(tmp_path: Path) -> Path:
    """A small smooth-ish 3D volume with positive intensities."""
    rng = np.random.default_rng(0)
    data = rng.random((12, 14, 16)).astype(np.float32) + 1.0
    return write_nifti(tmp_path / "hr.nii.gz", data, oblique_affine())


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder no file can be created in, for any user: a read-only folder, or sysfs for root (who may write to
    read-only folders)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    yield folder
    folder.chmod(0o700)
