"""Diffusion training on clean latents that are known only with Gaussian noise of their own (a scan's in-plane
slices, :mod:`gen_sr.training.adaptation`): that noise is taken as part of the diffusion noise, and the regression
target is corrected so that its expectation is the clean data's (Tweedie's formula; Daras et al., "Consistent
diffusion meets Tweedie", 2024).

* :func:`noisy_target_share`: the share of the diffusion noise that the latents' own noise makes up at a timestep;
* :func:`noisy_target_min_timestep`: the first timestep where that share is small enough to train at;
* :func:`noisy_target_pair`: the network input and its target, in place of ``add_noise`` and
  :func:`~gen_sr.training.losses.diffusion_target`.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from gen_sr.training.losses import diffusion_target

__all__ = ["noisy_target_min_timestep", "noisy_target_pair", "noisy_target_share"]


def noisy_target_share(scheduler: SchedulerMixin, latent_noise_std: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """``κ`` ``(B, C)``: the share of the diffusion noise at ``timesteps`` ``(B,)`` that clean latents' own Gaussian
    noise, of std ``latent_noise_std`` ``(C,)`` per channel, makes up: ``κ = ᾱ s² / (1 − ᾱ)``, the noise variance
    ``s²`` over the diffusion's in the clean latent's scale (``(1 − ᾱ) / ᾱ``). It falls as ``t`` grows."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float64)[timesteps][:, None]
    return alphas * latent_noise_std.to(timesteps.device, torch.float64)[None] ** 2 / (1 - alphas)


def noisy_target_min_timestep(scheduler: SchedulerMixin, latent_noise_std: torch.Tensor,
                              max_share: float = 0.5) -> int:
    """The first timestep at which the latents' own noise is at most ``max_share`` of the diffusion noise in every
    channel (:func:`noisy_target_share`); training on noisy latents draws its timesteps from there on. The target
    of :func:`noisy_target_pair` is scaled by ``1 / (1 − κ)``, so ``max_share`` bounds that (2x at 0.5).

    Raises:
        ValueError: where even the last timestep's noise is too small, or ``max_share`` is not in (0, 1).
    """
    if not 0 < max_share < 1:
        raise ValueError(f"max_share must be in (0, 1), got {max_share}")
    t = torch.arange(scheduler.config.num_train_timesteps)
    ok = (noisy_target_share(scheduler, latent_noise_std, t) <= max_share).all(dim=1).nonzero()
    if not len(ok):
        raise ValueError(f"the targets' noise (latent std up to {float(latent_noise_std.max()):.3g}) exceeds "
                         f"{max_share:g} of the diffusion noise at every timestep")
    return int(ok[0])


def noisy_target_pair(scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      latent_noise_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network input and its regression target for latents ``z = x₀ + s n`` that hold Gaussian noise of their own
    (std ``s`` = ``latent_noise_std`` ``(C,)`` per channel) around the clean ``x₀`` nobody has.

    The input is ``x_t = √ᾱ z + √(1 − ᾱ − ᾱ s²) ε``: distributed exactly as ``x₀`` noised to ``t``, the latents' own
    noise standing in for part of the diffusion's, which needs ``κ`` (:func:`noisy_target_share`) below 1. Along the
    chain, ``E[z | x_t] = (1 − κ) E[x₀ | x_t] + κ x_t / √ᾱ``, so ``x̂₀ = (z − κ x_t / √ᾱ) / (1 − κ)`` has the clean
    latent's conditional expectation, and so have the noise ``(x_t − √ᾱ x̂₀) / √(1 − ᾱ)`` and any target linear in
    the two: :func:`diffusion_target` of them is what the scheduler's ``prediction_type`` asks for, and the MSE
    against it is minimised by the same network as the clean data's. With ``s = 0`` this is ``add_noise`` and
    :func:`diffusion_target` of ``z``.

    Args:
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (DDPM, DDIM, ...).
        latents: the noisy clean latents ``z`` ``(B, C, *S)``.
        noise: Gaussian noise ``ε``, the same shape.
        timesteps: ``(B,)`` integer timesteps (from :func:`noisy_target_min_timestep` on).
        latent_noise_std: ``(C,)``.

    Returns:
        ``(x_t, target)``, each the shape of ``latents``.

    Raises:
        ValueError: where the latents' noise is not below the diffusion noise at a timestep.
    """
    shape = (-1,) + (1,) * (latents.ndim - 1)
    alphas = scheduler.alphas_cumprod.to(latents.device, torch.float64)[timesteps].reshape(shape)
    share = noisy_target_share(scheduler, latent_noise_std, timesteps).reshape(*latents.shape[:2],
                                                                                *(1,) * (latents.ndim - 2))
    if (share >= 1).any():
        raise ValueError(f"the latents' own noise exceeds the diffusion noise at timestep {int(timesteps.min())}")
    variance = latent_noise_std.to(latents.device, torch.float64).reshape(1, -1, *(1,) * (latents.ndim - 2)) ** 2
    z, eps = latents.double(), noise.double()
    noisy = alphas.sqrt() * z + (1 - alphas - alphas * variance).sqrt() * eps
    clean = (z - share * noisy / alphas.sqrt()) / (1 - share)
    effective_noise = (noisy - alphas.sqrt() * clean) / (1 - alphas).sqrt()
    target = diffusion_target(scheduler, clean, effective_noise, timesteps)
    return noisy.to(latents.dtype), target.to(latents.dtype)
