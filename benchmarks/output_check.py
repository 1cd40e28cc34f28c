"""Check a super-resolve run against its truth: PSNR, the coverage of its intervals and how its std ranks the error,
in the truth's foreground (or in ``--mask``, or with ``--outside`` in the foreground outside it): also the RMSE,
the median std and λ90, the factor the std needs for 90 % coverage there.

    python benchmarks/output_check.py --run runs/bench/whole_adapt30 --truth runs/bench/whole_case/hr.nii.gz

``--run`` is the folder of a ``gen-sr super-resolve`` run written with ``--output DIR/sr.nii.gz --std DIR/std.nii.gz``
(its ``sr.json`` gives the calibrated interval's scale); the truth is on the output's grid (e.g. the ``hr.nii.gz`` of
``whole_brain_speed.py --save-case``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gen_sr.eval.metrics import foreground, psnr
from gen_sr.eval.uncertainty import coverage, spearman, spearman_ceiling
from gen_sr.run_record import RunRecord
from gen_sr.volume import load_volume


def check(run: Path, truth_path: Path, mask_path: Path | None = None, outside: bool = False) -> dict[str, float]:
    truth = load_volume(truth_path).canonical().data.astype(np.float64)
    mean = load_volume(run / "sr.nii.gz").canonical().data.astype(np.float64)
    std = load_volume(run / "std.nii.gz").canonical().data.astype(np.float64)
    if not truth.shape == mean.shape == std.shape:
        raise SystemExit(f"shapes differ: truth {truth.shape}, mean {mean.shape}, std {std.shape}")
    inside = foreground(truth)
    if mask_path is not None:
        mask = load_volume(mask_path).canonical().data > 0
        if mask.shape != truth.shape:
            raise SystemExit(f"shapes differ: truth {truth.shape}, mask {mask.shape}")
        inside = inside & ~mask if outside else mask
    err = np.abs(mean - truth)
    grad = np.sqrt(sum(g**2 for g in np.gradient(mean)))
    risk = RunRecord.from_dict(json.loads((run / "sr.json").read_text())).risk
    scale = None if risk is None else risk.scale
    row = {"voxels": float(inside.sum()), "psnr": psnr(mean, truth, inside, float(np.ptp(truth[inside]))),
           "rmse": float(np.sqrt(np.mean(err[inside] ** 2))), "median std": float(np.median(std[inside])),
           "λ90": float(np.quantile(err[inside] / np.maximum(std[inside], 1e-12), 0.9)),
           "coverage ±2σ": float(coverage(std, err, 2.0, inside)),
           "spearman(std, |err|)": spearman(std, err, inside), "spearman ceiling": spearman_ceiling(std, inside),
           "spearman(std, |∇ mean|)": spearman(std, grad, inside)}
    if scale is not None:
        row[f"coverage ±{scale:.2f}σ (calibrated)"] = float(coverage(std, err, scale, inside))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--mask", type=Path, help="where to measure, on the truth's grid (nonzero inside; default: "
                                                   "the truth's foreground), e.g. the brain")
    parser.add_argument("--outside", action="store_true",
                        help="measure in the truth's foreground outside --mask instead (e.g. the scalp)")
    args = parser.parse_args()
    for name, value in check(args.run, args.truth, args.mask, args.outside).items():
        print(f"{name:32s} {value:.4g}")


if __name__ == "__main__":
    main()
