"""Wall time and peak memory of the super-resolution pipeline, against a plain hand-written sampling loop.

    python benchmarks/pipeline_speed.py --model models/heads2d [--steps 10] [--repeats 3] [--crop 96 112 96]

The input is the MNI152 template cropped to ``--crop`` voxels at 1 mm (default 96 x 112 x 96, from voxel 50, 60, 40)
and degraded to 4 mm slices. Each
configuration runs in a fresh subprocess (so peak RSS is its own), ``--repeats`` times; medians are reported.

* ``pipeline``: ``LatentDiffusionSRPipeline.__call__`` with N = 1, 4, 8 samples, with and without guidance.
* ``hand loop``: the same network, scheduler, steps, tiles and N, written as the shortest loop that does the same
  sampling (no guidance, no final projection, no uncertainty): the yardstick for the pipeline's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

START = (50, 60, 40)  # where the crop of the 1 mm template starts


def lr_volume(crop: tuple[int, int, int]):
    from gen_sr.physics import SliceAcquisition, simulate_acquisition
    from gen_sr.sample_data import load_mni152

    hr = load_mni152("t1")
    hr = hr.crop(list(START), [s + c for s, c in zip(START, crop, strict=True)])
    lr, _, _ = simulate_acquisition(hr, [SliceAcquisition(2, 4.0)])
    return lr


def hand_loop(pipe, lr, n: int, steps: int, batch_size: int) -> float:
    """The plain loop: condition, noise, DDIM steps over all tiles, decode, stitch."""
    from gen_sr.models import latent_condition
    from gen_sr.physics import operator_from_spacings
    from gen_sr.pipelines.tiling import SliceTiler
    from gen_sr.volume import IntensityNormalization

    tic = time.perf_counter()
    with torch.no_grad():
        canon = lr.canonical()
        norm = IntensityNormalization.fit(canon.data)
        op = operator_from_spacings((1, 1, 1), canon.spacing, lr_shape=canon.shape, slice_axes=[2])
        y = torch.from_numpy(norm(canon.data))[None, None]
        tiler = SliceTiler(op.hr_shape, 0, 2, pipe.tile_multiple)
        cond_img = tiler.split(op.interpolate(y, "cubic"))
        latent_shape = [s // pipe.vae.downsample_factor for s in tiler.tile_shape]
        cond = latent_condition(cond_img, latent_shape, pipe.vae, pipe.model_card.unet_condition)
        cond = cond.repeat(n, 1, 1, 1)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(cond.shape[0], pipe.vae.config.latent_channels, *latent_shape, generator=g)
        pipe.scheduler.set_timesteps(steps)
        for t in pipe.scheduler.timesteps:
            out = torch.cat([pipe.unet(a, t, c) for a, c in zip(z.split(batch_size), cond.split(batch_size),
                                                                   strict=True)])
            z = pipe.scheduler.step(out, t, z).prev_sample
        tiles = torch.cat([pipe.vae.decode_latent(a) for a in z.split(batch_size)])
        tiler.merge(tiles)
    return time.perf_counter() - tic


def worker(args: argparse.Namespace) -> None:
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    lr = lr_volume(tuple(args.crop))
    if args.kind == "hand":
        seconds = hand_loop(pipe, lr, args.n, args.steps, args.batch_size)
    else:
        out = pipe(lr, num_samples=args.n, num_inference_steps=args.steps, guidance=args.kind, noise_std=0.0,
                   batch_size=args.batch_size, generator=torch.Generator().manual_seed(0), keep_samples=False)
        seconds = sum(out.record.timings.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--crop", type=int, nargs=3, default=[96, 112, 96], help="HR voxels of the template")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; model {args.model}; "
          f"input {args.crop[0]}x{args.crop[1]}x{args.crop[2] // 4} at 1x1x4 mm -> {'x'.join(map(str, args.crop))}; "
          f"{args.steps} steps of the model's scheduler; medians of {args.repeats}")
    print("| run | N | seconds | s per sample | peak RSS (MiB) |\n| --- | --- | --- | --- | --- |")
    results = {}
    for kind in ("hand", "none", "projection"):
        for n in args.samples:
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--kind", kind, "--n", str(n),
                       "--crop", *map(str, args.crop)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE")).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            sec = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak_rss_mib"] for r in runs)
            results[kind, n] = sec
            label = {"hand": "hand-written loop", "none": "pipeline, no guidance",
                     "projection": "pipeline, projection guidance"}[kind]
            print(f"| {label} | {n} | {sec:.2f} | {sec / n:.2f} | {peak:.0f} |", flush=True)
    for n in args.samples:
        print(f"N={n}: pipeline (no guidance) / hand loop = {results['none', n] / results['hand', n]:.3f}")
    if 1 in args.samples and 8 in args.samples:
        print(f"batched N=8 / (8 x N=1), pipeline without guidance: "
              f"{results['none', 8] / (8 * results['none', 1]):.3f}")


if __name__ == "__main__":
    main()
