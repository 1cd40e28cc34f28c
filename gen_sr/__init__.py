"""gen_sr: MRI super-resolution with latent diffusion models, explicit acquisition physics, and calibrated
hallucination-risk maps.

Modules:
    physics: the acquisition operator ``A`` (slices, k-space truncation, noise) with adjoint and projections.
    volume: NIfTI volumes with exact geometry, orientation handling and intensity normalisation.
    io: output checks before any work, atomic writes, strict JSON and run sidecars.
    model_card: what a model was trained for (``ModelCard``), read by the pipeline, the CLI and the evaluation.
    risk: the calibrated interval and the one hallucination-risk formula.
    sample_data: the MNI152 template that nilearn ships, and real heads fetched from package registries at set-up.
    contrast: contrast randomisation for training.
    pipelines, schedulers: the super-resolution pipeline, its data-consistency guidance and tiling, and DDIM.
    eval, audit: evaluation, calibration and stress tests; the hallucination audit and its report.
    training: the training scripts and their library.
    cli: the ``gen-sr`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gen_sr.errors import InputError
    from gen_sr.physics import (
        AcquisitionOperator,
        KSpaceTruncation,
        SliceAcquisition,
        add_noise,
        operator_from_spacings,
    )
    from gen_sr.volume import IntensityNormalization, Volume, load_volume, save_volume

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "AcquisitionOperator": "gen_sr.physics",
    "InputError": "gen_sr.errors",
    "IntensityNormalization": "gen_sr.volume",
    "KSpaceTruncation": "gen_sr.physics",
    "SliceAcquisition": "gen_sr.physics",
    "Volume": "gen_sr.volume",
    "add_noise": "gen_sr.physics",
    "load_volume": "gen_sr.volume",
    "operator_from_spacings": "gen_sr.physics",
    "save_volume": "gen_sr.volume",
}
"""The package's top-level names and the modules that define them, imported on first use (PEP 562), so that
``import gen_sr.cli`` or ``import gen_sr.volume`` does not import torch."""

__all__ = [
    "AcquisitionOperator",
    "InputError",
    "IntensityNormalization",
    "KSpaceTruncation",
    "SliceAcquisition",
    "Volume",
    "add_noise",
    "load_volume",
    "operator_from_spacings",
    "save_volume",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gen_sr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
