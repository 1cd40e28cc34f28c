"""Seconds for one network call over a fixed set of tiles, by batch size and memory layout (issue 16, item 2).

    python benchmarks/unet_call_speed.py [--model models/heads2d] [--tile 192 160] [--tiles 16] \\
        [--batches 16 8 4] [--rounds 7] [--device auto] [--output FILE.md]

The UNet of the model folder, as the pipeline loads it (channels-last for a 2D model), and a copy of it in the default
contiguous layout, denoise the same ``--tiles`` random latents of one whole slice (``--tile`` voxels; the default is a
sagittal slice of the 156 x 192 x 160 whole brain of ``whole_brain_speed.py``) in batches of each size. The
configurations are interleaved round by round, so that this machine's drift between minutes falls on all of them
alike; the table gives each one's median seconds and its ratio to the first configuration (contiguous, the first
batch size), and the largest difference of its output from that one's (float32 rounding: kernels differ with the
batch shape and layout).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from whole_brain_speed import load_pipeline, pick_device


def call(unet: torch.nn.Module, z: torch.Tensor, c: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
    """The network on all tiles of ``z`` ``(T, C, H, W)`` with conditions ``c``, ``batch`` tiles per call."""
    with torch.inference_mode():
        out = torch.cat([unet(a, t, b) for a, b in zip(z.split(batch), c.split(batch), strict=True)])
        if z.device.type == "cuda":
            torch.cuda.synchronize()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--tile", type=int, nargs="+", default=[192, 160], help="voxels of one tile")
    parser.add_argument("--tiles", type=int, default=16, help="tiles per timed run")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 8, 4])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    pipe = load_pipeline(args.model, device, torch.float32)
    contiguous = copy.deepcopy(pipe.unet).to(memory_format=torch.contiguous_format)
    unets = {"pipeline's layout": pipe.unet, "contiguous": contiguous}
    latent = [s // pipe.vae.downsample_factor for s in args.tile]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(args.tiles, pipe.vae.config.latent_channels, *latent, generator=gen).to(device)
    c = torch.randn(args.tiles, pipe.unet.config.condition_channels, *latent, generator=gen).to(device)
    t = torch.tensor(500, device=device)
    configs = [(layout, b) for layout in ("contiguous", "pipeline's layout") for b in args.batches]
    reference = call(unets[configs[0][0]], z, c, t, configs[0][1])
    diffs = {k: float((call(unets[k[0]], z, c, t, k[1]) - reference).abs().max()) for k in configs}  # also a warm-up
    times: dict[tuple[str, int], list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for k in configs:
            tic = time.perf_counter()
            call(unets[k[0]], z, c, t, k[1])
            times[k].append(time.perf_counter() - tic)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k[0]} {k[1]}: {v[-1]:.2f} s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    base = statistics.median(times[configs[0]])
    lines = [f"`python benchmarks/unet_call_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({datetime.date.today()}): {platform.machine()} {device.type}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; {args.tiles} tiles of {' x '.join(map(str, args.tile))} voxels (latent "
             f"{' x '.join(map(str, latent))}), {args.rounds} interleaved rounds.", "",
             "| layout | batch | median seconds | ratio | max difference of the output |",
             "| --- | --- | --- | --- | --- |"]
    for k in configs:
        median = statistics.median(times[k])
        lines.append(f"| {k[0]} | {k[1]} | {median:.2f} | {median / base:.3f} | {diffs[k]:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
