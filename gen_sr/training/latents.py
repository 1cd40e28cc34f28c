"""Latent-space helpers shared by diffusion training and validation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import SchedulerMixin

from gen_sr.models import AutoencoderKLModel, ConditionalUNetModel, latent_condition

__all__ = ["ddim_sample", "encode_pair", "estimate_scaling_factor"]


@torch.no_grad()
def encode_pair(
    vae: AutoencoderKLModel, hr: torch.Tensor, lr: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent of the HR image and the UNet condition built from the LR image.

    Args:
        vae: the (frozen) autoencoder.
        hr: HR images ``(B, 1, *S)``.
        lr: LR images on the HR grid ``(B, 1, *S)``.
        mode: condition mode (see :func:`gen_sr.models.latent_condition`).

    Returns:
        ``z0`` ``(B, latent_channels, *S / f)`` (scaled posterior mean) and the condition on the same grid.
    """
    z0 = vae.encode_latent(hr)
    return z0, latent_condition(lr, z0.shape[2:], vae=vae, mode=mode)


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKLModel, batches: Iterable[torch.Tensor]) -> float:
    """``1 / std`` of the unscaled posterior means over some HR batches ``(B, 1, *S)`` (Rombach et al.)."""
    latents = [vae.encode(x)[0].flatten() for x in batches]
    return float(1.0 / torch.cat(latents).std().clamp_min(1e-6))


@torch.no_grad()
def ddim_sample(
    unet: ConditionalUNetModel,
    scheduler: SchedulerMixin,
    condition: torch.Tensor,
    latent_channels: int,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Plain conditional sampling (no data consistency), used to validate during training.

    Args:
        unet: the denoiser.
        scheduler: a diffusers scheduler (e.g. ``DDIMScheduler``), configured like the training schedule.
        condition: ``(B, C_cond, *latent_shape)``.
        latent_channels: channels of the latent.
        steps: number of inference steps.
        generator: CPU generator for the initial noise.

    Returns:
        Scaled latents ``(B, latent_channels, *latent_shape)``.
    """
    scheduler.set_timesteps(steps)
    shape = (condition.shape[0], latent_channels, *condition.shape[2:])
    z = torch.randn(shape, generator=generator).to(condition) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(z, t), t, condition)
        z = scheduler.step(model_output, t, z).prev_sample
    return z
