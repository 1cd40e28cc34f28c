"""Losses for training the autoencoder (stage 1) and the latent diffusion model (stage 2).

Tensors are ``(B, C, H, W)`` for ``spatial_dims=2`` and ``(B, C, D, H, W)`` for ``spatial_dims=3``.

* :func:`kl_divergence`: ``KL(N(mu, sigma²) || N(0, 1))`` summed over the non-batch dimensions and averaged over the
  batch, the convention of MONAI's generative tutorials.
* :class:`AutoencoderLoss`: L1 reconstruction + ``kl_weight`` · KL, optionally + ``perceptual_weight`` · MONAI's
  :class:`~monai.losses.PerceptualLoss` and + ``adversarial_weight`` · a least-squares patch-GAN term (MONAI's
  :class:`~monai.networks.nets.PatchDiscriminator` and :class:`~monai.losses.PatchAdversarialLoss`).
* :func:`diffusion_target` and :func:`diffusion_loss`: the regression target a diffusers scheduler's
  ``prediction_type`` asks for, and the (optionally per-sample weighted) MSE against it.
* :mod:`gen_sr.training.noisy_targets`: the same for clean latents known only with Gaussian noise of their own.

Pretrained perceptual networks are never downloaded: :mod:`gen_sr.training.perceptual` builds the perceptual term
only from local files, and otherwise warns once and training goes on without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import PatchDiscriminator

from gen_sr.training.perceptual import build_perceptual_loss

__all__ = [
    "AutoencoderLoss",
    "diffusion_loss",
    "diffusion_target",
    "kl_divergence",
]

def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(mu, sigma²)`` from the standard normal, per sample, averaged over the batch.

    ``0.5 · Σ (mu² + sigma² − log sigma² − 1)`` over all non-batch dimensions, then the batch mean. Computed in
    float32 whatever the input dtype.

    Args:
        mu: posterior means, shape ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (any ``(B, ...)`` works).
        sigma: posterior standard deviations (> 0), same shape as ``mu``.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: if the shapes differ.
    """
    if mu.shape != sigma.shape:
        raise ValueError(f"mu and sigma must have the same shape, got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    mu, var = mu.float(), sigma.float().pow(2)
    kl = 0.5 * (mu.pow(2) + var - torch.log(var) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


class AutoencoderLoss(torch.nn.Module):
    """Stage-1 (KL autoencoder) loss: L1 + KL, with optional perceptual and patch-adversarial terms.

    ``generator_loss = L1(rec, x) + kl_weight · KL(mu, sigma) + perceptual_weight · P(rec, x)
    + adversarial_weight · LS-GAN(D(rec) → real)``, the adversarial term only once
    :meth:`adversarial_active` (``adversarial_weight > 0`` and ``step >= adversarial_start_step``).
    ``discriminator_loss = adversarial_weight · ½ (LS-GAN(D(rec.detach()) → fake) + LS-GAN(D(x) → real))``.

    The module owns the discriminator (``self.discriminator``, ``None`` when ``adversarial_weight == 0``); give it
    its own optimizer. Under ``accelerate``, replace it by the prepared module
    (``loss.discriminator = accelerator.prepare(loss.discriminator)``) and checkpoint it separately. Backpropagating
    the generator loss also fills the discriminator's ``.grad``; call the discriminator optimizer's ``zero_grad()``
    before backpropagating :meth:`discriminator_loss` (the MONAI tutorial order).

    The perceptual network, when built, is a frozen submodule (it moves with ``.to(device)``). Inputs to every term
    are cast to float32 except the discriminator's, which runs in the ambient (autocast) dtype.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels ``C``.
        kl_weight: weight of the KL term.
        adversarial_weight: weight of the adversarial terms; 0 disables them and builds no discriminator.
        adversarial_start_step: first step (as passed to the loss methods) at which the adversarial terms are used.
        disc_channels: filters of the discriminator's first convolution (doubled per layer).
        disc_num_layers: ``num_layers_d`` of :class:`~monai.networks.nets.PatchDiscriminator`. Every spatial size
            must be at least ``3 · 2**disc_num_layers`` (24 for 3 layers).
        perceptual_weight: weight of the perceptual term; 0 disables it. When > 0 and the pretrained weights are not
            on disk (:func:`perceptual_weights_status`), one ``UserWarning`` is emitted and the term is dropped.
        perceptual_network: MONAI ``network_type``; ``None`` picks the MONAI tutorials' choice, ``"alex"`` in 2D and
            ``"squeeze"`` (2.5D) in 3D. MedicalNet networks run in true 3D, the others 2.5D in 3D.
        perceptual_fake_3d_ratio: fraction of slices per axis the 2.5D perceptual loss uses.

    Raises:
        ValueError: for ``spatial_dims`` not 2 or 3, negative weights, or an unknown/incompatible perceptual network.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.0,
        adversarial_start_step: int = 0,
        disc_channels: int = 32,
        disc_num_layers: int = 3,
        perceptual_weight: float = 0.0,
        perceptual_network: str | None = None,
        perceptual_fake_3d_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value in (
            ("kl_weight", kl_weight),
            ("adversarial_weight", adversarial_weight),
            ("perceptual_weight", perceptual_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.spatial_dims = spatial_dims
        self.kl_weight = float(kl_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_start_step = int(adversarial_start_step)
        self.disc_num_layers = int(disc_num_layers)

        self.discriminator: torch.nn.Module | None = None
        self.adversarial_loss: PatchAdversarialLoss | None = None
        if self.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(
                spatial_dims=spatial_dims,
                channels=disc_channels,
                in_channels=in_channels,
                out_channels=1,
                num_layers_d=disc_num_layers,
            )
            self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")

        self.perceptual_weight = float(perceptual_weight)
        self.perceptual_network: str | None = None
        self.perceptual_loss: PerceptualLoss | None = None
        if self.perceptual_weight > 0:
            network = (perceptual_network or ("alex" if spatial_dims == 2 else "squeeze")).lower()
            self.perceptual_loss = build_perceptual_loss(self.spatial_dims, network, perceptual_fake_3d_ratio)
            if self.perceptual_loss is not None:
                self.perceptual_network = network

    def adversarial_active(self, step: int) -> bool:
        """Whether the adversarial terms are used at ``step`` (``adversarial_weight > 0`` and ``step >= start``)."""
        return self.discriminator is not None and step >= self.adversarial_start_step

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        min_size = 3 * 2**self.disc_num_layers
        if min(images.shape[2:]) < min_size:
            raise ValueError(
                f"the patch discriminator with {self.disc_num_layers} layers needs spatial sizes >= {min_size}, "
                f"got {tuple(images.shape[2:])}; lower disc_num_layers"
            )
        assert self.discriminator is not None
        return self.discriminator(images.contiguous())[-1]  # the last of the intermediate outputs is the logit map

    def generator_loss(
        self,
        x: torch.Tensor,
        reconstruction: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to backpropagate into the autoencoder.

        Args:
            x: target images, ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            reconstruction: the autoencoder's output, same shape as ``x``.
            mu: latent means, ``(B, C_lat, h, w)`` or ``(B, C_lat, d, h, w)``.
            sigma: latent standard deviations, same shape as ``mu``.
            step: global optimisation step, compared with ``adversarial_start_step``.

        Returns:
            The scalar loss and float logs: ``"recon"`` (L1), ``"kl"`` (unweighted), ``"perceptual"`` (unweighted,
            only when the term is built), ``"gen_adv"`` (unweighted, 0.0 before the start step; only when
            ``adversarial_weight > 0``) and ``"loss"``.
        """
        if x.shape != reconstruction.shape:
            raise ValueError(f"x and reconstruction differ in shape: {tuple(x.shape)} vs {tuple(reconstruction.shape)}")
        recon = F.l1_loss(reconstruction.float(), x.float())
        kl = kl_divergence(mu, sigma)
        loss = recon + self.kl_weight * kl
        logs = {"recon": recon.item(), "kl": kl.item()}
        if self.perceptual_loss is not None:
            # MONAI's resnet50 input normalisation writes into 3-channel inputs in place: hand it copies.
            copy = self.perceptual_network == "resnet50"
            rec_p, x_p = reconstruction.float(), x.float()
            perceptual = self.perceptual_loss(rec_p.clone() if copy else rec_p, x_p.clone() if copy else x_p)
            loss = loss + self.perceptual_weight * perceptual
            logs["perceptual"] = perceptual.item()
        if self.discriminator is not None:
            gen_adv = 0.0
            if self.adversarial_active(step):
                assert self.adversarial_loss is not None
                adv = self.adversarial_loss(self._logits(reconstruction), target_is_real=True, for_discriminator=False)
                loss = loss + self.adversarial_weight * adv
                gen_adv = adv.item()
            logs["gen_adv"] = gen_adv
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, reconstruction: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to backpropagate into the discriminator; the reconstruction is detached.

        Args:
            x: real images, ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
            reconstruction: the autoencoder's output, same shape as ``x`` (detached here).
            step: global optimisation step.

        Returns:
            The scalar loss (already multiplied by ``adversarial_weight``) and float logs ``"disc_real"``,
            ``"disc_fake"`` (unweighted) and ``"disc_loss"``. When :meth:`adversarial_active` is false: a zero
            scalar with ``requires_grad=False`` (skip its backward and the optimizer step) and ``{"disc_loss": 0.0}``.
        """
        if not self.adversarial_active(step):
            return torch.zeros((), device=x.device), {"disc_loss": 0.0}
        assert self.adversarial_loss is not None
        fake = self.adversarial_loss(
            self._logits(reconstruction.detach()), target_is_real=False, for_discriminator=True
        )
        real = self.adversarial_loss(self._logits(x.detach()), target_is_real=True, for_discriminator=True)
        loss = self.adversarial_weight * 0.5 * (fake + real)
        return loss, {"disc_real": real.item(), "disc_fake": fake.item(), "disc_loss": loss.item()}


def diffusion_loss(
    model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error of the denoiser's output, optionally weighted per sample (e.g. min-SNR weights) and per
    latent channel (e.g. :meth:`gen_sr.models.HaarAutoencoder.band_loss_weights`).

    Computed in float32. With ``weights``: ``mean_b(weights[b] · mean((output[b] − target[b])²))``, which equals the
    plain MSE for all-one weights; ``channel_weights`` multiply each channel's squared error first.

    Args:
        model_output: ``(B, ...)``, e.g. ``(B, C, h, w)`` or ``(B, C, d, h, w)`` latents.
        target: same shape, from :func:`diffusion_target`.
        weights: optional ``(B,)`` per-sample weights.
        channel_weights: optional ``(C,)`` per-channel weights.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: on mismatched shapes.
    """
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ")
    if weights is None and channel_weights is None:
        return F.mse_loss(model_output.float(), target.float())
    squared = F.mse_loss(model_output.float(), target.float(), reduction="none")
    if channel_weights is not None:
        if channel_weights.shape != model_output.shape[1:2]:
            raise ValueError(f"channel_weights must have shape ({model_output.shape[1]},), got "
                             f"{tuple(channel_weights.shape)}")
        squared = squared * channel_weights.float().reshape(1, -1, *[1] * (squared.ndim - 2))
    if weights is None:
        return squared.mean()
    if weights.shape != model_output.shape[:1]:
        raise ValueError(f"weights must have shape ({model_output.shape[0]},), got {tuple(weights.shape)}")
    per_sample = squared.flatten(1).mean(dim=1)
    return (per_sample * weights.float()).mean()


def diffusion_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target for the scheduler's ``config.prediction_type``.

    ``"epsilon"``: ``noise``; ``"v_prediction"``: ``scheduler.get_velocity(latents, noise, timesteps)``;
    ``"sample"``: ``latents``. Works with diffusers' ``DDPMScheduler``/``DDIMScheduler`` (and any scheduler with the
    same ``get_velocity``).

    Args:
        scheduler: a diffusers scheduler.
        latents: clean latents ``x_0``, ``(B, C, h, w)`` or ``(B, C, d, h, w)``.
        noise: the Gaussian noise added, same shape.
        timesteps: ``(B,)`` integer timesteps.

    Returns:
        Tensor with the shape of ``latents``.

    Raises:
        ValueError: for any other prediction type.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def training_timesteps(objective: str, num_train_timesteps: int, n: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None, min_timestep: int = 0) -> torch.Tensor:
    """``(n,)`` training timesteps: uniform over the schedule from ``min_timestep`` on for ``"diffusion"``, always the
    last one for ``"regression"`` (see :class:`gen_sr.training.experiment.UNetConfig`)."""
    if objective == "regression":
        return torch.full((n,), num_train_timesteps - 1, dtype=torch.long, device=device)
    return torch.randint(min_timestep, num_train_timesteps, (n,), generator=generator).to(device)


def objective_loss(objective: str, model_output: torch.Tensor, target: torch.Tensor,
                   channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`diffusion_loss` (MSE, with optional ``channel_weights``) for ``"diffusion"``; the L1 loss of the
    clean-latent prediction for ``"regression"``."""
    if objective == "regression":
        if model_output.shape != target.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ")
        return F.l1_loss(model_output.float(), target.float())
    return diffusion_loss(model_output, target, channel_weights=channel_weights)


def sampling_overrides(objective: str) -> dict[str, object]:
    """Scheduler config overrides for sampling: a regression model samples in one step at the last timestep."""
    return {"timestep_spacing": "trailing"} if objective == "regression" else {}
