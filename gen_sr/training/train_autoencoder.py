"""Train the KL autoencoder of a latent diffusion SR model.

    accelerate launch -m gen_sr.training.train_autoencoder --config configs/tiny.yaml \\
        [--a.b=value ...] [--resume latest]

Reads the ``data``, ``autoencoder`` and ``autoencoder_training`` sections of the experiment config. Writes
``<output_dir>/autoencoder/``: ``checkpoints/``, ``logs/`` (tensorboard), ``metrics.jsonl``, ``summary.json``, and
the exported model (``model/``, diffusers layout, safetensors) with its measured latent scaling factor.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from gen_sr.data import load_training_volumes
from gen_sr.models import Autoencoder, AutoencoderKLModel, HaarAutoencoder
from gen_sr.training import common
from gen_sr.training.experiment import ExperimentConfig
from gen_sr.training.losses import AutoencoderLoss
from gen_sr.training.validation import validate_autoencoder


def build_autoencoder(cfg: ExperimentConfig) -> Autoencoder:
    a = cfg.autoencoder
    if a.kind == "haar":
        return HaarAutoencoder(spatial_dims=cfg.spatial_dims, in_channels=1, levels=a.levels)
    return AutoencoderKLModel(
        spatial_dims=cfg.spatial_dims, in_channels=1, out_channels=1, channels=a.channels,
        latent_channels=a.latent_channels, num_res_blocks=a.num_res_blocks, attention_levels=a.attention_levels,
        norm_num_groups=a.norm_num_groups, use_flash_attention=a.use_flash_attention,
    )


def train(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    volumes = load_training_volumes(cfg.data)
    run = common.start_run(cfg, "autoencoder", cfg.autoencoder_training)
    acc = run.accelerator
    train_loader, val_loader = common.make_loaders(run, volumes)
    vae = build_autoencoder(cfg)
    if cfg.autoencoder.kind == "haar":  # exact and fixed: nothing to train
        acc.print(f"autoencoder: the {cfg.autoencoder.levels}-level Haar wavelet transform (exact; not trained)")
        export(run, vae, val_loader)
        common.finish(run, vae, {"parameters": 0})
        return
    a = cfg.autoencoder
    loss_fn = AutoencoderLoss(
        spatial_dims=cfg.spatial_dims, kl_weight=a.kl_weight, adversarial_weight=a.adversarial_weight,
        adversarial_start_step=a.adversarial_start_step, disc_num_layers=a.discriminator_layers,
        perceptual_weight=a.perceptual_weight,
    ).to(acc.device)
    optimizer, schedule = common.make_optimizer(vae.parameters(), run)
    vae, optimizer, schedule, train_loader = acc.prepare(vae, optimizer, schedule, train_loader)
    disc = None
    if loss_fn.discriminator is not None:
        disc_optimizer, disc_schedule = common.make_optimizer(loss_fn.discriminator.parameters(), run)
        disc, disc_optimizer, disc_schedule = acc.prepare(loss_fn.discriminator, disc_optimizer, disc_schedule)
        loss_fn.discriminator = disc
    acc.print(f"autoencoder: {acc.unwrap_model(vae).num_parameters():,} parameters, {acc.num_processes} process(es)")
    start = run.checkpoints.resume(args.resume)
    step = {"n": start}

    def train_step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x = batch["hr"]
        recon, mu, sigma = vae(x)
        loss, logs = loss_fn.generator_loss(x, recon, mu, sigma, step["n"])
        common.backward_and_step(run, loss, vae, optimizer, schedule)
        if disc is not None and loss_fn.adversarial_active(step["n"]):
            disc_optimizer.zero_grad()  # the generator loss also filled the discriminator's gradients
            d_loss, d_logs = loss_fn.discriminator_loss(x, recon, step["n"])
            acc.backward(d_loss)
            disc_optimizer.step()
            disc_schedule.step()
            disc_optimizer.zero_grad()
            logs.update(d_logs)
        if acc.sync_gradients:
            step["n"] += 1
        return {**logs, "loss": float(loss.detach()), "lr": schedule.get_last_lr()[0]}

    def validate() -> dict[str, float]:
        return validate_autoencoder(acc.unwrap_model(vae), val_loader, acc.device)

    common.train_loop(run, vae, train_loader, start, train_step, validate)
    export(run, acc.unwrap_model(vae), val_loader)
    common.finish(run, vae, {"parameters": acc.unwrap_model(vae).num_parameters()})


def export(run: Any, vae: Autoencoder, loader: Any) -> None:
    """Measure how latents are scaled (:meth:`~gen_sr.models.LatentSpaceMixin.fit_latent_scaling`) and write
    ``model/`` (main process)."""

    def write(out: Path) -> str:
        vae.eval()
        scaling = vae.fit_latent_scaling(b["hr"].to(run.accelerator.device) for b in loader)
        vae.save_pretrained(out)
        return f" ({scaling})"

    common.export_model(run, write)


def main(argv: list[str] | None = None) -> int:
    return common.run_script(train, argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
