"""Train the conditional latent diffusion UNet on top of a trained autoencoder.

    accelerate launch -m gen_sr.training.train_diffusion --config configs/tiny.yaml \\
        [--a.b=value ...] [--resume latest]

Reads the ``data``, ``unet``, ``noise_schedule`` and ``diffusion_training`` sections; the autoencoder comes from
``autoencoder_path`` (default ``<output_dir>/autoencoder/model``) and stays frozen. The UNet starts new, or from the
weights of ``unet_init`` (a model folder: to go on training a shipped model). Keeps an EMA of the UNet weights,
validates and exports with them. Writes ``<output_dir>/diffusion/`` like the autoencoder stage; the exported
``model/`` is a pipeline folder: ``LatentDiffusionSRPipeline.from_pretrained(".../model")`` or
``gen-sr super-resolve --model .../model``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from gen_sr import models
from gen_sr.config import config_to_dict
from gen_sr.data import load_training_volumes, training_ranges
from gen_sr.errors import InputError
from gen_sr.models import Autoencoder, ConditionalUNetModel, condition_channels
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.schedulers import DDIMDataConsistencyScheduler
from gen_sr.training.common import (
    Run,
    backward_and_step,
    export_model,
    finish,
    make_loaders,
    make_optimizer,
    run_script,
    start_run,
    train_loop,
)
from gen_sr.training.ema import create_ema, ema_weights
from gen_sr.training.experiment import ExperimentConfig
from gen_sr.training.latents import encode_pair
from gen_sr.training.losses import diffusion_target, objective_loss, sampling_overrides, training_timesteps
from gen_sr.training.noisy_targets import noisy_target_min_timestep, noisy_target_pair
from gen_sr.training.validation import validate_diffusion


def load_autoencoder(cfg: ExperimentConfig) -> Autoencoder:
    path = cfg.vae_dir()
    vae = models.load_autoencoder(path)
    if vae.config.spatial_dims != cfg.spatial_dims:
        raise InputError(f"the autoencoder is {vae.config.spatial_dims}D but data.crop_size is "
                         f"{cfg.spatial_dims}D", path)
    return vae.eval().requires_grad_(False)


def unet_kwargs(cfg: ExperimentConfig, vae: Autoencoder) -> dict[str, Any]:
    """The :class:`ConditionalUNetModel` constructor arguments (its config) of the ``unet`` section over ``vae``."""
    u, latent = cfg.unet, vae.config.latent_channels
    return dict(
        spatial_dims=cfg.spatial_dims, latent_channels=latent,
        condition_channels=condition_channels(u.condition, 1, latent), channels=u.channels,
        attention_levels=u.attention_levels, num_res_blocks=u.num_res_blocks, num_head_channels=u.num_head_channels,
        norm_num_groups=u.norm_num_groups, num_noise_levels=None, use_flash_attention=u.use_flash_attention,
    )


def build_unet(cfg: ExperimentConfig, vae: Autoencoder) -> ConditionalUNetModel:
    return ConditionalUNetModel(**unet_kwargs(cfg, vae))


def check_unet_init(path: str | Path, expected: dict[str, Any]) -> Path:
    """The folder of the UNet that ``unet_init`` names (a model folder's ``unet/``, or that folder itself), checked to
    hold a saved UNet with the config ``expected`` (:func:`unet_kwargs`); read before anything is written.

    Raises:
        InputError: no saved UNet there, or one of another architecture.
    """
    folder = Path(path) / "unet" if (Path(path) / "unet").is_dir() else Path(path)
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, ValueError):
        raise InputError("holds no saved UNet (unet/config.json)", path, "give a model folder as unet_init") from None
    expected = json.loads(json.dumps(expected))  # tuples as lists, as the saved config has them
    differ = sorted(k for k, v in expected.items() if saved.get(k) != v)
    if differ:
        raise InputError(f"holds a UNet of another architecture ({', '.join(differ)} differ from the config's unet "
                         "section)", path, "set the unet section to the saved one, or drop unet_init")
    return folder


def train(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    vae = load_autoencoder(cfg)
    init = check_unet_init(cfg.unet_init, unet_kwargs(cfg, vae)) if cfg.unet_init else None
    volumes = load_training_volumes(cfg.data)
    run = start_run(cfg, "diffusion", cfg.diffusion_training)
    train_loader, val_loader = make_loaders(run, volumes)
    unet = build_unet(cfg, vae)
    if init is not None:
        unet.load_state_dict(ConditionalUNetModel.from_pretrained(init).state_dict())
    noise_scheduler = DDPMScheduler(**config_to_dict(cfg.noise_schedule), clip_sample=False)
    unet, ema = fit_denoiser(run, unet, vae, noise_scheduler, train_loader, val_loader, args.resume)
    export(run, unet, ema, vae, noise_scheduler, training_ranges(volumes, cfg.data.acquisition.axis))
    finish(run, unet, {"parameters": unet.num_parameters()})


def fit_denoiser(run: Run, unet: ConditionalUNetModel, vae: Autoencoder, noise_scheduler: Any,
                 train_loader: torch.utils.data.DataLoader, val_loader: torch.utils.data.DataLoader,
                 resume: str | None = None,
                 target_noise_std: torch.Tensor | None = None) -> tuple[ConditionalUNetModel, Any]:
    """Train ``unet`` (from its current weights: new, or a pretrained model's) on the pairs of ``train_loader``
    with the frozen ``vae``: the run's optimizer, schedule and EMA, under accelerate, checkpointed, resumable
    (``resume``: ``"latest"`` or a checkpoint folder), validated on ``val_loader`` with the EMA weights.

    ``target_noise_std`` ``(C,)``: the std per latent channel of Gaussian noise that the HR targets hold
    (:func:`gen_sr.training.latents.latent_noise_std`); training then takes it as part of the diffusion noise, only
    at the timesteps where it is at most half of it (:func:`~gen_sr.training.noisy_targets.noisy_target_pair`).

    Returns:
        The unwrapped UNet (its last weights, not the EMA's) and the EMA (:func:`gen_sr.training.ema.ema_weights`).
    """
    acc, tc, objective = run.accelerator, run.train, run.cfg.unet.objective
    vae.to(acc.device).eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    ema = create_ema(unet, decay=tc.ema_decay)
    optimizer, schedule = make_optimizer(unet.parameters(), run)
    unet, optimizer, schedule, train_loader = acc.prepare(unet, optimizer, schedule, train_loader)
    acc.register_for_checkpointing(ema)
    acc.print(f"unet: {acc.unwrap_model(unet).num_parameters():,} parameters, {acc.num_processes} process(es)")
    start = run.checkpoints.resume(resume)
    ema.to(acc.device)  # load_state puts it on the CPU
    levels = run.cfg.unet.loss_levels
    channel_weights = None if levels is None else vae.band_loss_weights(levels).to(acc.device)
    min_timestep = 0 if target_noise_std is None else noisy_target_min_timestep(noise_scheduler, target_noise_std)

    def train_step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        z0, cond = encode_pair(vae, batch["hr"], batch["lr"], run.cfg.unet.condition)
        noise = torch.randn_like(z0)
        t = training_timesteps(objective, noise_scheduler.config.num_train_timesteps, z0.shape[0], z0.device,
                               min_timestep=min_timestep)
        if target_noise_std is None:
            noisy, target = noise_scheduler.add_noise(z0, noise, t), diffusion_target(noise_scheduler, z0, noise, t)
        else:
            noisy, target = noisy_target_pair(noise_scheduler, z0, noise, t, target_noise_std)
        pred = unet(noisy, t, cond)
        loss = objective_loss(objective, pred, target, channel_weights)
        backward_and_step(run, loss, unet, optimizer, schedule)
        if acc.sync_gradients:
            ema.step(unet.parameters())
        return {"loss": float(loss.detach()), "lr": schedule.get_last_lr()[0]}

    def validate() -> dict[str, float]:
        model = acc.unwrap_model(unet)
        with ema_weights(ema, model):
            return validate_diffusion(model, vae, noise_scheduler, val_loader, condition=run.cfg.unet.condition,
                                      sampling_steps=tc.val_sampling_steps, seed=tc.seed, device=acc.device,
                                      objective=objective)

    train_loop(run, unet, train_loader, start, train_step, validate)
    return acc.unwrap_model(unet), ema


def export(run: Any, unet: ConditionalUNetModel, ema: Any, vae: Autoencoder, noise_scheduler: Any,
           ranges: tuple[tuple[float, float], tuple[float, float]]) -> None:
    """Write ``model/``: a :class:`~gen_sr.pipelines.LatentDiffusionSRPipeline` folder with the EMA UNet, the VAE,
    a DDIM scheduler with the training schedule, and its model card (what it was trained for, with ``ranges``:
    :func:`gen_sr.data.training_ranges` of the training volumes; main process)."""

    def write(out: Path) -> str:
        card = run.cfg.model_card(*ranges)
        scheduler = DDIMDataConsistencyScheduler.from_config(noise_scheduler.config,
                                                             **sampling_overrides(run.cfg.unet.objective))
        with ema_weights(ema, unet):
            LatentDiffusionSRPipeline(vae=vae, unet=unet, scheduler=scheduler, model_card=card).save_pretrained(out)
        return ""

    export_model(run, write)


def main(argv: list[str] | None = None) -> int:
    return run_script(train, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
