"""Per-scan self-supervised adaptation: fine-tune a pretrained model on the scan's own in-plane slices.

A thick-slice scan is high-resolution in-plane. Degrading an in-plane axis with the scan's own slices (thickness,
spacing, profile) makes training pairs whose truth is known, as SMORE and ECLARE do; here they fine-tune the
diffusion UNet of a pretrained model (the autoencoder stays frozen), with the project's training code (EMA,
checkpoints, progress bar, seeded, resumable, under ``accelerate launch`` too).

    pipe = LatentDiffusionSRPipeline.from_pretrained("models/heads2d")
    adapted = adapt(pipe, "lr.nii.gz", work_dir="runs/adapt_lr")      # a pipeline with the fine-tuned UNet
    adapted.save_pretrained("models/heads2d_lr")

Every ``holdout_every``-th in-plane slice is kept out of the fine-tuning (``ModelCard.adapted.held_out_slices``):
its held-out loss is measured before and after, and :mod:`gen_sr.eval.scan_calibration` calibrates the adapted
model on those slices. Held-out slices are spread over the whole scan, so that they represent all of it; training
items are single slices, so the slices are reordered (training slices first) and the held-out ones form the far slab
of :func:`gen_sr.data.slab_bounds` without any other change to the training data code.

Noise: the pairs' truth holds the scan's own noise, and the simulated slices average it down, below what the real
thick slices hold. ``noise_std`` can top each simulated slice up with the rest, so that its noise totals the scan's
per-voxel std (a value, or ``None``: estimated from the scan by :func:`gen_sr.physics.estimate_noise_std`); on a
validation subject at SNR 30 that top-up lost 0.08 dB against none (``benchmarks/ADAPTATION.md``). With ``recorrupt``
the pairs are recorrupted with it instead (:func:`gen_sr.data.recorrupt`): the truth's noise is then independent of the
simulated slices' and cannot be learned from them. With the true std that gained 0.34 dB over plain pairs on six
validation scans at SNR 30 (0.9 dB on the two smooth MNI152 subjects), and
:func:`gen_sr.training.scan_fit.fit_to_scan` does it wherever the scan's noise std is known (given, or by default
read from its air). ``adapt`` itself adds no noise by default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from gen_sr.contrast import ContrastRanges
from gen_sr.data import DataConfig, TrainingVolume
from gen_sr.errors import InputError
from gen_sr.io import atomic_write
from gen_sr.model_card import AcquisitionRanges, Adaptation, ModelCard
from gen_sr.physics import SliceAcquisition, SliceProfile, estimate_noise_std
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.pipelines.pipeline_latent_sr import LRInput
from gen_sr.training.adaptation_defaults import BATCH_SIZE, HOLDOUT_EVERY, LEARNING_RATE, STEPS, WEIGHT_MIX
from gen_sr.training.common import finish, make_loaders, start_run
from gen_sr.training.experiment import ExperimentConfig, TrainConfig, UNetConfig
from gen_sr.training.latents import latent_noise_std
from gen_sr.training.noisy_targets import noisy_target_min_timestep
from gen_sr.training.train_diffusion import fit_denoiser
from gen_sr.training.validation import validate_diffusion
from gen_sr.volume import Volume

__all__ = ["AdaptationConfig", "ScanSlices", "adapt", "adaptation_data", "held_out_slices", "interpolate_weights",
           "mixed_with_pretrained", "scan_latent_noise_std", "scan_slices", "with_unet"]

STAGE = "adaptation"
"""The stage folder under ``work_dir``: ``checkpoints/``, ``logs/``, ``metrics.jsonl``, ``config.yaml``."""


def _default_train() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                       lr_schedule="constant_with_warmup", lr_warmup_steps=10, ema_decay=0.99, checkpoint_every=50,
                       validate_every=1_000_000, val_batches=2, val_sampling_steps=10, log_every=10)


@dataclass
class AdaptationConfig:
    """How to fine-tune on one scan.

    Attributes:
        train: the fine-tuning (steps, batch size, learning rate, EMA, checkpoints, seed); validation runs at the
            end only, on the held-out slices.
        crop_size: in-plane crops ``(H, W)`` (the degraded axis runs along W); multiples of the model's
            ``tile_multiple``. Smaller slices are zero-padded.
        holdout_every: every k-th in-plane slice, from the ``k // 2``-th on, is kept out of the fine-tuning.
        min_foreground: as :class:`gen_sr.data.DataConfig`'s.
        fine_tune: ``False`` keeps the pretrained UNet as it is: the held-out slices are then only the per-scan
            calibration's (``gen-sr fit --steps 0``). At SNR 30 the pretrained model's mean was better than the
            fine-tuned one's on three validation subjects and on Colin27 (``benchmarks/ADAPTATION.md``).
        weight_mix: the share of the fine-tuned weights in the adapted UNet, the rest the pretrained ones
            (:func:`mixed_with_pretrained`; WiSE-FT, Wortsman et al., CVPR 2022): 1 keeps the fine-tuned UNet, 0 the
            pretrained one. Meant for the shift from the in-plane problems the fine-tuning sees to the through-plane
            one; default 1, since on validation scans the mix's through-plane PSNR lay on the line between its two
            ends (``benchmarks/ADAPTATION.md``, "Round 5").
    """

    train: TrainConfig = field(default_factory=_default_train)
    crop_size: tuple[int, int] = (64, 64)
    holdout_every: int = HOLDOUT_EVERY
    min_foreground: float = 0.2
    fine_tune: bool = True
    weight_mix: float = WEIGHT_MIX

    def __post_init__(self) -> None:
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be at least 2, got {self.holdout_every}")
        if not 0.0 <= self.weight_mix <= 1.0:
            raise ValueError(f"weight_mix must lie in [0, 1], got {self.weight_mix}")


@dataclass(frozen=True)
class ScanSlices:
    """The scan's thick slices: its coarse RAS+ ``axis``, slice ``thickness`` and centre-to-centre ``spacing`` in mm,
    and ``profile``."""

    axis: int
    thickness: float
    spacing: float
    profile: SliceProfile


def scan_slices(pipe: LatentDiffusionSRPipeline, canon: Volume, *, slice_profile: SliceProfile | None = None,
                slice_thickness: float | None = None) -> ScanSlices:
    """The thick slices of an LR scan in RAS+ as the pipeline would model them (its coarse axis, the given profile
    and thickness, else those its JSON sidecar records, else the defaults: ``pipe.resolved_slices``; the spacing of
    the file). Adaptation needs in-plane slices: an input with two coarse axes has
    none, and is refused."""
    axes = pipe.input_axes(canon)
    if len(axes) != 1:
        raise InputError(f"has two coarse axes (spacing {' x '.join(f'{s:.3g}' for s in canon.spacing)} mm): "
                         "adaptation learns from high-resolution in-plane slices, which it does not have",
                         canon.source, "super-resolve it without --adapt")
    operator = pipe.operator_for(canon, slice_profile=slice_profile, slice_thickness=slice_thickness)
    t = next(t for t in operator.transforms if isinstance(t, SliceAcquisition) and t.axis == axes[0])
    return ScanSlices(axes[0], float(t.thickness), float(t.slice_spacing), t.profile)


def held_out_slices(n: int, every: int) -> list[int]:
    """Every ``every``-th of ``n`` in-plane slices, from the ``every // 2``-th on; at least one is left to train on."""
    held = list(range(every // 2, n, every))
    if n < 2 or not held or len(held) == n:
        raise InputError(f"has {n} slice(s) along its coarse axis: adaptation needs some to train on and some to hold "
                         "out")
    return held


def adaptation_data(pipe: LatentDiffusionSRPipeline, canon: Volume, slices: ScanSlices, cfg: AdaptationConfig,
                    noise_std: float = 0.0, recorrupt: bool = False) -> tuple[DataConfig, TrainingVolume, list[int]]:
    """The training data of an adaptation: the data config, the scan as a training volume (normalised as the
    pipeline normalises it, its slices along ``slices.axis`` reordered so that the held-out ones come last), and the
    held-out slice indices (in the scan's RAS+ order). ``noise_std``: the scan's per-voxel noise std in its own
    units, which the simulated slices are brought up to (``DataConfig.item_noise_std``), or, with ``recorrupt``, with
    which the pairs are recorrupted (``DataConfig.recorrupt``)."""
    card, n = pipe.model_card, canon.shape[slices.axis]
    held = held_out_slices(n, cfg.holdout_every)
    order = [i for i in range(n) if i not in set(held)] + held
    norm = pipe.intensity_normalization(canon.data)
    data = np.take(norm(canon.data), order, axis=slices.axis)
    in_plane = [a for a in range(3) if a != slices.axis]
    gap = slices.spacing / slices.thickness - 1.0
    acquisition = AcquisitionRanges(axis=in_plane[0], any_axis=True, thickness=(slices.thickness,) * 2,
                                    gap=(gap, gap), profiles=[slices.profile], snr=None)  # type: ignore[list-item]
    data_cfg = DataConfig(paths=[canon.source or "<array>"], crop_size=tuple(cfg.crop_size),
                          slice_normals=[slices.axis], holdout_axis=slices.axis, holdout_fraction=len(held) / n,
                          normalize_percentiles=card.normalize_percentiles, condition=card.condition,
                          min_foreground=cfg.min_foreground, acquisition=acquisition,
                          contrast=ContrastRanges(), in_plane_spacing=None, item_noise_std=noise_std / norm.scale,
                          recorrupt=recorrupt)
    return data_cfg, TrainingVolume(data.astype(np.float32), canon.spacing), held


def adapt(
    pipe: LatentDiffusionSRPipeline,
    lr: LRInput,
    *,
    work_dir: str | Path,
    config: AdaptationConfig | None = None,
    slice_profile: SliceProfile | None = None,
    slice_thickness: float | None = None,
    noise_std: float | None = 0.0,
    target_noise_std: float | None = 0.0,
    recorrupt: bool = False,
    resume: str | None = None,
    volume_index: int | None = None,
) -> LatentDiffusionSRPipeline:
    """Fine-tune ``pipe``'s UNet on the in-plane slices of the LR scan ``lr``; ``pipe`` itself is not changed.

    Args:
        pipe: the pretrained model (diffusion or regression).
        lr: the scan, as the pipeline takes it (a NIfTI path, a :class:`~gen_sr.volume.Volume`, ...).
        work_dir: the run folder: ``<work_dir>/adaptation/`` holds checkpoints, logs and ``metrics.jsonl``.
        config: steps, batch size, crops, held-out slices (:class:`AdaptationConfig`).
        slice_profile, slice_thickness: the scan's slices, as for the pipeline call.
        noise_std: bring the simulated slices' noise up to this std per voxel, in the scan's units (0, the default:
            no top-up; ``None``: estimated from the scan).
        target_noise_std: the std per voxel of the noise that the pairs' truth, the scan's own slices, holds, in the
            scan's units (``None``: estimated from the scan; 0: taken as clean). The fine-tuning then treats it as
            part of the diffusion noise and learns the clean image's expectation, not the noisy slices'
            (:func:`gen_sr.training.noisy_targets.noisy_target_pair`); without it a diffusion model learns to draw the
            scan's noise. Off by default: it trains only the timesteps where that noise is at most half the
            diffusion's, the network drifts below them, and on three validation subjects at SNR 30 it lost 0.12 dB
            on average (``benchmarks/ADAPTATION.md``).
        recorrupt: with ``noise_std`` (given or estimated), pose each pair with noise independent of its truth's
            instead of topping it up (:func:`gen_sr.data.recorrupt`): the pairs' truth, the scan's own noisy slices,
            then holds nothing the model can predict from the simulated thick slices but the clean image.
        resume: ``"latest"`` or a checkpoint folder, to go on with an interrupted adaptation.
        volume_index: which volume of a 4D series.

    Returns:
        A pipeline with the fine-tuned (EMA) UNet (the pretrained one with ``config.fine_tune=False``), the same
        autoencoder and scheduler, and a model card whose
        ``adapted`` record says what was done (save it with ``save_pretrained``). It has no calibration:
        :func:`gen_sr.eval.scan_calibration.calibrate_on_scan` makes the per-scan one.
    """
    tic = time.perf_counter()
    cfg = config or AdaptationConfig()
    volume = pipe.as_volume(lr, volume_index=volume_index)
    canon = volume.canonical()
    slices = scan_slices(pipe, canon, slice_profile=slice_profile, slice_thickness=slice_thickness)
    if any(c % pipe.tile_multiple for c in cfg.crop_size):
        raise ValueError(f"crop_size {cfg.crop_size} must be multiples of the model's tile multiple "
                         f"{pipe.tile_multiple}")
    if not cfg.fine_tune:  # the pretrained UNet as it is: no pairs are trained on, so no noise to model
        noise_std, target_noise_std, recorrupt = 0.0, 0.0, False
    if recorrupt and noise_std == 0:
        raise ValueError("recorrupting the pairs needs the scan's noise std (noise_std given or None: estimated)")
    estimated, target_estimated = noise_std is None, target_noise_std is None
    scan_noise = estimate_noise_std(canon.data, slices.axis) if estimated or target_estimated else 0.0
    noise_std = scan_noise if estimated else float(noise_std)  # type: ignore[arg-type]
    target_noise_std = scan_noise if target_estimated else float(target_noise_std)  # type: ignore[arg-type]
    data_cfg, training_volume, held = adaptation_data(pipe, canon, slices, cfg, noise_std, recorrupt)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    latent_noise, min_timestep = None, 0
    if target_noise_std > 0:  # measured on the training slices only
        trained = np.take(training_volume.data, range(canon.shape[slices.axis] - len(held)), axis=slices.axis)
        latent_noise = scan_latent_noise_std(pipe, trained, slices.axis,
                                             target_noise_std / pipe.intensity_normalization(canon.data).scale,
                                             cfg.train.seed)
        min_timestep = noisy_target_min_timestep(noise_scheduler, latent_noise)
    if cfg.fine_tune:
        unet, losses = _fine_tune(pipe, cfg, work_dir, data_cfg, training_volume, noise_scheduler, latent_noise, resume)
    else:  # the held-out slices are only the per-scan calibration's
        unet, losses = copy.deepcopy(pipe.unet).eval().requires_grad_(False), {}
    record = Adaptation(source=str(canon.source or "<array>"), lr_shape=canon.shape, lr_digest=canon.digest(),
                        axis=slices.axis,
                        slice_thickness=slices.thickness, slice_spacing=slices.spacing,
                        profile=slices.profile,  # type: ignore[arg-type]
                        held_out_slices=held, steps=cfg.train.steps if cfg.fine_tune else 0,
                        batch_size=cfg.train.batch_size,
                        learning_rate=cfg.train.learning_rate, noise_std=noise_std, noise_estimated=estimated,
                        recorrupted=recorrupt,
                        target_noise_std=target_noise_std, target_noise_estimated=target_estimated,
                        min_timestep=min_timestep, seconds=time.perf_counter() - tic, **losses)
    adapted = with_unet(pipe, unet, dataclasses.replace(pipe.model_card, adapted=record))
    return mixed_with_pretrained(pipe, adapted, cfg.weight_mix) if cfg.fine_tune else adapted


def mixed_with_pretrained(pipe: LatentDiffusionSRPipeline, adapted: LatentDiffusionSRPipeline,
                          weight: float) -> LatentDiffusionSRPipeline:
    """``adapted`` (fine-tuned from ``pipe``) with its UNet's weights mixed with ``pipe``'s
    (:func:`interpolate_weights`) and its card's ``adapted.weight_mix`` set to ``weight``; ``adapted`` itself where
    ``weight`` is 1."""
    if weight == 1.0:
        return adapted
    card = adapted.model_card
    record = dataclasses.replace(card.adapted, weight_mix=weight)
    return with_unet(adapted, interpolate_weights(pipe.unet, adapted.unet, weight),
                     dataclasses.replace(card, adapted=record))


def with_unet(pipe: LatentDiffusionSRPipeline, unet: Any, model_card: ModelCard) -> LatentDiffusionSRPipeline:
    """A pipeline with ``pipe``'s autoencoder, a copy of its scheduler and its progress-bar settings, on its device,
    holding ``unet`` and ``model_card``."""
    out = LatentDiffusionSRPipeline(vae=pipe.vae, unet=unet, scheduler=copy.deepcopy(pipe.scheduler),
                                    model_card=model_card)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out.to(pipe.device)


def interpolate_weights(pretrained: torch.nn.Module, fine_tuned: torch.nn.Module, weight: float) -> torch.nn.Module:
    """A copy of ``fine_tuned`` whose floating-point parameters and buffers are ``(1 - weight) * pretrained + weight *
    fine_tuned`` (a weight-space ensemble of a model and its fine-tuning, WiSE-FT); ``weight`` 1 returns
    ``fine_tuned`` itself. The two must share their architecture."""
    if weight == 1.0:
        return fine_tuned
    start = pretrained.state_dict()
    mixed = {name: torch.lerp(start[name].to(value), value, weight) if value.is_floating_point() else value
             for name, value in fine_tuned.state_dict().items()}
    out = copy.deepcopy(fine_tuned)
    out.load_state_dict(mixed)
    return out


def _fine_tune(pipe: LatentDiffusionSRPipeline, cfg: AdaptationConfig, work_dir: str | Path, data_cfg: DataConfig,
               training_volume: TrainingVolume, noise_scheduler: Any, latent_noise: torch.Tensor | None,
               resume: str | None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of ``pipe``'s UNet on the scan's pairs (:func:`~gen_sr.training.train_diffusion.fit_denoiser`
    in ``<work_dir>/adaptation``); returns the EMA UNet and the logged losses (:class:`Adaptation`'s)."""
    card = pipe.model_card
    experiment = ExperimentConfig(output_dir=str(work_dir), data=data_cfg, diffusion_training=cfg.train,
                                  unet=UNetConfig(condition=card.unet_condition, objective=card.objective))
    run = start_run(experiment, STAGE, cfg.train)
    train_loader, val_loader = make_loaders(run, [training_volume])
    unet = copy.deepcopy(pipe.unet).float()
    if resume is None and run.accelerator.is_main_process:  # the pretrained model's held-out loss, as step 0
        before = validate_diffusion(unet, pipe.vae, noise_scheduler, val_loader, condition=card.unet_condition,
                                    sampling_steps=cfg.train.val_sampling_steps, seed=cfg.train.seed,
                                    device=run.accelerator.device, objective=card.objective)
        line = json.dumps({"step": 0, **before}) + "\n"
        atomic_write(run.metrics_path, lambda tmp: tmp.write_text(line))
    unet, ema = fit_denoiser(run, unet, pipe.vae, noise_scheduler, train_loader, val_loader, resume, latent_noise)
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    finish(run, unet)
    return unet, _logged_losses(run.metrics_path)


def scan_latent_noise_std(pipe: LatentDiffusionSRPipeline, data: np.ndarray, axis: int, noise_std: float,
                          seed: int = 0) -> torch.Tensor:
    """``(C,)``: the std per latent channel of white noise of ``noise_std`` per voxel (normalised units) on four
    in-plane slices across RAS+ ``axis`` of the normalised scan ``data`` (the adaptation gives its training slices
    only; :func:`~gen_sr.training.latents.latent_noise_std`, exact for the Haar autoencoder)."""
    f = pipe.tile_multiple
    x = np.moveaxis(data, axis, 0)
    x = x[np.linspace(0, len(x) - 1, 4).round().astype(int), : x.shape[1] // f * f, : x.shape[2] // f * f]
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None].to(pipe.device, pipe.vae.dtype)
    return latent_noise_std(pipe.vae, images, noise_std, torch.Generator().manual_seed(seed)).cpu()


def _logged_losses(metrics: Path) -> dict[str, Any]:
    """``train_loss`` (first, last) and ``heldout_loss`` (step 0, last) from a run's ``metrics.jsonl`` (main
    process; the other processes have no log and record ``None``)."""
    if not metrics.is_file():
        return {"train_loss": None, "heldout_loss": None}
    entries = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [e["loss"] for e in entries if "loss" in e]
    val = [e["val/loss"] for e in entries if "val/loss" in e]
    return {"train_loss": _ends(train), "heldout_loss": _ends(val)}


def _ends(values: Sequence[float]) -> tuple[float, float] | None:
    return (float(values[0]), float(values[-1])) if len(values) >= 2 else None
