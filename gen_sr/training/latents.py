"""Latent-space helpers shared by diffusion training and validation."""

from __future__ import annotations

import torch
from diffusers import SchedulerMixin

from gen_sr.models import Autoencoder, ConditionalUNetModel, latent_condition

__all__ = ["ddim_sample", "encode_pair", "latent_noise_std"]


@torch.no_grad()
def encode_pair(
    vae: Autoencoder, hr: torch.Tensor, lr: torch.Tensor, mode: str
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
def latent_noise_std(vae: Autoencoder, images: torch.Tensor, noise_std: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``(C,)``: the std, per latent channel, that white Gaussian noise of ``noise_std`` per voxel in the images takes
    on in the latent: of ``encode_latent(x + noise_std · n) − encode_latent(x)`` over ``images`` ``(B, 1, *S)``. Exact
    for a linear autoencoder (:class:`~gen_sr.models.HaarAutoencoder`, whatever the images), a first-order estimate
    around these images for a learned one."""
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    diff = vae.encode_latent(images + noise_std * noise) - vae.encode_latent(images)
    return diff.transpose(0, 1).flatten(1).float().std(dim=1)


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
