"""Where a latent diffusion model's clean-sample prediction is wrong, band by band: a training diagnostic.

    python benchmarks/band_errors.py --config configs/heads2d_haar2.yaml \\
        --model runs/heads2d_haar2_l1/diffusion/model [--timesteps 999 800 500 200 50] [--batch-size 16]

One batch of the config's validation crops (its held-out slabs, never the test head) is encoded; each timestep's
noised latent (fixed noise) goes through the UNet, and the predicted clean latent is compared with the true one.
Printed: the RMS error, in the latent's standardised units, of the first band (the coarse, LL band of a Haar latent)
and the mean over the other bands, at each timestep; and the same for the encoded condition (the interpolated LR),
which is what a model that only copied its condition would reach. A model that has learned the coarse band beats
the condition there at every timestep.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMScheduler

from gen_sr.config import load_config
from gen_sr.data import SRPairDataset, load_training_volumes
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.training.experiment import ExperimentConfig
from gen_sr.training.latents import encode_pair


def band_rms(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """RMS error per channel of ``(B, C, *S)`` latents: ``(C,)``."""
    dims = (0, *range(2, truth.ndim))
    return (estimate - truth).pow(2).mean(dim=dims).sqrt()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training config (its data and held-out region)")
    parser.add_argument("--model", required=True, help="an exported model folder")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 800, 500, 200, 50])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config(ExperimentConfig, args.config)
    dataset = SRPairDataset(load_training_volumes(cfg.data), cfg.data, "val", length=args.batch_size, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)))
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    z0, cond = encode_pair(pipe.vae, batch["hr"], batch["lr"], cfg.unet.condition)
    copied = band_rms(pipe.vae.encode_latent(batch["lr"]), z0)
    print(f"{args.model}: {z0.shape[1]} latent bands; the condition alone: first band {copied[0]:.3f}, "
          f"others {copied[1:].mean():.3f}")
    print("| timestep | first band | other bands |\n| --- | --- | --- |")
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)  # its step gives the clean prediction at any timestep
    ddim.set_timesteps(ddim.config.num_train_timesteps)
    for step in args.timesteps:
        t = torch.full((z0.shape[0],), step)
        zt = ddim.add_noise(z0, noise, t)
        x0 = ddim.step(pipe.unet(zt, t, cond), step, zt).pred_original_sample
        err = band_rms(x0, z0)
        print(f"| {step} | {err[0]:.3f} | {err[1:].mean():.3f} |")


if __name__ == "__main__":
    main()
