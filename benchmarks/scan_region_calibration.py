"""The per-scan calibration over a whole head, measured in the brain and outside it: one scale over the scan's
foreground against a scale per region (a brain mask on the thick-slice scan), each against noisy references or
extrapolated to noise-free ones on recorrupted problems (``gen_sr.eval.scan_calibration``), and at SNR > 0 an
oracle: the same problems judged against the held-out slices without their noise.

    python benchmarks/scan_region_calibration.py --head runs/validation4/robex_subject4.nii.gz \\
        --brain runs/validation4/robex_brain_subject4.nii.gz [--axis 2] [--snr 0 30] [--output PATH]

The head (cropped to its foreground's bounding box plus 4 voxels) is degraded with 4 mm Gaussian slices along RAS+
``--axis`` (2, axial slices, by default; 1 coronal, 0 sagittal; seeded Rician noise at each ``--snr``, 0 for none) and
goes through what ``gen-sr super-resolve --adapt --noise-std SIGMA`` does at its defaults (``fit_to_scan``:
adaptation, the pretrained UNet's comparison, the per-scan calibration; then 8 samples x 3 steps of the whole head).
The brain mask (``--brain``: nonzero inside, on the head's grid; e.g. the ``robex_brain`` subject of the same seed) is
brought to the thick-slice grid by the acquisition operator (a voxel is inside where more than half its slice weight
is), as a user's mask of the scan would be, and back to the output's grid (nearest neighbour) for the run. Every
calibration variant is fitted on the same super-resolved held-out slices (cached), so only the rule differs. Coverage
of each interval is measured against the truth in the brain (the mask on the head's grid), in the head's foreground,
and in the foreground outside the brain.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from adaptation_benchmark import seeded_sampling
from prior_benchmark import report

from gen_sr.eval.cases import simulate_case, super_resolve
from gen_sr.eval.metrics import foreground, psnr
from gen_sr.eval.scan_calibration import calibrate_on_scan, held_out_foreground
from gen_sr.eval.tables import figures_table
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.training.adaptation import AdaptationConfig
from gen_sr.training.scan_fit import fit_to_scan
from gen_sr.volume import Volume, load_volume, resample_to

VARIANTS = (("one scale", None, "keep"), ("one scale, extrapolated", None, "extrapolate"),
            ("per region", "brain", "keep"), ("per region, extrapolated", "brain", "extrapolate"))


def cropped(head: Volume, brain: np.ndarray, margin: int = 4) -> tuple[Volume, np.ndarray]:
    """The head and its brain mask cut to the head's foreground bounding box plus ``margin`` voxels."""
    where = np.argwhere(foreground(head.data))
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, head.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return head.crop(lo, hi), brain[box]


def lr_region(case, brain: np.ndarray) -> np.ndarray:
    """The brain mask on the thick-slice grid: the acquisition operator applied to it, thresholded at a half."""
    weight = case.operator.forward(torch.from_numpy(brain.astype(np.float64))[None, None])[0, 0].numpy()
    return weight > 0.5


def thin_slices(case, held_out: list[int], axis: int) -> Volume:
    """The thick-slice scan with each held-out slice replaced by the truth's one slice nearest its centre: an oracle
    of the per-scan calibration's in-plane problems posed on thin slices instead of the scan's slabs."""
    data = case.lr.data.copy()
    to_hr = np.linalg.inv(case.hr.affine) @ case.lr.affine
    for k in held_out:
        index = [0.0, 0.0, 0.0]
        index[axis] = float(k)
        j = int(np.rint((to_hr @ np.array([*index, 1.0]))[axis]))
        src = np.take(case.hr.data, [min(max(j, 0), case.hr.shape[axis] - 1)], axis=axis)
        where = [slice(None)] * 3
        where[axis] = slice(k, k + 1)
        data[tuple(where)] = src
    return case.lr.with_data(data)


def coverages(err: np.ndarray, halfwidth: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float]:
    """The fraction of each region's voxels whose error ``err`` lies within ``halfwidth``."""
    return {f"coverage, {name}": 1.0 - float(np.mean(err[m] > halfwidth[m])) if m.any() else float("nan")
            for name, m in regions.items()}


def variant(pipe, case, clean: Volume, region: np.ndarray | None, cache: Path, noise: str, seed: int,
            sampling: dict):
    """One variant's per-scan calibration (``noise``: ``keep``, ``extrapolate`` or ``clean``, the oracle), each kind
    of problem and draw in its own cache: the recorrupted ones have other inputs, the oracle's other references."""
    oracle = {"clean_scan": clean} if noise == "clean" else {"reference_noise": noise}
    return calibrate_on_scan(pipe, case.lr, noise_std=case.noise_std, progress=False, seed=seed, region=region,
                             cache=cache / (noise + (f"_seed{seed}" if seed else "")), **oracle, **sampling).calibration


def keep_arrays(folder: Path, mean: np.ndarray, std: np.ndarray, truth: np.ndarray, regions: dict[str, np.ndarray],
                record, case) -> None:
    """The run's arrays (``through_plane.npz``) and the held-out slices' foreground (``held_out.npz``) in ``folder``,
    beside the calibration cache that ``calibrate_on_scan(cache=folder)`` fills."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / "through_plane.npz", mean=mean.astype(np.float32), std=std.astype(np.float32),
                        truth=truth.astype(np.float32), noise_std=case.noise_std, affine=case.hr.affine,
                        **{k.replace(" ", "_"): m for k, m in regions.items()})
    np.savez_compressed(folder / "held_out.npz", slices=np.asarray(record.held_out_slices), axis=record.axis,
                        foreground=held_out_foreground(case.lr, record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--head", type=Path, required=True)
    parser.add_argument("--brain", type=Path, required=True, help="its brain (nonzero inside), on the head's grid")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=2, help="the RAS+ axis of the slices")
    parser.add_argument("--thin-oracle", action="store_true",
                        help="also calibrate on the truth's thin slices at the held-out slices' centres (noise-free "
                             "only): how much the scan's slabs, smoother in-plane than thin slices, lower λ̂")
    parser.add_argument("--snr", type=float, nargs="*", default=[0.0, 30.0], help="0 for noise-free")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", help="also write the table here (Markdown)")
    parser.add_argument("--holdout-every", type=int, default=AdaptationConfig().holdout_every, metavar="K",
                        help="the adaptation keeps every K-th in-plane slice out of the fine-tuning for the "
                        "calibration (default: the adaptation's)")
    parser.add_argument("--calibration-seeds", type=int, nargs="*", default=[],
                        help="also fit one scale (noisy, extrapolated, and at SNR > 0 the oracle) on problems drawn "
                        "again with these seeds (their noise and the samples'): how much the scale varies by draw")
    parser.add_argument("--keep", type=Path, help="keep the arrays here for re-analysis: per case, the held-out "
                        "problems' truth, mean and std (the calibration cache) and the run's (through_plane.npz)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    head = load_volume(args.head).canonical()
    brain_volume = load_volume(args.brain).canonical()
    if brain_volume.shape != head.shape:
        raise SystemExit(f"--brain is {brain_volume.shape}, the head {head.shape}: give a mask on the head's grid")
    brain_data = brain_volume.data
    head, brain = cropped(head, brain_data > 0.01 * np.percentile(brain_data[brain_data > 0], 99))

    def sampling() -> dict:
        return seeded_sampling(args.samples, args.steps)

    columns: dict[str, dict[str, float]] = {}
    for snr in args.snr:
        label = "noise-free" if snr == 0 else f"SNR {snr:g}"
        case = simulate_case(head, str(args.head), axis=args.axis, thickness=4.0, snr=snr or None)
        region = lr_region(case, brain)
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            fit = fit_to_scan(pipe, case.lr, work_dir=work, sampling=sampling(), scan_noise_std=case.noise_std,
                              progress=False, config=AdaptationConfig(holdout_every=args.holdout_every))
        kept = fit.pipe
        kept.set_progress_bar_config(disable=True)
        fit_s = time.perf_counter() - tic
        tic = time.perf_counter()
        out = super_resolve(kept, case, output_type="np", keep_samples=False, **sampling())
        sample_s = time.perf_counter() - tic
        mean, std = (np.asarray(a, np.float64).reshape(case.hr.shape) for a in (out.mean, out.std))
        truth = case.hr.data.astype(np.float64)
        head_mask = foreground(truth)
        regions = {"brain": brain & head_mask, "head": head_mask, "outside the brain": head_mask & ~brain}
        grid = Volume(np.zeros(case.hr.shape, np.float32), case.hr.affine)
        run_region = resample_to(case.lr.with_data(region.astype(np.float32)), grid, order=0).data > 0.5
        err = np.abs(mean - truth)
        common = {"psnr, brain": psnr(mean, truth, regions["brain"], float(np.ptp(truth[head_mask]))),
                  **{f"λ90, {k}": float(np.quantile(err[m] / np.maximum(std[m], 1e-12), 0.9)) if m.any()
                     else float("nan") for k, m in regions.items()},
                  "fit s": fit_s, "sample s": sample_s, "kept": float(kept.model_card.adapted.kept == "fine-tuned")}
        with tempfile.TemporaryDirectory() as scratch:
            cache = scratch if args.keep is None else args.keep / f"{label.replace(' ', '_')}"
            if args.keep is not None:
                keep_arrays(cache, mean, std, truth, regions, kept.model_card.adapted, case)
            clean = simulate_case(head, str(args.head), axis=args.axis, thickness=4.0).lr
            oracle_variant = ("one scale, clean references (oracle)", None, "clean")
            for name, where, noise in VARIANTS + ((oracle_variant,) if case.noise_std > 0 else ()):
                if noise == "extrapolate" and case.noise_std == 0:
                    continue
                cal = variant(kept, case, clean, region if where else None, Path(cache), noise, 0, sampling())
                half = cal.halfwidth(std, mean, case.noise_std, run_region if where else None)
                r = common | coverages(err, half, regions) | {
                    "λ̂ (inside)": cal.scale,
                    "λ̂ outside": float("nan") if cal.outside_scale is None else cal.outside_scale,
                    "λ̂ against noisy references": cal.details.get("noisy_reference_scale", cal.scale)}
                columns[f"{name}, {label}"] = r
                print(label, name, {k: round(v, 4) for k, v in r.items()}, flush=True)
            for seed in args.calibration_seeds:
                for name, _, noise in (VARIANTS[0], VARIANTS[1], oracle_variant):
                    if noise != "keep" and case.noise_std == 0:
                        continue
                    cal = variant(kept, case, clean, None, Path(cache), noise, seed,
                                  seeded_sampling(args.samples, args.steps, first=1000 * seed))
                    r = common | coverages(err, cal.halfwidth(std, mean, case.noise_std), regions) | {
                        "λ̂ (inside)": cal.scale}
                    columns[f"{name}, seed {seed}, {label}"] = r
                    print(label, name, "seed", seed, {k: round(v, 4) for k, v in r.items()}, flush=True)
        if args.thin_oracle and case.noise_std == 0:
            thin = thin_slices(case, kept.model_card.adapted.held_out_slices, args.axis)
            cal = calibrate_on_scan(kept, thin, progress=False, **sampling()).calibration
            r = common | coverages(err, cal.halfwidth(std, mean), regions) | {"λ̂ (inside)": cal.scale}
            columns[f"one scale, thin held-out slices (oracle), {label}"] = r
            print(label, "thin oracle", {k: round(v, 4) for k, v in r.items()}, flush=True)
    figures = ["psnr, brain", "coverage, brain", "coverage, head", "coverage, outside the brain", "λ̂ (inside)",
               "λ̂ outside", "λ̂ against noisy references", "λ90, brain", "λ90, head", "λ90, outside the brain",
               "kept", "fit s", "sample s"]
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}, commit {commit}): {head.source}, "
             f"{head.shape} voxels, 4 mm Gaussian slices along RAS+ axis {args.axis}; `fit_to_scan` at its defaults, "
             f"{args.samples} samples x {args.steps} steps; kept = 1 where the fine-tuned UNet was kept.", ""]
    report("\n".join(lines) + "\n" + figures_table(columns, figures), args.output)


if __name__ == "__main__":
    main()
