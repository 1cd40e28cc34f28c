"""gen_sr: MRI super-resolution with latent diffusion models, explicit acquisition physics, and calibrated
hallucination-risk maps.

Modules:
    physics: the acquisition operator ``A`` (slices, k-space truncation, noise) with adjoint and projections.
    volume: NIfTI volumes with exact geometry, orientation handling and intensity normalisation.
    sample_data: the MNI152 template that the nilearn package ships (nothing is downloaded).
    cli: the ``gen-sr`` command.
"""

from gen_sr.errors import InputError
from gen_sr.physics import AcquisitionOperator, KSpaceTruncation, SliceAcquisition, add_noise, operator_from_spacings
from gen_sr.volume import IntensityNormalization, Volume, load_volume, save_volume

__version__ = "0.1.0.dev0"

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
