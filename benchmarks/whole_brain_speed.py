"""Seconds and peak memory for one whole 1 mm brain (issue 16), on this CPU or unchanged on a GPU.

    python benchmarks/whole_brain_speed.py [--model models/heads2d [models/heads2d_fast ...]] [--data colin27] \\
        [--shape 156 192 160] [--samples 1 4 8] [--settings 25 5 dpmsolver++@3] [--device auto] [--dtype auto] \\
        [--batch-size 8] [--unet-layout pipeline|contiguous] [--profile]

The head (``--data``: a sample-data name or a NIfTI file; default the held-out head, which is only timed here, not
tuned on) is brought to RAS+, cut to ``--shape`` voxels around the centre of its foreground, and degraded with 4 mm
Gaussian slices along RAS+ axis 2 (the LR is 156 x 192 x 40 for the default shape). Each (setting, N) runs in a fresh
subprocess (several ``--model`` run one after the other, for side-by-side figures from one run), so that
its peak memory is its own: peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.

Settings are ``[SAMPLER@]STEPS[:STRENGTH[:NORMAL[:PATCH]]][+FLAG|-FLAG...]`` as in ``sampling_curve.py`` (e.g.
``dpmsolver++@3-share_first_call``: the first network call made per sample), where their quality is
measured on validation data; the PSNR printed here (in the brain, against the cubic B-spline) is a check that the
run is sane, not a figure to choose settings by.

On a GPU the same command runs as it is: ``--device auto`` takes CUDA where there is one, ``--dtype auto`` bf16 there
(float32 on a CPU, where bf16 autocast is 14-100x slower) and attention is torch SDPA (the pipeline's default). With
``--dtype`` other than float32, each row also gives the PSNR of its mean against the float32 mean of the same seeds
(``vs float32``): how far the lower precision moves the output. ``--profile`` prints torch.profiler's top operators
for one network call on the pipeline's batch of tiles. ``--batch-size 16 --unet-layout contiguous`` times the pipeline
as it ran before 2026-12-06 (16 tiles per call, the UNet's weights in the default layout), for side-by-side figures.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_curve import parse_setting

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def whole_brain_case(data: str, shape: tuple[int, int, int]):
    """The head cut to ``shape`` around its foreground's centre and degraded to 4 mm slices along RAS+ axis 2."""
    from gen_sr.eval.cases import simulate_case
    from gen_sr.eval.metrics import foreground
    from gen_sr.sample_data import load_sample
    from gen_sr.volume import load_volume

    hr = (load_volume(data) if Path(data).is_file() else load_sample(data)).canonical()
    centre = np.argwhere(foreground(hr.data)).mean(0).round().astype(int)
    start = np.clip(centre - np.asarray(shape) // 2, 0, np.maximum(np.asarray(hr.shape) - shape, 0))
    hr = hr.crop(start, np.minimum(start + shape, hr.shape))
    return simulate_case(hr, f"{data} {tuple(hr.shape)}", axis=2, thickness=4.0)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    pipe = LatentDiffusionSRPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def profile_one_call(pipe, case, batch_size: int) -> str:
    """torch.profiler's top operators (by self time) for one UNet call on ``batch_size`` whole-slice tiles."""
    from torch.profiler import ProfilerActivity, profile

    normal = pipe.default_slice_normal(case.operator.hr_shape, 2)
    tile = [s for a, s in enumerate(case.operator.hr_shape) if a != normal]
    latent = [s // pipe.vae.downsample_factor for s in tile]
    device, dtype = pipe.device, pipe.unet.dtype
    z = torch.randn(batch_size, pipe.vae.config.latent_channels, *latent, device=device, dtype=dtype)
    c = torch.randn(batch_size, pipe.unet.config.condition_channels, *latent, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        pipe.unet(z, t, c)  # warm-up
        with profile(activities=activities) as prof:
            tic = time.perf_counter()
            pipe.unet(z, t, c)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - tic
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"one UNet call, {batch_size} tiles of {tile} voxels (latent {latent}), {dtype}: {seconds:.2f} s "
            f"({seconds / (batch_size * np.prod(tile)) * 1e6:.2f} µs per voxel)\n"
            + prof.key_averages().table(sort_by=sort, row_limit=12))


def sample(args: argparse.Namespace, case, device: torch.device, dtype: torch.dtype, profile: bool = False):
    """One timed run of the setting ``args.setting`` with ``args.n`` seeded samples, in ``dtype``."""
    from gen_sr.eval.cases import super_resolve
    from gen_sr.schedulers import scheduler_from_name

    pipe = load_pipeline(args.model[0], device, dtype)  # a worker runs one model
    if args.unet_layout == "contiguous":  # the default layout, for a side-by-side with the pipeline's channels-last
        pipe.unet.to(memory_format=torch.contiguous_format)
    if profile:
        print(profile_one_call(pipe, case, args.batch_size), file=sys.stderr)
    setting = parse_setting(args.setting)
    pipe.scheduler = scheduler_from_name(setting.pop("scheduler"), pipe.scheduler.config,
                                         **setting.pop("scheduler_options"))
    if args.skip_background is not None:
        setting["skip_background"] = args.skip_background
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    out = super_resolve(pipe, case, num_samples=args.n, batch_size=args.batch_size, keep_samples=False,
                        generator=[torch.Generator().manual_seed(k) for k in range(args.n)], **setting)
    return out, time.perf_counter() - tic


def worker(args: argparse.Namespace) -> None:
    from gen_sr.eval.baselines import baseline
    from gen_sr.eval.metrics import foreground, psnr

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.set_num_threads(os.cpu_count() or 1)
    case = whole_brain_case(args.data, tuple(args.shape))
    out, seconds = sample(args, case, device, dtype, profile=args.profile)
    peak = peak_memory_mib(device)
    brain = foreground(case.hr.data)
    ref = case.hr.data.astype(np.float64)
    data_range = float(np.ptp(ref[brain]))
    result = {"seconds": seconds, "timings": out.record.timings, "peak_mib": peak,
              "skipped_tiles": out.record.skipped_tiles, "device": str(device), "dtype": str(dtype),
              "psnr": psnr(out.mean, ref, brain, data_range),
              "psnr_cubic": psnr(baseline(case, "cubic"), ref, brain, data_range),
              "residual": out.record.max_relative_residual}
    if dtype != torch.float32:  # the same setting and seeds in float32: how far the lower precision moves the mean
        reference, _ = sample(args, case, device, torch.float32)
        result["vs_float32"] = psnr(out.mean, reference.mean, brain, data_range)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["models/heads2d"], help="one or more model folders")
    parser.add_argument("--data", default="colin27", help="a sample-data name or a NIfTI file")
    parser.add_argument("--shape", type=int, nargs=3, default=[156, 192, 160])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--settings", nargs="+", default=["5"])
    parser.add_argument("--skip-background", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unet-layout", default="pipeline", choices=["pipeline", "contiguous"],
                        help="the UNet's memory layout: the pipeline's (channels-last for a 2D model) or contiguous")
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one call")
    parser.add_argument("--output", help="also write the table here (Markdown)")
    parser.add_argument("--save-case", metavar="DIR",
                        help="only write the case (hr.nii.gz, lr.nii.gz) to DIR, e.g. to time `gen-sr super-resolve "
                             "--adapt` on the same LR, and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.save_case:
        from gen_sr.volume import save_volume

        case = whole_brain_case(args.data, tuple(args.shape))
        Path(args.save_case).mkdir(parents=True, exist_ok=True)
        for name, volume in (("hr", case.hr), ("lr", case.lr)):
            save_volume(volume, Path(args.save_case) / f"{name}.nii.gz", overwrite=True)
        print(f"wrote {args.save_case}/hr.nii.gz {case.hr.shape} and lr.nii.gz {case.lr.shape}")
        return
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}): {name}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, {dtype}; {args.data} cut to {' x '.join(map(str, args.shape))} at 1 mm, 4 mm "
             f"Gaussian slices along RAS+ axis 2, projection guidance, batch {args.batch_size}, "
             f"UNet layout: {args.unet_layout}"
             + (f", background tiles skipped below {args.skip_background}" if args.skip_background is not None else "")
             + ".\n",
             "| model | setting | N | seconds | denoise | decode | prepare + stitch | peak memory (MiB) | "
             "skipped tiles | PSNR (brain) | cubic | residual |" + (" vs float32 |" if dtype != torch.float32 else ""),
             "|" + " --- |" * (12 + (dtype != torch.float32))]
    print("\n".join(lines), flush=True)
    profiled = set()  # one profile per model is enough
    for model, setting, n in itertools.product(args.model, args.settings, args.samples):
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--setting", setting, "--n", str(n)]
        for flag in ("data", "batch_size", "unet_layout", "device", "dtype", "skip_background"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--shape", *map(str, args.shape)] + (["--profile"] if args.profile and model not in profiled else [])
        profiled.add(model)
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        r = json.loads(done.stdout.strip().splitlines()[-1])
        t = r["timings"]
        other = t.get("prepare_s", 0.0) + t.get("stitch_uncertainty_s", 0.0)
        lines.append(f"| {Path(model).name} | {setting} | {n} | {r['seconds']:.0f} | {t.get('denoise_s', 0):.0f} | "
                     f"{t.get('decode_s', 0):.1f} | {other:.1f} | {r['peak_mib']:.0f} | {r['skipped_tiles']} | "
                     f"{r['psnr']:.2f} | {r['psnr_cubic']:.2f} | {r['residual']:.1e} |"
                     + (f" {r['vs_float32']:.1f} dB |" if "vs_float32" in r else ""))
        print(lines[-1], flush=True)
    if args.output:
        from gen_sr.io import atomic_write

        atomic_write(Path(args.output), lambda p: p.write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
