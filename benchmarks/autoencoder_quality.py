"""How near-lossless an autoencoder is on a whole brain it never saw: encode and decode every k-th whole slice of
the held-out head in each of the three orientations, normalised as the pipeline normalises, and measure PSNR and
SSIM in the head's foreground (the autoencoder is the ceiling of every sample: its error is the same in all of them).

    python benchmarks/autoencoder_quality.py --run runs/heads2d [--checkpoint latest] [--brain colin27] [--every 4] \
        [--contrast t1|t2like]
    python benchmarks/autoencoder_quality.py --model models/heads2d/vae [--validation configs/heads2d.yaml]

The issue's target is 38 dB on the held-out brain's whole slices (the first demo model's learned autoencoder: 24.1 dB
on held-out crops of the template).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gen_sr import models
from gen_sr.config import load_config
from gen_sr.contrast import ContrastRanges
from gen_sr.data import SRPairDataset, load_training_volumes
from gen_sr.eval.cases import held_out_head
from gen_sr.eval.metrics import foreground, psnr, ssim_volume
from gen_sr.models import Autoencoder
from gen_sr.training.experiment import ExperimentConfig
from gen_sr.training.train_autoencoder import build_autoencoder
from gen_sr.volume import IntensityNormalization


def load_autoencoder(args: argparse.Namespace) -> tuple[Autoencoder, str]:
    """An exported autoencoder (``--model``), or one checkpoint of a run (``--run``, ``--checkpoint``)."""
    if args.model:
        return models.load_autoencoder(args.model).eval(), str(args.model)
    stage = Path(args.run) / "autoencoder"
    vae = build_autoencoder(load_config(ExperimentConfig, stage / "config.yaml"))
    found = sorted((int(m.group(1)), p) for p in (stage / "checkpoints").glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "model.safetensors").is_file())
    step, folder = found[-1] if args.checkpoint == "latest" else next(f for f in found if f[0] == int(args.checkpoint))
    vae.load_state_dict(load_file(folder / "model.safetensors"))
    return vae.eval(), f"{stage} step {step}"


@torch.no_grad()
def reconstruct(vae: Autoencoder, slices: np.ndarray, batch: int = 16) -> np.ndarray:
    """Encode and decode 2D slices ``(N, H, W)``, zero-padded up to the downsampling factor and cropped back."""
    f = vae.downsample_factor
    h, w = slices.shape[1:]
    pad = (0, -w % f, 0, -h % f)
    out = []
    for chunk in torch.from_numpy(slices).split(batch):
        x = F.pad(chunk[:, None].float(), pad)
        out.append(vae.decode_latent(vae.encode_latent(x))[:, 0, :h, :w].float().numpy())
    return np.concatenate(out)


def validation_by_contrast(vae: Autoencoder, config: str, items: int = 64) -> None:
    """PSNR on crops of the training heads' held-out slabs (``SRPairDataset`` split ``val``; never trained on),
    one contrast randomisation at a time: the figure design choices may use (the held-out head's may not)."""
    cfg = load_config(ExperimentConfig, config)
    volumes = load_training_volumes(cfg.data)
    print(f"\nvalidation: {items} crops of the held-out slabs of {list(cfg.data.paths)} ({config})\n")
    print("| contrast | PSNR over the crops (dB) |\n| --- | --- |")
    for label, contrast in (("own", ContrastRanges()), ("synthesised from tissue maps",
                                                         ContrastRanges(synthesis_probability=1.0)),
                            ("monotone remap", ContrastRanges(remap_probability=1.0, nonmonotone_fraction=0.0)),
                            ("non-monotone remap", ContrastRanges(remap_probability=1.0, nonmonotone_fraction=1.0))):
        data = SRPairDataset(volumes, dataclasses.replace(cfg.data, contrast=contrast), "val", length=items, seed=3)
        x = torch.stack([data[i]["hr"] for i in range(items)])
        with torch.no_grad():
            rec = torch.cat([vae.decode_latent(vae.encode_latent(c)) for c in x.split(16)])
        print(f"| {label} | {psnr(rec.numpy(), x.numpy(), data_range=1.0):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an exported autoencoder folder")
    source.add_argument("--run", help="a training run folder (its autoencoder/config.yaml and checkpoints)")
    parser.add_argument("--checkpoint", default="latest", help="with --run: a step, or latest (default)")
    parser.add_argument("--brain", default="colin27", help="the held-out head (default: colin27)")
    parser.add_argument("--every", type=int, default=4, help="every k-th slice of each orientation (default: 4)")
    parser.add_argument("--contrast", choices=("t1", "t2like"), default="t1",
                        help="t1 as scanned, or t2like: the brain's intensities inverted, skull removed (default: t1)")
    parser.add_argument("--validation", metavar="CONFIG",
                        help="also measure on the training heads' held-out slabs of this experiment config, per "
                             "contrast randomisation")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae, name = load_autoencoder(args)
    head, _ = held_out_head(args.brain, contrast=args.contrast)
    x = IntensityNormalization.fit(head.data)(head.data).astype(np.float32)
    mask = foreground(x)
    print(f"autoencoder {name}; held-out head {head.source} ({args.contrast}), {head.shape} voxels; every "
          f"{args.every}th slice\n")
    print("| orientation | slices | PSNR in the head (dB) | SSIM in the head |\n| --- | --- | --- | --- |")
    for normal, plane in enumerate(("sagittal", "coronal", "axial")):
        index = [i for i in range(0, x.shape[normal], args.every) if np.take(mask, i, axis=normal).any()]
        truth, m = np.moveaxis(x, normal, 0)[index], np.moveaxis(mask, normal, 0)[index]
        rec = reconstruct(vae, truth)
        ssim = np.nanmean([ssim_volume(r, t, k, 1.0) for r, t, k in zip(rec, truth, m, strict=True)])  # per 2D slice
        print(f"| {plane} | {len(index)} | {psnr(rec, truth, m, 1.0):.2f} | {ssim:.4f} |")
    if args.validation:
        validation_by_contrast(vae, args.validation)


if __name__ == "__main__":
    main()
