"""Embedded sample data: the MNI152 ICBM 2009 template that the nilearn package ships.

Nothing is downloaded: nilearn keeps these three 1 mm images inside its package. The T1 template is real MRI data
(an average of 152 brains, 197 x 233 x 189 voxels at 1 mm); the grey- and white-matter maps are tissue
probabilities on the same grid, used as masks and tissue labels.
"""

from __future__ import annotations

import warnings

import numpy as np

from gen_sr.volume import Volume

__all__ = ["SAMPLES", "load_mni152"]

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
