"""Embedded sample data: the MNI152 ICBM 2009 template that the nilearn package ships.

Nothing is downloaded: nilearn keeps these three 1 mm images inside its package. The T1 template is real MRI data
(an average of 152 brains, 197 x 233 x 189 voxels at 1 mm); the grey- and white-matter maps are tissue
probabilities on the same grid, used as masks and tissue labels.

:func:`synthetic_subject` turns the one template into a population: each seed gives another "subject", the template
under a random smooth deformation and, for the T1, a random bias field and contrast change. Subjects drawn this way
are exchangeable, which is what conformal calibration needs (calibrate on some subjects, test on others); they vary
less than real brains do.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

import numpy as np

from gen_sr.volume import Volume

if TYPE_CHECKING:
    from monai.transforms import Rand3DElastic

__all__ = ["SAMPLES", "SUBJECT_VARIATION", "load_mni152", "subject_deformation", "synthetic_subject"]

SAMPLES = {
    "t1": "load_mni152_template",
    "gm": "load_mni152_gm_template",
    "wm": "load_mni152_wm_template",
}


def load_mni152(kind: str = "t1") -> Volume:
    """Load one of the MNI152 2009 templates at 1 mm.

    Args:
        kind: ``"t1"`` (T1-weighted template, intensities in [0, 1]), ``"gm"`` or ``"wm"`` (tissue probabilities).

    Returns:
        The template as a float32 :class:`~gen_sr.volume.Volume` in RAS+ orientation.
    """
    if kind not in SAMPLES:
        raise ValueError(f"unknown MNI152 sample {kind!r}; choose one of {sorted(SAMPLES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's import-time deprecation chatter
        from nilearn import datasets

        img = getattr(datasets, SAMPLES[kind])(resolution=1)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return Volume(data=data, affine=img.affine, header=img.header, source=f"MNI152 2009 {kind} template (nilearn)")


SUBJECT_VARIATION = {
    "rotate_range": 0.05,  # radians about each axis (about 3 degrees)
    "scale_range": 0.04,  # relative, per axis
    "sigma_range": (8.0, 10.0),  # smoothness of the elastic field, voxels
    "magnitude_range": (300.0, 600.0),  # its strength (MONAI's units); all together, median displacement 3-4 mm
    "bias_coeff_range": (0.0, 0.1),  # degree-3 polynomial log bias field
    "gamma": (0.85, 1.15),  # contrast (power law on the intensity range)
}
"""How far :func:`synthetic_subject` moves from the template (MONAI ``Rand3DElastic``, ``RandBiasField`` and
``RandAdjustContrast`` ranges)."""


def synthetic_subject(seed: int, kind: str = "t1") -> Volume:
    """The MNI152 template as another subject: a random smooth deformation (small rotation and scaling about the
    centre plus an elastic field), and for the T1 a random bias field and contrast change (:data:`SUBJECT_VARIATION`).

    The deformation depends only on ``seed``, so ``kind="gm"`` and ``"wm"`` with the same seed give the tissue maps
    of the same subject. The T1 is resampled with cubic B-splines (linear interpolation would blur it, making
    subjects easier to super-resolve than the template), the tissue maps linearly.

    Args:
        seed: which subject.
        kind: ``"t1"``, ``"gm"`` or ``"wm"``, as for :func:`load_mni152`.

    Returns:
        A float32 volume on the template's grid.
    """
    from monai.transforms import Compose, RandAdjustContrast, RandBiasField

    v = SUBJECT_VARIATION
    template = load_mni152(kind)
    data = np.asarray(subject_deformation(seed, mode=3 if kind == "t1" else "bilinear")(template.data[None]))[0]
    data = np.clip(data, 0.0, None if kind == "t1" else 1.0)  # spline overshoot; both intensity steps keep >= 0
    if kind == "t1":
        intensity = Compose([RandBiasField(degree=3, coeff_range=v["bias_coeff_range"], prob=1.0),
                             RandAdjustContrast(gamma=v["gamma"], prob=1.0)])
        intensity.set_random_state(state=np.random.RandomState([seed, 1]))
        data = np.asarray(intensity(data[None]))[0]
    data = data.astype(np.float32)
    return dataclasses.replace(template, data=data,
                               source=f"synthetic subject {seed} (MNI152 2009 {kind} template, deformed; gen_sr)")


def subject_deformation(seed: int, *, mode: str | int = "bilinear") -> Rand3DElastic:
    """The spatial transform of :func:`synthetic_subject` ``seed``: a seeded MONAI ``Rand3DElastic`` that maps a
    ``(C, X, Y, Z)`` array on the template's grid to the subject (zeros outside; ``mode``: its interpolation, an
    int for B-splines of that order)."""
    from monai.transforms import Rand3DElastic

    v = SUBJECT_VARIATION
    deform = Rand3DElastic(sigma_range=v["sigma_range"], magnitude_range=v["magnitude_range"], prob=1.0,
                           rotate_range=(v["rotate_range"],) * 3, scale_range=(v["scale_range"],) * 3, mode=mode,
                           padding_mode="zeros")
    deform.set_random_state(state=np.random.RandomState(seed))
    return deform
