"""Small helpers for tests: oblique affines, tiny NIfTI files, and the real heads of the data cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

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


def count_calls(module: ModuleType, names: Sequence[str], patch: Callable[[Any, str, Any], None] = setattr) -> Counter:
    """A counter of the calls that ``module`` makes from now on to each of its functions ``names``: each still runs
    (a passthrough that counts, not a stand-in). ``patch`` puts the passthrough in place of the name (a test's
    ``monkeypatch.setattr``, undone after it)."""
    calls: Counter = Counter()

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def passthrough(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return passthrough

    for name in names:
        patch(module, name, counted(name, getattr(module, name)))
    return calls


def cached_head(name: str):
    """A real head of the data cache (:mod:`gen_sr.sample_data`), or a skip that says why it is missing."""
    from gen_sr.sample_data import REGISTRY_SOURCES, data_cache, load_sample

    if not (data_cache() / REGISTRY_SOURCES[name].file).is_file():
        pytest.skip(f"{name} is not in the data cache {data_cache()}: run `make data` (its registry was not "
                    "reachable when make test ran)")
    return load_sample(name)


def tiny_pipeline(spatial_dims: int = 2, any_axis: bool = True, seed: int = 0):
    """A real pipeline at tiny size: the exact Haar latent and a small random UNet whose zero-initialised output
    layers are given weights, so that its output matters; trained for every slice axis (``any_axis``) or for
    RAS+ axis 2, 3 sampling steps by default."""
    import torch

    from gen_sr.model_card import AcquisitionRanges, ModelCard
    from gen_sr.models import ConditionalUNetModel, HaarAutoencoder, condition_channels
    from gen_sr.pipelines import LatentDiffusionSRPipeline
    from gen_sr.schedulers import DDIMDataConsistencyScheduler

    torch.manual_seed(seed)
    vae = HaarAutoencoder(spatial_dims=spatial_dims)
    latent = vae.config.latent_channels
    unet = ConditionalUNetModel(spatial_dims=spatial_dims, latent_channels=latent,
                                condition_channels=condition_channels("both", 1, latent), channels=(8, 16),
                                attention_levels=(False, True), num_head_channels=8, norm_num_groups=4,
                                num_noise_levels=None)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    scheduler = DDIMDataConsistencyScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                                             prediction_type="v_prediction", clip_sample=False)
    card = ModelCard(trained_for=AcquisitionRanges(any_axis=any_axis, thickness=(2.0, 8.0)), num_inference_steps=3)
    pipe = LatentDiffusionSRPipeline(vae=vae, unet=unet, scheduler=scheduler, model_card=card)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def head_in_air(shape=(48, 48, 6), *, sigma: float = 2.0, air_level: float = 0.0, radius: float = 14.0,
                seed: int = 0, complex_noise: bool = True) -> np.ndarray:
    """A textured disc (the head) on air, slices along the last axis, with Rician noise of std ``sigma`` per real
    channel (``complex_noise``; else Gaussian); ``air_level`` is the air's own signal ν."""
    rng = np.random.default_rng(seed)
    i, j = np.indices(shape[:2]).astype(np.float64)
    inside = (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 < radius**2
    clean = np.where(inside, 100 + 10 * np.sin(i / 3), air_level)[..., None] * np.ones(shape)
    real = clean + sigma * rng.standard_normal(shape)
    return np.hypot(real, sigma * rng.standard_normal(shape)) if complex_noise else real
