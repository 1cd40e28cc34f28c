"""Scans whose noise std is not known (masked, no air, no ``--noise-std``): can one interval with a noise term, ``mean ±
λ (std + w σ̂)`` with ``σ̂`` the in-plane estimate of the slices' noise (``gen_sr.physics.estimate_noise_std``), cover
them at every noise level? A diagnostic on calibration volumes only; figures in ``benchmarks/NOISE_UNKNOWN.md``.

    python benchmarks/noise_unknown.py [--model models/heads2d] [--data runs/calib_set2] [--slab 8]
        [--snr 0 60 30] [--weights 0 0.5 1 1.5 2 3] [--cache runs/bench/noise_unknown_cache]

Each volume of ``--data`` (the shipped per-grid records' calibration subjects), cut to its central coronal slab of
``--slab`` mm as the calibration cuts it, is super-resolved from 4 mm Gaussian axial slices at each ``--snr`` (0:
noise-free; Rician noise, seed 0, 1, ...) **without a noise std**, as a scan without air is: exact projections, no
refit; 8 samples at the model's default sampler, seed 0. ``σ̂`` is read from each run's slices. For each weight ``w``
of the noise term, each subject's coverage (its runs at every SNR together and apart) under a CRC scale (α = 0.1, 12
blocks per volume) fitted on the other subjects of its grid at every SNR: leave one subject out, so a subject's
other noise levels never calibrate it. No choice is made here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import numpy as np
import torch

from gen_sr.eval.calibration import CalibrationVolume, calibration_volumes, case_grid, fit_calibration, split_units
from gen_sr.eval.cases import load_hr_volumes, simulate_cases
from gen_sr.physics import estimate_noise_std
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import IntervalShape

FIT = {"alpha": 0.1, "delta": 0.1, "method": "crc"}
BLOCKS = 12


def volumes_without_noise_std(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> list[dict]:
    """Every calibration volume at every SNR, super-resolved without a noise std: ``{"subject", "snr", "grid",
    "volume"}`` with the volume's ``noise_std`` set to ``σ̂`` of its slices."""
    named = load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab)
    rows = []
    for snr in args.snr:
        cases = simulate_cases(named, axis=2, thickness=4.0, snr=snr or None, seed=0)
        cases = [dataclasses.replace(c, name=f"{c.name}_snr{snr:g}", noise_std=0.0) for c in cases]
        volumes = calibration_volumes(pipe, cases, progress=False, cache=args.cache, num_samples=8, batch_size=8,
                                      generator=torch.Generator().manual_seed(0))
        for (subject, _), case, volume in zip(named, cases, volumes, strict=True):
            sigma = estimate_noise_std(case.lr.data, axis=2)
            rows.append({"subject": subject, "snr": snr, "grid": case_grid(case),
                         "volume": dataclasses.replace(volume, noise_std=sigma)})
            print(f"{case.name}: grid {case_grid(case):g} mm, σ̂ {sigma:.4g} "
                  f"({100 * sigma / _span(volume):.2f} % of the range)", flush=True)
    return rows


def _span(volume: CalibrationVolume) -> float:
    """The truth's 1st-99th percentile range in the volume's mask."""
    truth = (volume.error + volume.mean)[volume.mask]
    return float(np.subtract(*np.percentile(truth, [99, 1])))


def leave_subject_out(rows: list[dict], shape: IntervalShape) -> dict[tuple[str, float], float]:
    """Each run's coverage under the scale fitted on the other subjects of its grid (all their SNRs)."""
    coverage = {}
    for row in rows:
        others = [r["volume"] for r in rows if r["grid"] == row["grid"] and r["subject"] != row["subject"]]
        scale = fit_calibration(*split_units(others, shape, blocks=BLOCKS), **FIT).scale
        v = row["volume"]
        inside = v.mask
        u = shape.spread(v.std, v.mean, v.noise_std)
        coverage[(row["subject"], row["snr"])] = float(np.mean(np.abs(v.error[inside]) <= scale * u[inside]))
    return coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--data", nargs="+", default=["runs/calib_set2"])
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.0, 60.0, 30.0], help="0: noise-free slices")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--cache", default="runs/bench/noise_unknown_cache")
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = volumes_without_noise_std(pipe, args)
    snrs = [f"SNR {s:g}" if s else "noise-free" for s in args.snr]
    print("\n| w (noise term) | grid (mm) | " + " | ".join(f"coverage, {s}" for s in snrs)
          + " | mean \\|coverage − 0.90\\| |\n| --- | --- | " + " | ".join("---" for _ in snrs) + " | --- |")
    for w in args.weights:
        coverage = leave_subject_out(rows, IntervalShape(noise_floor=w))
        by_grid: dict[float, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            by_grid[row["grid"]][row["snr"]].append(coverage[(row["subject"], row["snr"])])
        for grid, per_snr in sorted(by_grid.items()):
            cells = [f"{min(per_snr[s]):.3f}-{max(per_snr[s]):.3f}" for s in args.snr]
            dev = np.mean([abs(c - 0.9) for s in args.snr for c in per_snr[s]])
            print(f"| {w:g} | {grid:g} | " + " | ".join(cells) + f" | {dev:.4f} |", flush=True)


if __name__ == "__main__":
    main()
