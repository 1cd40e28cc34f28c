"""Validation on the held-out slab: autoencoder reconstruction, diffusion loss and DDIM sample quality.

Both run on one process with the unwrapped models, in eval mode, under ``torch.no_grad``, with fixed seeds, so
the figures of two runs (or of a run and its resumed copy) are comparable.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from diffusers import DDIMScheduler, SchedulerMixin

from gen_sr.eval.metrics import psnr, ssim
from gen_sr.models import Autoencoder, ConditionalUNetModel
from gen_sr.training.latents import ddim_sample, encode_pair
from gen_sr.training.losses import diffusion_target, objective_loss, sampling_overrides, training_timesteps

__all__ = ["validate_autoencoder", "validate_diffusion"]

Batch = dict[str, torch.Tensor]


def _psnr_batch(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR over the whole batch on the normalised [0, 1] intensity scale (an all-background item cannot make it
    infinite)."""
    return psnr(estimate.cpu().numpy(), reference.cpu().numpy(), data_range=1.0)


@torch.no_grad()
def validate_autoencoder(vae: Autoencoder, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    """Reconstruction PSNR and L1 of the posterior mean, averaged over the held-out batches."""
    was_training = vae.training
    vae.eval()
    psnrs, l1s = [], []
    for batch in batches:
        hr = batch["hr"].to(device)
        recon = vae.decode_latent(vae.encode_latent(hr)).float()
        psnrs.append(_psnr_batch(recon, hr))
        l1s.append(float((recon - hr).abs().mean()))
    vae.train(was_training)
    return {"val/psnr": float(np.mean(psnrs)), "val/l1": float(np.mean(l1s))}


@torch.no_grad()
def validate_diffusion(
    unet: ConditionalUNetModel,
    vae: Autoencoder,
    noise_scheduler: SchedulerMixin,
    batches: Iterable[Batch],
    *,
    condition: str,
    sampling_steps: int,
    seed: int,
    device: torch.device,
    objective: str = "diffusion",
) -> dict[str, float]:
    """Held-out diffusion loss (fixed noise and timesteps) and the quality of DDIM samples of the first batch.

    Returns:
        ``val/loss``; ``val/psnr`` and ``val/ssim`` of the decoded samples against HR; and, for reference,
        ``val/psnr_condition`` and ``val/ssim_condition`` of the LR condition image itself against HR.
    """
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    losses, figures = [], {}
    for i, batch in enumerate(batches):
        hr, lr = batch["hr"].to(device), batch["lr"].to(device)
        z0, cond = encode_pair(vae, hr, lr, condition)
        noise = torch.randn(z0.shape, generator=generator).to(z0)
        t = training_timesteps(objective, noise_scheduler.config.num_train_timesteps, z0.shape[0], device, generator)
        pred = unet(noise_scheduler.add_noise(z0, noise, t), t, cond)
        losses.append(float(objective_loss(objective, pred, diffusion_target(noise_scheduler, z0, noise, t))))
        if i == 0:
            ddim = DDIMScheduler.from_config(noise_scheduler.config, **sampling_overrides(objective))
            steps = 1 if objective == "regression" else sampling_steps
            z = ddim_sample(unet, ddim, cond, z0.shape[1], steps, generator)
            sample = vae.decode_latent(z).float()
            figures = {
                "val/psnr": _psnr_batch(sample, hr),
                "val/ssim": float(ssim(sample, hr, data_range=1.0).mean()),
                "val/psnr_condition": _psnr_batch(lr, hr),
                "val/ssim_condition": float(ssim(lr, hr, data_range=1.0).mean()),
            }
    unet.train(was_training)
    return {"val/loss": float(np.mean(losses)), **figures}
