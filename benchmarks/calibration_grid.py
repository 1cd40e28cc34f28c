"""What sets the shipped calibration's scale: the std scale ``λ90`` (the 90th percentile of ``|truth − mean| / std``
in the foreground) that each calibration volume needs, on its own grid and resampled to another; figures in
``benchmarks/CALIBRATION_GRID.md``.

    python benchmarks/calibration_grid.py [--model models/heads2d] [--data runs/calib_set] [--slab 8]
        [--grids 1 1.5] [--thicknesses 4 6] [--snr 30]

Each volume of ``--data`` (the calibration's own synthetic subjects: ``gen-sr calibrate``'s ``--data``), cut to its
central coronal slab of ``--slab`` mm as the calibration cuts it, is resampled by k-space truncation
(``gen_sr.physics.coarsen``) onto each isotropic grid of ``--grids`` no finer than its own, and super-resolved from
Gaussian axial slices of each thickness with Rician noise at ``--snr`` (seed 0), 8 samples at the model's default
sampler, seed 0. No choice is made here.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gen_sr.eval.cases import load_hr_volumes, simulate_case, super_resolve
from gen_sr.eval.metrics import foreground
from gen_sr.physics import coarsen
from gen_sr.pipelines import LatentDiffusionSRPipeline


def scale_needed(pipe: LatentDiffusionSRPipeline, hr, name: str, thickness: float, snr: float) -> float:
    """``λ90`` of one slab: the factor by which the std must be scaled to cover 90 % of its foreground."""
    case = simulate_case(hr, name, axis=2, thickness=thickness, snr=snr, seed=0)
    out = super_resolve(pipe, case, num_samples=8, generator=[torch.Generator().manual_seed(k) for k in range(8)],
                        keep_samples=False, output_type="np")
    truth = case.hr.data.astype(np.float64)
    inside = foreground(truth)
    return float(np.quantile(np.abs(truth - out.mean)[inside] / np.maximum(out.std[inside], 1e-12), 0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--data", nargs="+", default=["runs/calib_set"])
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--grids", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--thicknesses", type=float, nargs="+", default=[4.0, 6.0])
    parser.add_argument("--snr", type=float, default=30.0)
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    print("| volume | grid (mm) | slices (mm) | slab voxels | λ90 |\n| --- | --- | --- | --- | --- |")
    for name, volume in load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab):
        for grid in args.grids:
            if grid < max(volume.spacing) * (1 - 1e-6):
                continue
            hr, _ = coarsen(volume, (grid, grid, grid))
            for thickness in args.thicknesses:
                lam = scale_needed(pipe, hr, name, thickness, args.snr)
                print(f"| {name} | {grid:g} | {thickness:g} | {' x '.join(map(str, hr.shape))} | {lam:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
