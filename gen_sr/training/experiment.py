"""The experiment config: one typed dataclass tree shared by both training scripts.

One YAML file describes a whole experiment (data, both networks, the noise schedule, and the two training stages);
``train_autoencoder`` reads ``autoencoder_training`` and ``train_diffusion`` reads ``diffusion_training``. Values come
from the defaults below, then the YAML file, then ``--a.b=value`` overrides; an unknown key or a wrong type is an
error naming it (see :mod:`gen_sr.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gen_sr.data import DataConfig
from gen_sr.model_card import DEFAULT_INFERENCE_STEPS, Holdout, ModelCard

__all__ = ["AutoencoderConfig", "ExperimentConfig", "NoiseScheduleConfig", "TrainConfig", "UNetConfig"]


@dataclass
class AutoencoderConfig:
    """The autoencoder: ``kind="kl"``, a learned KL autoencoder (:class:`gen_sr.models.AutoencoderKLModel`) and its
    loss (L1 + ``kl_weight`` KL, plus an optional patch-adversarial term and a perceptual term that is skipped, with
    one warning, when its pretrained weights are not available offline; see
    :class:`gen_sr.training.losses.AutoencoderLoss`); or ``kind="haar"``, the exact Haar wavelet transform of
    ``levels`` levels (:class:`gen_sr.models.HaarAutoencoder`), which needs no training (the autoencoder stage only
    measures each band's mean and std and exports it) and ignores the other fields."""

    kind: Literal["kl", "haar"] = "kl"
    levels: int = 1
    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 3
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 16
    use_flash_attention: bool = True
    kl_weight: float = 1e-6
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 0
    discriminator_layers: int = 3
    perceptual_weight: float = 0.0


@dataclass
class UNetConfig:
    """The conditional denoiser (:class:`gen_sr.models.ConditionalUNetModel`).

    ``condition``: ``"resample"`` (the LR image at latent resolution), ``"latent"`` (its encoded latent) or
    ``"both"``; see :func:`gen_sr.models.latent_condition`.

    ``objective``: ``"diffusion"``, or ``"regression"``: the same UNet trained as a deterministic baseline, always at
    the last timestep (its noise input carries no information about the image, so it learns to ignore it),
    predicting the clean latent with an L1 loss (needs ``noise_schedule.prediction_type=sample``). It exports as a
    pipeline that samples in one DDIM step ("trailing" timesteps, so that one step is the last timestep and lands
    exactly on the prediction); see :mod:`gen_sr.training.losses`.

    ``loss_levels``: on a Haar latent of more levels, weight each band's squared error as a latent of this many
    levels would (:meth:`gen_sr.models.HaarAutoencoder.band_loss_weights`): with 1 on a two-level latent the loss is
    the one-level model's, where the coarse band's children share their parent's scale instead of each being
    standardised. ``None``: every standardised band alike.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 16
    norm_num_groups: int = 16
    use_flash_attention: bool = True
    condition: Literal["resample", "latent", "both"] = "both"
    objective: Literal["diffusion", "regression"] = "diffusion"
    loss_levels: int | None = None


@dataclass
class NoiseScheduleConfig:
    """The diffusion noise schedule; it becomes the exported DDIM scheduler's config."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"


@dataclass
class TrainConfig:
    """One training stage. ``batch_size`` is per process; ``steps`` counts optimizer updates."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    lr_schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    lr_warmup_steps: int = 50
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    validate_every: int = 250
    val_batches: int = 2
    val_sampling_steps: int = 20
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "validate_every",
                     "log_every", "keep_checkpoints", "val_batches", "val_sampling_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class ExperimentConfig:
    """A whole experiment.

    Attributes:
        output_dir: run folder; each stage writes ``<output_dir>/<stage>/`` with ``checkpoints/``, ``logs/``,
            ``metrics.jsonl``, ``summary.json`` and the exported ``model/``.
        autoencoder_path: exported autoencoder for the diffusion stage; default
            ``<output_dir>/autoencoder/model``.
        unet_init: a model folder (or its ``unet/``) whose UNet weights the diffusion stage starts from, instead
            of new ones: to go on training a shipped model whose checkpoints are gone. Its architecture must be the
            one ``unet`` describes. ``--resume`` takes precedence (a checkpoint holds the weights).
    """

    output_dir: str = "runs/experiment"
    autoencoder_path: str | None = None
    unet_init: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise_schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    autoencoder_training: TrainConfig = field(default_factory=TrainConfig)
    diffusion_training: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.unet.objective == "regression" and self.noise_schedule.prediction_type != "sample":
            raise ValueError("unet.objective=regression predicts the clean latent: set "
                             "noise_schedule.prediction_type=sample")
        levels = self.unet.loss_levels
        if levels is not None and not (self.autoencoder.kind == "haar" and 1 <= levels < self.autoencoder.levels):
            raise ValueError(f"unet.loss_levels={levels} weights a Haar latent's bands as one of fewer levels: it "
                             f"needs autoencoder.kind=haar with more than {levels} levels")

    @property
    def spatial_dims(self) -> int:
        return self.data.spatial_dims

    def stage_dir(self, stage: str) -> Path:
        return Path(self.output_dir) / stage

    def model_card(self, in_plane_spacing: tuple[float, float] | None = None,
                   intensity_range: tuple[float, float] | None = None) -> ModelCard:
        """What a model trained with this experiment is trained for (``in_plane_spacing`` and ``intensity_range``:
        what the training volumes span, :func:`gen_sr.data.training_ranges`)."""
        d = self.data
        in_plane_spacing = d.in_plane_spacing or in_plane_spacing  # the resampled range, where items are resampled
        return ModelCard(trained_for=d.acquisition, in_plane_spacing=in_plane_spacing,
                         intensity_range=intensity_range, condition=d.condition, unet_condition=self.unet.condition,
                         normalize_percentiles=d.normalize_percentiles,
                         holdout=Holdout(d.holdout_axis, d.holdout_fraction, d.calibration_fraction),
                         objective=self.unet.objective,
                         num_inference_steps=1 if self.unet.objective == "regression" else DEFAULT_INFERENCE_STEPS,
                         trained_on=list(d.paths) or ["mni152"])

    def vae_dir(self) -> Path:
        return Path(self.autoencoder_path) if self.autoencoder_path else self.stage_dir("autoencoder") / "model"
