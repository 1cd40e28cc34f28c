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

``--test SPEC ...`` instead runs the registered test of a calibration per grid (``CALIBRATION_GRID.md``): the
calibration's own volumes are super-resolved as ``gen-sr calibrate`` did for the shipped records (slab ``--slab``, 4 mm
slices at SNR 30, noise seeds 0, 1, ..., 8 samples, seed 0, 12 units per volume, CRC at α = 0.1), with and without the
refit where the data disagree, and ``λ̂`` is fitted on all of them (the pooled record, as shipped) and on each grid's
volumes apart. Each test scan (``NAME:N`` of ``data_disagreement.py``: its 24 mm central coronal slab cropped to the
foreground) is super-resolved from 4 mm Gaussian axial slices at SNR 30 (with the refit, as a run given its noise std)
and noise-free (without), and the coverage of ``mean ± λ̂ std`` in its foreground is printed for the model's shipped
record, the pooled scale and the scale of its grid. With ``--no-refit-units noise-free`` (the third test) the records
without the refit are fitted on the volumes' slices noise-free, and each test scan's SNR 30 slices are also run
without a noise std (as a masked scan without one).

``--between SPEC ... --grids G ...`` runs the fourth test: each test scan (as in ``--test``) resampled to each grid,
from 4 mm Gaussian axial slices at SNR 30 (with the refit) and noise-free (without); the coverage of ``mean ± λ std``
with the scale interpolated in the voxel size between the model's two per-grid records around the run's grid (the
change tested, not adopted) and with its pooled record.

``--voxel-scaled SPEC ... --grids G ...`` runs the fifth test: each test scan resampled to each grid of ``--grids`` no
finer than its own, from 4 mm Gaussian axial slices at SNR 30 and SNR 60, its noise std given (with the refit); the
coverage of ``SHAPE_CHECK_SCALE × std × voxel size`` (the change tested) and of ``mean ± λ std`` with the record the
model gives the run today (``pipe.calibration_for``: its grid's, else the pooled one).

The first four tests read the model's records of their day (``git log models/heads2d/calibration.json``): since the
fifth, the records for runs with a noise std are one per mm of the voxel size, which ``--test`` and ``--between`` do
not reproduce (check out the commit of a test's results to repeat it).

``--anisotropic SPEC ... --in-plane X,Y ...`` runs the sixth test: each test scan resampled to each in-plane grid
``(X, Y)`` (RAS+ axes 0 and 1; 1 mm along axis 2), from 4 mm Gaussian axial slices at SNR 30 and SNR 60 (noise std
given, with the refit) and noise-free (without); the coverage of the interval the run gets today
(``pipe.calibration_for`` at the finest output spacing), and, reported only, the per-mm scale times the geometric mean
and the coarsest output spacing (runs with a noise std) or the 1.5 mm record (noise-free runs).

``--shape-check`` (a diagnostic on the volumes of ``--data`` only): each volume's leave-one-out coverage for one
scale of ``std × voxel size`` over all of them, against the plain std with a scale per grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.calibration import calibration_volumes, case_grid, fit_volumes
from gen_sr.eval.cases import load_hr_volumes, simulate_case, simulate_cases, super_resolve
from gen_sr.eval.metrics import foreground
from gen_sr.physics import coarsen
from gen_sr.pipelines import LatentDiffusionSRPipeline


def scale_needed(pipe: LatentDiffusionSRPipeline, hr, name: str, thickness: float,
                 snr: float | None) -> tuple[float, float, float]:
    """``λ90`` of one slab (the factor by which the std must be scaled to cover 90 % of its foreground), and the
    median ``|truth − mean|`` and median std there, as fractions of the truth's 1st-99th percentile range."""
    case = simulate_case(hr, name, axis=2, thickness=thickness, snr=snr, seed=0)
    out = super_resolve(pipe, case, num_samples=8, generator=[torch.Generator().manual_seed(k) for k in range(8)],
                        keep_samples=False, output_type="np")
    truth = case.hr.data.astype(np.float64)
    inside = foreground(truth)
    err, std = np.abs(truth - out.mean)[inside], out.std[inside]
    span = float(np.subtract(*np.percentile(truth[inside], [99, 1])))
    return (float(np.quantile(err / np.maximum(std, 1e-12), 0.9)), float(np.median(err)) / span,
            float(np.median(std)) / span)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--data", nargs="+", default=["runs/calib_set"])
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--grids", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--thicknesses", type=float, nargs="+", default=[4.0, 6.0])
    parser.add_argument("--snr", type=float, default=30.0, help="0: noise-free slices")
    parser.add_argument("--test", nargs="+", metavar="SPEC", help="run the registered test on these scans")
    parser.add_argument("--between", nargs="+", metavar="SPEC",
                        help="run the fourth test (grids between the per-grid records) on these scans, resampled to "
                             "each of --grids")
    parser.add_argument("--voxel-scaled", nargs="+", metavar="SPEC",
                        help="run the fifth test (one scale for std x voxel size, runs with a noise std) on these "
                             "scans, resampled to each of --grids no finer than their own")
    parser.add_argument("--anisotropic", nargs="+", metavar="SPEC",
                        help="run the sixth test (anisotropic output grids) on these scans, resampled to each grid "
                             "of --in-plane")
    parser.add_argument("--in-plane", nargs="+", default=["1,1.4", "1.4,1"], metavar="X,Y",
                        help="--anisotropic: the in-plane spacings (RAS+ axes 0 and 1, mm); 1 mm along axis 2")
    parser.add_argument("--shape-check", action="store_true",
                        help="fit one scale for std x voxel size (mm) on the volumes of --data, and one per grid "
                             "for the plain std, and print each volume's coverage calibrated on the others")
    parser.add_argument("--no-refit-units", choices=("snr", "noise-free"), default="snr",
                        help="--test: fit the records without the refit on the SNR 30 units (the first two tests) "
                             "or on the same volumes noise-free (the third), which then also runs each test scan at "
                             "SNR 30 without the refit")
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.test:
        return test_per_grid(pipe, args)
    if args.between:
        return test_between(pipe, args)
    if args.voxel_scaled:
        return test_voxel_scaled(pipe, args)
    if args.anisotropic:
        return test_anisotropic(pipe, args)
    if args.shape_check:
        return shape_check(pipe, args)
    print("| volume | grid (mm) | slices (mm) | slab voxels | λ90 | median \\|error\\| | median std |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for name, volume in load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab):
        for grid in args.grids:
            if grid < max(volume.spacing) * (1 - 1e-6):
                continue
            hr, _ = coarsen(volume, (grid, grid, grid))
            for thickness in args.thicknesses:
                lam, err, std = scale_needed(pipe, hr, name, thickness, args.snr or None)
                print(f"| {name} | {grid:g} | {thickness:g} | {' x '.join(map(str, hr.shape))} | {lam:.2f} | "
                      f"{err:.4f} | {std:.4f} |", flush=True)


SHAPE_CHECK_SCALE = 3.160
"""The one scale of ``std × voxel size`` that ``--shape-check`` fitted on the shipped records' eight calibration
volumes (SNR 30, with the refit; ``CALIBRATION_GRID.md``), reported beside the fourth test."""

FIT = {"alpha": 0.1, "delta": 0.1, "method": "crc", "blocks": 12}
"""The shipped calibration's rule: CRC at α = 0.1 on 12 blocks per volume."""


def _calibration_volumes(pipe: LatentDiffusionSRPipeline, cases, *, refit: bool) -> list:
    """The cases super-resolved as ``gen-sr calibrate`` does (8 samples, seed 0), with or without the refit."""
    return calibration_volumes(pipe, cases, progress=False, num_samples=8, batch_size=8, refit_disagreement=refit,
                               generator=torch.Generator().manual_seed(0))


def shape_check(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--shape-check`` (a diagnostic on calibration volumes only): would one scale serve every grid if the std were
    multiplied by the voxel size in mm? The volumes of ``--data`` as ``gen-sr calibrate --per-grid --snr 30`` uses
    them (with the refit); each volume's coverage when calibrated on the others (CRC, 12 blocks each), for one scale
    of ``std × voxel size`` over all volumes and for the plain std per grid."""
    cases = simulate_cases(load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab), axis=2, thickness=4.0,
                           snr=30.0, seed=0)
    volumes = _calibration_volumes(pipe, cases, refit=True)
    grids = [case_grid(c) for c in cases]
    scaled = fit_volumes([dataclasses.replace(v, std=v.std * g) for v, g in zip(volumes, grids, strict=True)], **FIT)
    print(f"std x voxel size, one scale: {scaled.calibration.scale:.3f}", flush=True)
    own = {}
    for grid in sorted(set(grids)):
        chosen = [i for i, g in enumerate(grids) if g == grid]
        result = fit_volumes([volumes[i] for i in chosen], **FIT)
        own |= dict(zip(chosen, result.transfer, strict=True))
        print(f"std on {grid:g} mm grids: {result.calibration.scale:.3f}", flush=True)
    print("| volume | grid (mm) | coverage, std x voxel size, one scale | coverage, std, its grid's scale |\n"
          "| --- | --- | --- | --- |")
    for i, (case, grid) in enumerate(zip(cases, grids, strict=True)):
        print(f"| {case.name} | {grid:g} | {scaled.transfer[i]:.4f} | {own[i]:.4f} |", flush=True)


def _error_over_std(pipe: LatentDiffusionSRPipeline, case) -> np.ndarray:
    """``|truth − mean| / std`` in the foreground of one test run (8 samples, seed 0): the interval ``mean ± λ std``
    covers the voxels where it is at most ``λ``."""
    out = super_resolve(pipe, case, num_samples=8, generator=torch.Generator().manual_seed(0), keep_samples=False,
                        output_type="np")
    truth = case.hr.data.astype(np.float64)
    inside = foreground(truth)
    return np.abs(truth - out.mean)[inside] / np.maximum(out.std[inside], 1e-12)


def _test_scans(specs: list[str]) -> list:
    """The test scans (``NAME:N`` of ``data_disagreement.py``): each one's 24 mm central coronal slab cropped to its
    foreground."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_disagreement import scan_volume

    return [scan_volume(spec, 24.0)[0] for spec in specs]


def _interpolated_scale(pipe: LatentDiffusionSRPipeline, settings, grid: float) -> float:
    """The change the fourth test tried (not adopted): the scale of the model's two per-grid records for these
    sampler ``settings`` whose grids bracket ``grid``, interpolated linearly in the voxel size."""
    per_grid = [r for r in pipe.calibrations if r.sampling == settings and r.grid_spacing is not None]
    low = max((r for r in per_grid if r.grid_spacing <= grid), key=lambda r: r.grid_spacing)
    high = min((r for r in per_grid if r.grid_spacing >= grid), key=lambda r: r.grid_spacing)
    if low is high:
        return low.scale
    return float(np.interp(grid, [low.grid_spacing, high.grid_spacing], [low.scale, high.scale]))


def test_between(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--between`` (the fourth test): each test scan resampled to each grid of ``--grids``, from 4 mm Gaussian
    axial slices at SNR 30 (with the refit) and noise-free (without); coverage of ``mean ± λ std`` with the record the
    model's ``Calibrations.find`` gives the run's grid and with its pooled record, and (runs with a noise std) of
    ``SHAPE_CHECK_SCALE × std × voxel size``."""
    print("| scan | grid (mm) | slices | record for the grid: coverage | pooled: coverage | std x voxel size: "
          "coverage |\n| --- | --- | --- | --- | --- | --- |")
    for spec, volume in zip(args.between, _test_scans(args.between), strict=True):
        for grid in args.grids:
            hr, _ = coarsen(volume, (grid, grid, grid))
            for snr in (30.0, None):
                case = simulate_case(hr, spec, axis=2, thickness=4.0, snr=snr, seed=0)
                settings = pipe.sampling_settings(noise_std=case.noise_std)
                scales = (_interpolated_scale(pipe, settings, case_grid(case)), pipe.calibrations.find(settings).scale)
                ratio = _error_over_std(pipe, case)
                cells = [f"{scale:.3f}: {np.mean(ratio <= scale):.4f}" for scale in scales]
                shaped = SHAPE_CHECK_SCALE * case_grid(case)
                cells.append(f"{shaped:.3f}: {np.mean(ratio <= shaped):.4f}" if snr else "")
                print(f"| {spec} | {case_grid(case):g} | {'noise-free' if snr is None else f'SNR {snr:g}'} | "
                      + " | ".join(cells) + " |", flush=True)


def test_voxel_scaled(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--voxel-scaled`` (the fifth test): each test scan resampled to each grid of ``--grids`` no finer than its
    own, from 4 mm Gaussian axial slices at SNR 30 and SNR 60 with its noise std given; coverage of
    ``SHAPE_CHECK_SCALE × std × voxel size`` and of the plain std with the record the model gives the run today."""
    print("| scan | grid (mm) | slices | 3.160 x std x voxel size: coverage | today's record: coverage |\n"
          "| --- | --- | --- | --- | --- |")
    for spec, volume in zip(args.voxel_scaled, _test_scans(args.voxel_scaled), strict=True):
        for grid in args.grids:
            if grid < min(volume.spacing) * (1 - 1e-6):
                continue
            hr, _ = coarsen(volume, (grid, grid, grid))
            for snr in (30.0, 60.0):
                case = simulate_case(hr, spec, axis=2, thickness=4.0, snr=snr, seed=0)
                settings = pipe.sampling_settings(noise_std=case.noise_std)
                scales = (SHAPE_CHECK_SCALE * case_grid(case),
                          pipe.calibration_for(settings, grid_spacing=case_grid(case)).scale)
                ratio = _error_over_std(pipe, case)
                print(f"| {spec} | {case_grid(case):g} | SNR {snr:g} | "
                      + " | ".join(f"{s:.3f}: {np.mean(ratio <= s):.4f}" for s in scales) + " |", flush=True)


def test_anisotropic(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--anisotropic`` (the sixth test): each test scan resampled to each in-plane grid of ``--in-plane`` (1 mm
    along axis 2), from 4 mm Gaussian axial slices at SNR 30, SNR 60 (noise std given) and noise-free; coverage of the
    interval the run gets today, and (reported only) of the alternatives the protocol names."""
    print("| scan | output grid (mm) | slices | today's rule: coverage | geometric mean / coarsest spacing, or the "
          "1.5 mm record: coverage |\n| --- | --- | --- | --- | --- |")
    for spec, volume in zip(args.anisotropic, _test_scans(args.anisotropic), strict=True):
        for plane in args.in_plane:
            x, y = (float(v) for v in plane.split(","))
            hr, _ = coarsen(volume, (x, y, 1.0))
            for snr in (30.0, 60.0, None):
                case = simulate_case(hr, spec, axis=2, thickness=4.0, snr=snr, seed=0)
                settings = pipe.sampling_settings(noise_std=case.noise_std)
                today = pipe.calibration_for(settings, grid_spacing=case_grid(case))
                if snr is None:
                    others = [pipe.calibration_for(settings, grid_spacing=1.5).scale]
                else:
                    spacing = np.asarray(case.hr.spacing, dtype=np.float64)
                    others = [today.scale_per_mm * float(np.exp(np.log(spacing).mean())),
                              today.scale_per_mm * float(spacing.max())]
                ratio = _error_over_std(pipe, case)
                grid = " x ".join(f"{s:.2f}" for s in case.hr.spacing)
                print(f"| {spec} | {grid} | {'noise-free' if snr is None else f'SNR {snr:g}'} | "
                      f"{today.scale:.3f}: {np.mean(ratio <= today.scale):.4f} | "
                      + "; ".join(f"{s:.3f}: {np.mean(ratio <= s):.4f}" for s in others) + " |", flush=True)


def test_per_grid(pipe: LatentDiffusionSRPipeline, args: argparse.Namespace) -> None:
    """``--test``: the pooled and the per-grid scales, and each test scan's coverage with both."""
    named = list(load_hr_volumes(args.data, pipe, "all", slab_mm=args.slab))
    units = {snr: simulate_cases(named, axis=2, thickness=4.0, snr=snr, seed=0) for snr in (30.0, None)}
    scales: dict[bool, dict[str, float]] = {}
    for refit in (True, False):
        cases = units[30.0 if refit or args.no_refit_units == "snr" else None]
        volumes = _calibration_volumes(pipe, cases, refit=refit)
        grids = {case_grid(c) for c in cases}
        scales[refit] = {"pooled": fit_volumes(volumes, **FIT).calibration.scale}
        for grid in sorted(grids):
            chosen = [v for v, c in zip(volumes, cases, strict=True) if case_grid(c) == grid]
            scales[refit][f"{grid:g}"] = fit_volumes(chosen, **FIT).calibration.scale
        print(f"refit {refit}: scales " + ", ".join(f"{k} {v:.3f}" for k, v in scales[refit].items()), flush=True)
    shipped = {refit: pipe.calibrations.find(pipe.sampling_settings(noise_std=None if refit else 0.0)).scale
               for refit in (True, False)}
    print(f"shipped pooled scales: refit {shipped[True]:.3f}, no refit {shipped[False]:.3f}", flush=True)
    print("| scan | grid (mm) | SNR | shipped scale: coverage | pooled scale: coverage | grid's scale: coverage |\n"
          "| --- | --- | --- | --- | --- | --- |")
    runs = [(30.0, True), (None, False)] + ([(30.0, False)] if args.no_refit_units == "noise-free" else [])
    for spec, hr in zip(args.test, _test_scans(args.test), strict=True):
        for snr, refit in runs:
            case = simulate_case(hr, spec, axis=2, thickness=4.0, snr=snr, seed=0)
            if not refit:  # noisy slices run without a noise std, as a scan without air and without --noise-std
                case = dataclasses.replace(case, noise_std=0.0)
            ratio = _error_over_std(pipe, case)
            own = scales[refit]
            row = (shipped[refit], own["pooled"], own[f"{case_grid(case):g}"])
            slices = "noise-free" if snr is None else f"{snr:g}" + ("" if refit else ", no refit")
            print(f"| {spec} | {case_grid(case):g} | {slices} | "
                  + " | ".join(f"{s:.3f}: {np.mean(ratio <= s):.4f}" for s in row) + " |", flush=True)


if __name__ == "__main__":
    main()
