"""Scans whose noise std is not known (masked, no air, no ``--noise-std``): can one interval with a noise term, ``mean ±
λ (std + w σ̂)`` with ``σ̂`` the in-plane estimate of the slices' noise (``gen_sr.physics.estimate_noise_std``), cover
them at every noise level? Figures in ``benchmarks/NOISE_UNKNOWN.md``.

    python benchmarks/noise_unknown.py [--model models/heads2d] [--data runs/calib_set2] [--slab 8]
        [--snr 0 60 30] [--weights 0 0.5 1 1.5 2 3] [--cache runs/bench/noise_unknown_cache]
    python benchmarks/noise_unknown.py --fit [...]
    python benchmarks/noise_unknown.py --test SPEC [SPEC ...]

The diagnostic (default; calibration volumes only, no choice made): each volume of ``--data`` (the shipped per-grid
records' calibration subjects), cut to its central coronal slab of ``--slab`` mm as the calibration cuts it, is
super-resolved from 4 mm Gaussian axial slices at each ``--snr`` (0: noise-free; Rician noise, seed 0, 1, ...)
**without a noise std**, as a scan without air is (``gen_sr.eval.calibration.unknown_noise_volumes``: exact
projections, no refit; ``σ̂`` read from each run's slices); 8 samples at the model's default sampler, seed 0. For each
weight ``w`` of the noise term, each subject's coverage under a CRC scale (α = 0.1, 12 blocks per volume) fitted on the
other subjects of its grid at every SNR: leave one subject out, so a subject's other noise levels never calibrate it.

``--fit`` writes the records for such runs into ``--model`` from the same runs (``--cache`` keeps them, so the fit
reuses the diagnostic's): per grid and pooled, CRC at α = 0.1 on 12 blocks per volume, the interval of
``gen_sr.risk.NOISE_UNKNOWN_SHAPE``; what ``gen-sr calibrate --noise-unknown 0 60 30 [--per-grid] --data runs/calib_set2
--slab 8 --blocks 12 --method crc --samples 8 --batch-size 8`` computes.

``--test SPEC ...`` runs the registered test: each scan (``NAME:N`` of ``data_disagreement.py``: its 24 mm central
coronal slab cropped to the foreground) from 4 mm Gaussian axial slices noise-free and at each SNR, skull-stripped (no
air), run with ``noise_std="auto"`` (8 samples, seed 0); the coverage in the truth's foreground of the interval its
risk map gives and of today's (the noise-free record for its grid, ``mean ± λ std``).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.calibration import (
    calibrate,
    calibrate_per_grid,
    case_grid,
    fit_calibration,
    split_units,
    unknown_noise_volumes,
)
from gen_sr.eval.cases import load_hr_volumes, simulate_case, simulate_cases_at
from gen_sr.eval.metrics import foreground
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import IntervalShape

FIT = {"alpha": 0.1, "delta": 0.1, "method": "crc"}
BLOCKS = 12
RUN = {"num_samples": 8, "batch_size": 8}


def _subject(case_name: str) -> str:
    """The volume a case was simulated from (its name without the noise level ``simulate_cases_at`` added)."""
    return case_name.rsplit(" (", 1)[0]


def _cases(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> list:
    named = load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab)
    return simulate_cases_at(named, args.snr, axis=2, thickness=4.0, seed=0)


def diagnostic(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    cases = _cases(pipe, args)
    volumes = unknown_noise_volumes(pipe, cases, progress=False, cache=args.cache,
                                    generator=torch.Generator().manual_seed(0), **RUN)
    for case, volume in zip(cases, volumes, strict=True):
        truth = (volume.error + volume.mean)[volume.mask]
        span = float(np.subtract(*np.percentile(truth, [99, 1])))
        print(f"{case.name}: grid {case_grid(case):g} mm, σ̂ {volume.noise_std:.4g} "
              f"({100 * volume.noise_std / span:.2f} % of the range)", flush=True)
    snrs = [f"SNR {s:g}" if s else "noise-free" for s in args.snr]
    print("\n| w (noise term) | grid (mm) | " + " | ".join(f"coverage, {s}" for s in snrs)
          + " | mean \\|coverage − 0.90\\| |\n| --- | --- | " + " | ".join("---" for _ in snrs) + " | --- |")
    for w in args.weights:
        shape = IntervalShape(noise_floor=w)
        by_grid: dict[float, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for case, v in zip(cases, volumes, strict=True):  # calibrated on the other subjects of its grid
            others = [o for c, o in zip(cases, volumes, strict=True)
                      if case_grid(c) == case_grid(case) and _subject(c.name) != _subject(case.name)]
            scale = fit_calibration(*split_units(others, shape, blocks=BLOCKS), **FIT).scale
            u = shape.spread(v.std, v.mean, v.noise_std)
            level = case.name.rsplit(" (", 1)[1].rstrip(")")
            by_grid[case_grid(case)][level].append(float(np.mean(np.abs(v.error[v.mask]) <= scale * u[v.mask])))
        for grid, per_level in sorted(by_grid.items()):
            cells = [f"{min(per_level[s]):.3f}-{max(per_level[s]):.3f}" for s in snrs]
            dev = np.mean([abs(c - 0.9) for s in snrs for c in per_level[s]])
            print(f"| {w:g} | {grid:g} | " + " | ".join(cells) + f" | {dev:.4f} |", flush=True)


def fit(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--fit``: the records for runs without a known noise std, per grid and pooled, into ``--model``."""
    cases = _cases(pipe, args)
    rule = {**FIT, "blocks": BLOCKS, "noise_known": False, "progress": False, "cache": args.cache,
            "details": {"data": list(args.data), "slab_mm": args.slab, "slice_thickness": 4.0, "profile": "gaussian",
                        "snr": list(args.snr), "noise_known": False, "samples": 8, "seed": 0,
                        "mask": "foreground of the reference"}}
    results = [*calibrate_per_grid(pipe, cases, **rule, generator=torch.Generator().manual_seed(0), **RUN),
               calibrate(pipe, cases, **rule, generator=torch.Generator().manual_seed(0), **RUN)]
    for result in results:
        pipe.calibrations = pipe.calibrations.with_record(result.calibration)
        cal = result.calibration
        print(f"{cal.describe()}, {cal.num_volumes} units, coverage on them {1 - cal.risk_hat:.4f}, "
              f"grid {cal.grid_spacing}, made with {cal.sampling.describe()}; leave one volume out: "
              + ", ".join(f"{t:.3f}" for t in result.transfer or []), flush=True)
    pipe.calibrations.save(args.model)
    print(f"wrote {Path(args.model) / 'calibration.json'}")


def test(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--test``: each scan without air, run as the CLI runs it (noise std ``auto``), and the coverage of its risk
    map's interval and of today's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_disagreement import scan_volume, skull_stripped

    print("| scan | grid (mm) | slices | σ̂ read in-plane | record used: coverage | today's record: coverage |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for spec in args.test:
        hr = scan_volume(spec, 24.0)[0]
        for snr in args.snr:
            case = skull_stripped(simulate_case(hr, spec, axis=2, thickness=4.0, snr=snr or None, seed=0))
            out = pipe(case.lr, operator=case.operator, noise_std="auto", generator=torch.Generator().manual_seed(0),
                       keep_samples=False, output_type="np", **RUN)
            run = out.record
            assert run.noise_known is False, f"{spec}: the pipeline read a noise std from air"
            truth = case.hr.data.astype(np.float64)
            inside = foreground(truth)
            err = np.abs(truth - out.mean)[inside]
            halfwidth = out.risk[inside] * pipe.intensity_normalization(case.lr.data).scale
            today = pipe.calibrations.find(pipe.sampling_settings(noise_std=0.0), case_grid(case))
            print(f"| {spec} | {case_grid(case):g} | {f'SNR {snr:g}' if snr else 'noise-free'} | "
                  f"{run.noise_std_in_plane:.4g} | {run.risk.scale:.3f}: {np.mean(err <= halfwidth):.4f} | "
                  f"{today.scale:.3f}: {np.mean(err <= today.scale * out.std[inside]):.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--data", nargs="+", default=["runs/calib_set2"])
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.0, 60.0, 30.0], help="0: noise-free slices")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--cache", default="runs/bench/noise_unknown_cache")
    parser.add_argument("--fit", action="store_true", help="write the records for runs without a known noise std")
    parser.add_argument("--test", nargs="+", metavar="SPEC", help="run the registered test on these scans")
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.test:
        return test(pipe, args)
    return fit(pipe, args) if args.fit else diagnostic(pipe, args)


if __name__ == "__main__":
    main()
