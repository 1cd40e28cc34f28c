"""The two networks of latent diffusion super-resolution: a KL autoencoder and a conditional denoising UNet.

Both wrap MONAI networks (:class:`monai.networks.nets.AutoencoderKL` and
:class:`monai.networks.nets.DiffusionModelUNet`; no layers are written here) as diffusers models
(:class:`~diffusers.ModelMixin` + :class:`~diffusers.ConfigMixin`), so they get ``save_pretrained`` /
``from_pretrained`` (safetensors weights plus a JSON config), ``dtype`` loading, and can sit in a diffusers
pipeline next to a diffusers scheduler. The prediction type (``epsilon``, ``v_prediction``, ``sample``) is a property
of the scheduler, not of the UNet, and is configured there.

Conditioning design:

* **Concat-conditioning on the LR at latent resolution.** The low-resolution (LR) acquisition, first brought onto
  the high-resolution (HR) grid (e.g. with the adjoint or pseudo-inverse of the acquisition operator), is resampled
  to the latent grid and concatenated to the noisy latent along channels, as in diffusers'
  ``LDMSuperResolutionPipeline``. The condition is spatially aligned with the latent, so the UNet's convolutions see
  "what was measured here" at every position; no cross-attention or pooling of the condition is needed, and the
  same model runs on any field of view.
* **Optional encoded-latent condition.** Instead of (``mode="latent"``) or in addition to (``mode="both"``) the
  resampled image, the condition can be the VAE's scaled posterior mean of the LR-on-HR image. It lives in the same
  space as the diffusion variable, which helps the UNet copy the low frequencies it should not change; the resampled
  image keeps the raw measured intensities, which the VAE may smooth. :func:`latent_condition` builds all three and
  :func:`condition_channels` gives the matching ``condition_channels`` for :class:`ConditionalUNetModel`.
* **Noise-level conditioning of the LR (noise augmentation).** As in ``StableDiffusionUpscalePipeline``, the LR
  condition can be corrupted with a known amount of noise during training and the UNet is told that amount as an
  integer level in ``[0, num_noise_levels)``, embedded like a class label (MONAI's ``num_class_embeds`` /
  ``class_labels``) and added to the timestep embedding. This makes the model robust to the difference between
  simulated training LR and real scans, and gives a knob at inference time (a higher level trusts the LR less).

Dimensionality: 2D models (``spatial_dims=2``) work on slices across the super-resolved axis, i.e. each sample is an
in-plane slice that contains the through-plane direction, tensors ``(B, C, H, W)``; extra condition channels can
hold neighbouring LR slices (2.5D). 3D models (``spatial_dims=3``) work on patches, tensors ``(B, C, D, H, W)``.
Switching between the two is only the ``spatial_dims`` config value; everything else is dimension-agnostic.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from gen_sr.errors import InputError

__all__ = [
    "AUTOENCODERS",
    "CONDITION_MODES",
    "Autoencoder",
    "AutoencoderKLModel",
    "ConditionMode",
    "ConditionalUNetModel",
    "HaarAutoencoder",
    "LatentSpaceMixin",
    "condition_channels",
    "describe_autoencoder",
    "latent_condition",
    "load_autoencoder",
    "set_sdpa_attention",
]

ConditionMode = Literal["resample", "latent", "both"]
CONDITION_MODES: tuple[str, ...] = ("resample", "latent", "both")


def _as_tuple(value: int | bool | Sequence) -> int | bool | tuple:
    """JSON configs give lists back: MONAI and the config are kept on tuples (scalars pass through)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return tuple(value)


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class LatentSpaceMixin:
    """What every autoencoder here shares: the *scaled* latent that the diffusion model works on,
    ``z * scaling_factor`` (:meth:`encode_latent` / :meth:`decode_latent`), as in Rombach et al., and the shape checks.
    ``scaling_factor`` is measured on training images (typically ``1 / std(z)``) and recorded in the config with
    :meth:`set_scaling_factor`. A class using it has ``config`` entries ``spatial_dims``, ``in_channels``,
    ``latent_channels`` and ``scaling_factor``, a :attr:`downsample_factor`, and ``encode``, ``sample_latent`` and
    ``decode`` on unscaled latents."""

    config: Any
    downsample_factor: int

    def describe(self) -> str:
        """One line on what the latent is (``gen-sr info --model``)."""
        return (f"learned ({type(self).__name__}), {self.config.latent_channels} channels at "
                f"1/{self.downsample_factor} the size")

    @property
    def scaling_factor(self) -> float:
        """The latent scaling factor recorded in the config."""
        return float(self.config.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        """Record a new latent scaling factor in the config (saved by ``save_pretrained``).

        Args:
            value: positive factor, typically ``1 / std`` of unscaled latents of training images.
        """
        value = float(value)
        if not value > 0:
            raise ValueError(f"scaling_factor must be positive, got {value}.")
        self.register_to_config(scaling_factor=value)

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the latent of an image with the given spatial shape.

        Args:
            spatial_shape: image spatial shape ``(H, W)`` or ``(D, H, W)``; each a multiple of
                :attr:`downsample_factor`.

        Returns:
            The latent spatial shape, ``spatial_shape // downsample_factor``.
        """
        spatial_shape = tuple(int(s) for s in spatial_shape)
        f = self.downsample_factor
        if len(spatial_shape) != self.config.spatial_dims or any(s % f for s in spatial_shape):
            raise ValueError(
                f"Image spatial shape {_shape_str(spatial_shape)} must have {self.config.spatial_dims} entries, "
                f"each a multiple of the autoencoder's downsample factor {f}."
            )
        return tuple(s // f for s in spatial_shape)

    def _check_image(self, x: torch.Tensor) -> None:
        cfg = self.config
        f = self.downsample_factor
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels or any(s % f for s in x.shape[2:]):
            axes = "(B, C, H, W)" if cfg.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"{type(self).__name__} expects images {axes} with C={cfg.in_channels} and spatial sizes that are "
                f"multiples of {f}; got {_shape_str(x.shape)}."
            )

    def _check_latent(self, z: torch.Tensor) -> None:
        cfg = self.config
        if z.ndim != cfg.spatial_dims + 2 or z.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"{type(self).__name__} expects latents (B, {cfg.latent_channels}, *S) with {cfg.spatial_dims} "
                f"spatial axes; got {_shape_str(z.shape)}."
            )

    def encode_latent(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latent of images, the variable the diffusion model works on.

        Args:
            x: images ``(B, C_in, H, W)`` or ``(B, C_in, D, H, W)``.
            sample: draw from the posterior instead of taking its mean.
            generator: generator for the posterior sample.

        Returns:
            ``(z - shift) * scale``, ``(B, latent_channels, *S / downsample_factor)``: ``z * scaling_factor``, or
            for a :class:`HaarAutoencoder` with band statistics each band standardised.
        """
        mu, sigma = self.encode(x)
        z = self.sample_latent(mu, sigma, generator=generator) if sample else mu
        shift, scale = self._latent_affine(z)
        return (z - shift) * scale

    def decode_latent(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Decode a *scaled* latent (undoes :meth:`encode_latent`'s scaling first).

        Args:
            z_scaled: scaled latent ``(B, latent_channels, *S)`` (:meth:`encode_latent`'s).

        Returns:
            Images ``(B, C_out, *S * downsample_factor)``.
        """
        shift, scale = self._latent_affine(z_scaled)
        return self.decode(z_scaled / scale + shift)

    def _latent_affine(self, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """``(shift, scale)`` of the scaled latent, broadcastable to ``z``."""
        return 0.0, self.scaling_factor

    @torch.no_grad()
    def fit_latent_scaling(self, batches: Iterable[torch.Tensor]) -> str:
        """Measure and record how latents are scaled, from some training images ``(B, C_in, *S)``: here
        ``scaling_factor = 1 / std`` of the unscaled posterior means (Rombach et al.). Returns a description."""
        latents = torch.cat([self.encode(x)[0].flatten() for x in batches])
        self.set_scaling_factor(float(1.0 / latents.std().clamp_min(1e-6)))
        return f"latent scaling factor {self.scaling_factor:.4f}"


class AutoencoderKLModel(LatentSpaceMixin, ModelMixin, ConfigMixin):
    """KL-regularised autoencoder (MONAI ``AutoencoderKL``) that maps images to a scaled latent space and back.

    Images are ``(B, in_channels, H, W)`` (``spatial_dims=2``) or ``(B, in_channels, D, H, W)``
    (``spatial_dims=3``); latents are ``(B, latent_channels, *S / downsample_factor)``. Every spatial size must be a
    multiple of :attr:`downsample_factor` (pad first, e.g. with MONAI's ``DivisiblePad``).

    The diffusion model works on *scaled* latents ``z * scaling_factor`` (:meth:`encode_latent` /
    :meth:`decode_latent`), as in Rombach et al.; ``scaling_factor`` is measured after training the autoencoder
    (typically ``1 / std(z)``) and recorded in the config with :meth:`set_scaling_factor`.

    Args:
        spatial_dims: 2 for slices, 3 for volumes/patches.
        in_channels: image channels at the input.
        out_channels: image channels at the output.
        channels: feature channels per level; ``len(channels) - 1`` downsamplings by 2.
        latent_channels: channels of the latent space.
        num_res_blocks: residual blocks per level.
        attention_levels: self-attention at each level (same length as ``channels``).
        norm_num_groups: GroupNorm groups; every entry of ``channels`` must be a multiple of it.
        with_encoder_nonlocal_attn: self-attention at the bottom of the encoder.
        with_decoder_nonlocal_attn: self-attention at the bottom of the decoder.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in attention blocks.
        scaling_factor: multiplies latents before diffusion (and divides them before decoding).

    ``enable_gradient_checkpointing()`` switches on MONAI's activation checkpointing of the whole encoder and decoder
    (``use_checkpoint``), which is what makes 3D autoencoder training fit in memory.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        latent_channels: int = 3,
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] = (False, False, False),
        norm_num_groups: int = 16,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        use_flash_attention: bool = False,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}.")
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        num_res_blocks = _as_tuple(num_res_blocks)
        # Keep the in-memory config on tuples whether it came from Python or from config.json (lists).
        self.register_to_config(
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            scaling_factor=float(scaling_factor),
        )
        self.net = AutoencoderKL(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable | None = None
    ) -> None:
        # MONAI checkpoints the encoder and decoder itself (torch.utils.checkpoint, use_reentrant=False).
        self.net.use_checkpoint = bool(enable)

    @property
    def downsample_factor(self) -> int:
        """Ratio between image and latent size along every spatial axis: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.config.channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation of the (unscaled) latent.

        Args:
            x: images ``(B, C_in, H, W)`` or ``(B, C_in, D, H, W)``.

        Returns:
            ``(mu, sigma)``, each ``(B, latent_channels, *S / downsample_factor)``.
        """
        self._check_image(x)
        return self.net.encode(x)

    def sample_latent(
        self, mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Reparameterised sample ``mu + sigma * eps`` of the (unscaled) posterior.

        Args:
            mu: posterior mean ``(B, latent_channels, *S)``.
            sigma: posterior standard deviation, same shape.
            generator: optional generator for ``eps`` (on ``mu``'s device); without one MONAI's own ``sampling``
                draws from the global RNG.

        Returns:
            The sample, shape of ``mu``.
        """
        if generator is None:
            return self.net.sampling(mu, sigma)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an *unscaled* latent.

        Args:
            z: latent ``(B, latent_channels, *S)``.

        Returns:
            Images ``(B, C_out, *S * downsample_factor)``.
        """
        self._check_latent(z)
        return self.net.decode(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Autoencoder training pass: encode, sample the posterior, decode.

        Args:
            x: images ``(B, C_in, H, W)`` or ``(B, C_in, D, H, W)``.
            generator: optional generator for the posterior sample.

        Returns:
            ``(reconstruction, mu, sigma)``: reconstruction ``(B, C_out, *S)``; ``mu`` and ``sigma``
            ``(B, latent_channels, *S / downsample_factor)`` for the KL term.
        """
        mu, sigma = self.encode(x)
        z = self.sample_latent(mu, sigma, generator=generator)
        return self.net.decode(z), mu, sigma


def _haar_filters(spatial_dims: int) -> torch.Tensor:
    """The ``2**d`` orthonormal Haar filters of one level in ``d`` dimensions, ``(2**d, 1, 2, ..., 2)``: outer
    products of the low-pass ``[1, 1] / √2`` and high-pass ``[1, -1] / √2`` filters along each axis (LL, LH, HL, HH
    in 2D). They are an orthonormal basis of every 2 x 2 (x 2) block, so the stride-2 convolution with them is an
    orthogonal map and its transpose is its exact inverse."""
    low, high = torch.tensor([1.0, 1.0]) / math.sqrt(2.0), torch.tensor([1.0, -1.0]) / math.sqrt(2.0)
    filters = []
    for bands in itertools.product((low, high), repeat=spatial_dims):
        f = bands[0]
        for b in bands[1:]:
            f = torch.outer(f.flatten(), b).reshape(*f.shape, 2)
        filters.append(f)
    return torch.stack(filters)[:, None]


class HaarAutoencoder(LatentSpaceMixin, ModelMixin, ConfigMixin):
    """An exact autoencoder: the orthonormal Haar wavelet transform, applied ``levels`` times to every band (a full
    wavelet-packet decomposition). Images ``(B, C, *S)`` become latents ``(B, C * 2**(d * levels), *S / 2**levels)``
    (4 channels at half the size for one level in 2D, 8 in 3D), and :meth:`decode` inverts :meth:`encode` to
    float round-off, for every image and every contrast.

    It has no weights and needs no training. As the latent of a diffusion model it keeps what a learned autoencoder
    at the same size (downsampling 2, 4 channels: no compression) is for, a UNet on a quarter of the positions,
    without its reconstruction error, which is the same in every sample and so invisible to their spread (the
    wavelet diffusion models of Phung et al., CVPR 2023, and of Friedrich et al., 2024, for 3D medical images, do
    the same). Data-consistency corrections, ``E(x + δ) − E(x) = E(δ)``, are exact too, since it is linear.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        levels: decomposition levels; the downsampling factor is ``2**levels``.
        latent_channels: ``in_channels * 2**(spatial_dims * levels)``; it is computed, and given only so that a
            saved config loads (another value is an error).
        scaling_factor: multiplies latents before diffusion (and divides them before decoding), where no band
            statistics are set.
        band_mean, band_std: per latent channel, the mean and std of each band on training images
            (:meth:`fit_latent_scaling`); the diffusion model then works on standardised bands. The low-pass band
            holds nearly all of an image's energy and the detail bands a few per cent of it, so one common scale
            would drown the detail, which is what super-resolution has to find, in the first few noise levels.
    """

    @register_to_config
    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, levels: int = 1,
                 latent_channels: int | None = None, scaling_factor: float = 1.0,
                 band_mean: Sequence[float] | None = None, band_std: Sequence[float] | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}.")
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be positive, got {scaling_factor}.")
        channels = in_channels * 2 ** (spatial_dims * levels)
        if latent_channels not in (None, channels):
            raise ValueError(f"a {levels}-level Haar transform of {in_channels} channel(s) in {spatial_dims}D has "
                             f"{channels} latent channels, not {latent_channels}.")
        self.register_to_config(latent_channels=channels, scaling_factor=float(scaling_factor))
        self.register_buffer("filters", _haar_filters(spatial_dims))  # saved, so that the folder has weights
        if (band_mean is None) != (band_std is None):
            raise ValueError("give both band_mean and band_std, or neither")
        if band_mean is not None:
            self.set_band_statistics(band_mean, band_std)

    def band_loss_weights(self, levels: int) -> torch.Tensor:
        """Per-channel weights ``(latent_channels,)`` that make the MSE of standardised bands equal, up to a constant,
        to that of a ``levels``-level latent (fewer levels than this one's): the bands of one coarser band (its
        children in the packet tree, consecutive channels) are weighted by their share of its variance,
        ``std_b² / mean(std²)`` over the group, as if they were standardised by the parent's scale together.
        Normalised to mean 1. Needs the band statistics."""
        if self.config.band_std is None:
            raise ValueError("band loss weights need the band statistics (train_autoencoder measures them)")
        if not 1 <= levels < self.config.levels:
            raise ValueError(f"a {self.config.levels}-level latent can be weighted as 1 to {self.config.levels - 1} "
                             f"levels, not {levels}")
        variance = torch.tensor(self.config.band_std, dtype=torch.float64) ** 2
        group = 2 ** (self.config.spatial_dims * (self.config.levels - levels))  # children of one coarser band
        groups = variance.reshape(-1, group)
        weights = (groups / groups.mean(dim=1, keepdim=True)).flatten()
        return (weights / weights.mean()).float()

    def set_band_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Record each band's mean and std (``latent_channels`` values each; std > 0), saved in the config."""
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        n = self.config.latent_channels
        if len(mean) != n or len(std) != n or not all(s > 0 for s in std):
            raise ValueError(f"band statistics need {n} means and {n} positive stds, got {mean} and {std}")
        self.register_to_config(band_mean=tuple(mean), band_std=tuple(std))

    def _latent_affine(self, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        if self.config.band_mean is None:
            return 0.0, self.scaling_factor
        shape = (1, -1, *[1] * self.config.spatial_dims)
        mean = torch.tensor(self.config.band_mean, dtype=z.dtype, device=z.device).reshape(shape)
        return mean, 1.0 / torch.tensor(self.config.band_std, dtype=z.dtype, device=z.device).reshape(shape)

    @torch.no_grad()
    def fit_latent_scaling(self, batches: Iterable[torch.Tensor]) -> str:
        """Measure and record each band's mean and std on some training images ``(B, C_in, *S)``."""
        z = torch.cat([self.encode(x)[0].transpose(0, 1).flatten(1) for x in batches], dim=1).double()
        self.set_band_statistics(z.mean(dim=1).tolist(), z.std(dim=1).clamp_min(1e-6).tolist())
        return "band means " + ", ".join(f"{m:.3g}" for m in self.config.band_mean) + "; stds " + ", ".join(
            f"{s:.3g}" for s in self.config.band_std)

    @property
    def downsample_factor(self) -> int:
        return 2 ** int(self.config.levels)

    def describe(self) -> str:
        return (f"the Haar wavelet transform, {self.config.levels} level(s) (exact: no reconstruction error), "
                f"{self.config.latent_channels} channels at 1/{self.downsample_factor} the size")

    def _conv(self, transpose: bool) -> Callable:
        if self.config.spatial_dims == 2:
            return F.conv_transpose2d if transpose else F.conv2d
        return F.conv_transpose3d if transpose else F.conv3d

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The wavelet coefficients, and a zero ``sigma`` (the posterior is a point).

        Args:
            x: images ``(B, C_in, H, W)`` or ``(B, C_in, D, H, W)``, sizes multiples of :attr:`downsample_factor`.

        Returns:
            ``(z, zeros)``, each ``(B, latent_channels, *S / downsample_factor)``.
        """
        self._check_image(x)
        z, w = x, self.filters.to(x.dtype)
        for _ in range(self.config.levels):  # every band into 2**d bands at half the size
            b, c = z.shape[:2]
            z = self._conv(False)(z.reshape(b * c, 1, *z.shape[2:]), w, stride=2)
            z = z.reshape(b, c * w.shape[0], *z.shape[2:])
        return z, torch.zeros_like(z)

    def sample_latent(self, mu: torch.Tensor, sigma: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent itself (the posterior is a point mass)."""
        return mu

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse transform of *unscaled* coefficients ``(B, latent_channels, *S)`` → ``(B, C_in, *S * f)``."""
        self._check_latent(z)
        x, w = z, self.filters.to(z.dtype)
        k = w.shape[0]
        for _ in range(self.config.levels):
            b, c = x.shape[:2]
            x = self._conv(True)(x.reshape(b * c // k, k, *x.shape[2:]), w, stride=2)
            x = x.reshape(b, c // k, *x.shape[2:])
        return x

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, z, zeros)``, as :meth:`AutoencoderKLModel.forward` returns."""
        z, sigma = self.encode(x)
        return self.decode(z), z, sigma


Autoencoder = AutoencoderKLModel | HaarAutoencoder
"""Either autoencoder: the latent space of a latent diffusion model."""

AUTOENCODERS: dict[str, type] = {"AutoencoderKLModel": AutoencoderKLModel, "HaarAutoencoder": HaarAutoencoder}
"""The autoencoder classes by the ``_class_name`` their saved ``config.json`` records."""


def _saved_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an exported autoencoder folder, with the name of a known class (:data:`AUTOENCODERS`).

    Raises:
        InputError: no ``config.json``, unreadable JSON, or a class that is not one of :data:`AUTOENCODERS`.
    """
    config = Path(path) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except FileNotFoundError:
        raise InputError("no exported autoencoder here (config.json)", path,
                         "run gen_sr.training.train_autoencoder first, or set autoencoder_path") from None
    except ValueError as e:
        raise InputError(f"is not readable JSON ({e})", config) from None
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if name not in AUTOENCODERS:
        raise InputError(f"names autoencoder class {name!r}; expected one of {sorted(AUTOENCODERS)}", config)
    return cfg


def describe_autoencoder(path: str | Path) -> str:
    """One line on an exported autoencoder folder (its class's ``describe``), from its ``config.json`` alone: the
    class is built from the config, no weights are read."""
    try:
        cfg = _saved_config(path)
    except InputError as e:
        return f"unknown ({e})"
    return AUTOENCODERS[cfg["_class_name"]].from_config(cfg).describe()


def load_autoencoder(path: str | Path) -> Autoencoder:
    """An exported autoencoder folder (``save_pretrained``), of whichever class its ``config.json`` names.

    Raises:
        InputError: as :func:`_saved_config`.
    """
    return AUTOENCODERS[_saved_config(path)["_class_name"]].from_pretrained(path)


class ConditionalUNetModel(ModelMixin, ConfigMixin):
    """Denoising UNet (MONAI ``DiffusionModelUNet``) on latents concatenated with a spatially aligned condition.

    The MONAI UNet gets ``in_channels = latent_channels + condition_channels`` and
    ``out_channels = latent_channels``; what the output means (noise, ``v`` or the clean latent) is set by the
    scheduler's ``prediction_type``. The LR noise-augmentation level enters as MONAI's class embedding.

    Args:
        spatial_dims: 2 for slices, 3 for patches.
        latent_channels: channels of the diffusion variable (the autoencoder's ``latent_channels``).
        condition_channels: channels of the condition; see :func:`condition_channels`.
        channels: feature channels per level; latent spatial sizes must be multiples of
            ``2 ** (len(channels) - 1)``.
        attention_levels: self-attention at each level (same length as ``channels``).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head (one value, or one per level).
        norm_num_groups: GroupNorm groups; every entry of ``channels`` must be a multiple of it.
        num_noise_levels: number of LR noise-augmentation levels, or None for no noise-level conditioning.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in attention blocks.
    """

    @register_to_config
    def __init__(
        self,
        spatial_dims: int = 2,
        latent_channels: int = 3,
        condition_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, True, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 16,
        norm_num_groups: int = 16,
        num_noise_levels: int | None = 1000,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if condition_channels < 1:
            raise ValueError(f"condition_channels must be at least 1, got {condition_channels}.")
        if num_noise_levels is not None and num_noise_levels < 1:
            raise ValueError(f"num_noise_levels must be None or at least 1, got {num_noise_levels}.")
        channels = tuple(int(c) for c in channels)
        attention_levels = tuple(bool(a) for a in attention_levels)
        num_res_blocks = _as_tuple(num_res_blocks)
        num_head_channels = _as_tuple(num_head_channels)
        self.register_to_config(
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
        )
        self.net = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=latent_channels + condition_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            num_class_embeds=num_noise_levels,
            use_flash_attention=use_flash_attention,
        )

    @property
    def downsample_factor(self) -> int:
        """Latent spatial sizes must be multiples of this: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.config.channels) - 1)

    @staticmethod
    def _batch_vector(
        value: int | float | torch.Tensor, batch: int, device: torch.device
    ) -> tuple[torch.Tensor | None, tuple[int, ...]]:
        """A scalar, a 0-d/(1,) tensor or a (B,) tensor as a (B,) tensor (None if the shape does not fit)."""
        t = torch.as_tensor(value, device=device)
        if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
            return t.reshape(1).expand(batch), tuple(t.shape)
        if t.ndim == 1 and t.shape[0] == batch:
            return t, tuple(t.shape)
        return None, tuple(t.shape)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        condition: torch.Tensor,
        noise_level: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from a noisy latent and its condition.

        Args:
            sample: noisy scaled latent ``(B, latent_channels, H, W)`` or ``(B, latent_channels, D, H, W)``.
            timestep: diffusion timestep, a scalar or a ``(B,)`` tensor.
            condition: condition on the latent grid ``(B, condition_channels, *S)`` (see :func:`latent_condition`).
            noise_level: LR noise-augmentation level in ``[0, num_noise_levels)``, a scalar or a ``(B,)`` integer
                tensor; None means level 0. Must be None when the model has no noise-level conditioning. Its range
                is checked eagerly (one host sync on GPU; skipped under ``torch.compile``).

        Returns:
            The model output ``(B, latent_channels, *S)`` (noise, ``v`` or clean latent per the scheduler).
        """
        cfg = self.config
        problems = []
        batch = sample.shape[0] if sample.ndim > 0 else 0
        spatial = tuple(sample.shape[2:])
        f = self.downsample_factor
        if sample.ndim != cfg.spatial_dims + 2 or sample.shape[1] != cfg.latent_channels:
            problems.append(f"sample must be (B, {cfg.latent_channels}, *S), got {_shape_str(sample.shape)}")
        elif any(s % f for s in spatial):
            problems.append(f"sample spatial sizes {_shape_str(spatial)} must be multiples of {f}")
        if (
            condition.ndim != cfg.spatial_dims + 2
            or condition.shape[0] != batch
            or condition.shape[1] != cfg.condition_channels
            or tuple(condition.shape[2:]) != spatial
        ):
            problems.append(
                f"condition must be (B, {cfg.condition_channels}, *S) with the B and S of sample "
                f"{_shape_str(sample.shape)}, got {_shape_str(condition.shape)}"
            )
        timesteps, t_shape = self._batch_vector(timestep, batch, sample.device)
        if timesteps is None:
            problems.append(f"timestep must be a scalar or a ({batch},) tensor, got shape {t_shape}")
        labels = None
        if cfg.num_noise_levels is None:
            if noise_level is not None:
                problems.append("noise_level given, but the model was built with num_noise_levels=None")
        else:
            labels, l_shape = self._batch_vector(0 if noise_level is None else noise_level, batch, sample.device)
            if labels is None:
                problems.append(f"noise_level must be a scalar or a ({batch},) tensor, got shape {l_shape}")
            elif labels.is_floating_point() or labels.is_complex():
                problems.append(f"noise_level must be integer, got dtype {labels.dtype}")
            elif (
                not torch.compiler.is_compiling()
                and labels.numel()
                and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_noise_levels)
            ):
                problems.append(f"noise_level must lie in [0, {cfg.num_noise_levels})")
        if problems:
            raise ValueError("ConditionalUNetModel: " + "; ".join(problems) + ".")

        x = torch.cat([sample, condition.to(dtype=sample.dtype)], dim=1)
        if labels is not None:
            labels = labels.long()
        return self.net(x, timesteps=timesteps, class_labels=labels)


def condition_channels(mode: ConditionMode, image_channels: int, latent_channels: int) -> int:
    """Number of condition channels :func:`latent_condition` produces in a given mode.

    Use it to set :class:`ConditionalUNetModel`'s ``condition_channels`` so the config matches the data.

    Args:
        mode: ``"resample"``, ``"latent"`` or ``"both"``.
        image_channels: channels of the LR-on-HR image (e.g. ``k`` for ``k`` neighbouring LR slices in 2.5D).
        latent_channels: the autoencoder's ``latent_channels``.

    Returns:
        ``image_channels``, ``latent_channels`` or their sum.
    """
    if mode == "resample":
        return int(image_channels)
    if mode == "latent":
        return int(latent_channels)
    if mode == "both":
        return int(image_channels) + int(latent_channels)
    raise ValueError(f"Unknown condition mode {mode!r}; choose one of {', '.join(CONDITION_MODES)}.")


def _resample(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Area average for integer downsampling, else (bi/tri)linear with half-pixel centres (align_corners=False)."""
    in_size = tuple(x.shape[2:])
    if in_size == size:
        return x
    if all(i >= o and i % o == 0 for i, o in zip(in_size, size, strict=True)):
        return F.interpolate(x, size=size, mode="area")
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def latent_condition(
    lr_on_hr_grid: torch.Tensor,
    latent_shape: Sequence[int],
    vae: AutoencoderKLModel | None = None,
    mode: ConditionMode = "resample",
) -> torch.Tensor:
    """Build the UNet condition on the latent grid from the LR image already brought onto the HR grid.

    Modes:

    * ``"resample"``: the image resampled to ``latent_shape`` (area average when every HR size is an integer
      multiple of the latent size, otherwise bilinear/trilinear with ``align_corners=False``).
    * ``"latent"``: ``vae.encode_latent(lr_on_hr_grid)``, the scaled posterior mean (needs ``C == vae``'s
      ``in_channels``). Gradients flow through the VAE; call under ``torch.no_grad()`` when it is frozen.
    * ``"both"``: ``cat([resample, latent], dim=1)``.

    Args:
        lr_on_hr_grid: LR image on the HR grid, ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        latent_shape: latent spatial shape ``(h, w)`` / ``(d, h, w)`` (a full ``(B, C, *S)`` shape is accepted too;
            only its spatial part is used).
        vae: the autoencoder, needed for ``"latent"`` and ``"both"``.
        mode: ``"resample"``, ``"latent"`` or ``"both"``.

    Returns:
        The condition ``(B, condition_channels(mode, C, latent_channels), *latent_shape)``.
    """
    if mode not in CONDITION_MODES:
        raise ValueError(f"Unknown condition mode {mode!r}; choose one of {', '.join(CONDITION_MODES)}.")
    x = lr_on_hr_grid
    n_spatial = x.ndim - 2
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) == x.ndim:
        shape = shape[2:]
    if n_spatial not in (1, 2, 3) or len(shape) != n_spatial or any(s < 1 for s in shape):
        raise ValueError(
            f"latent_condition expects lr_on_hr_grid (B, C, *S) with 1-3 spatial axes and a latent_shape with as "
            f"many positive entries; got {_shape_str(x.shape)} and {_shape_str(latent_shape)}."
        )
    parts = []
    if mode in ("resample", "both"):
        parts.append(_resample(x, shape))
    if mode in ("latent", "both"):
        if vae is None:
            raise ValueError(f"latent_condition mode {mode!r} needs the autoencoder (vae=...).")
        z = vae.encode_latent(x)
        if tuple(z.shape[2:]) != shape:
            raise ValueError(
                f"The autoencoder maps {_shape_str(x.shape[2:])} to {_shape_str(z.shape[2:])}, not to the latent "
                f"shape {_shape_str(shape)}."
            )
        parts.append(z.to(dtype=x.dtype) if mode == "both" else z)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def set_sdpa_attention(model: torch.nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI attention block in ``model`` to torch's ``scaled_dot_product_attention`` (or back to the
    explicit attention matrix). The weights are the same either way; SDPA never materialises the attention matrix,
    which is what bounds memory on large tiles.

    Returns:
        The number of attention blocks switched.
    """
    from monai.networks.blocks import CrossAttentionBlock, SABlock

    blocks = [m for m in model.modules() if isinstance(m, SABlock | CrossAttentionBlock)]
    for block in blocks:
        block.use_flash_attention = enabled
    return len(blocks)
