"""The noise-aware projection's target under Rician noise: the Gaussian one (``m σ²``, the pipeline's) against the
magnitude image's expected residual (``AcquisitionOperator.soft_project(noise="rician")``), in whole runs of the
pipeline (``benchmarks/DATA_DISAGREEMENT.md``, "The projection's target under Rician noise")

    python benchmarks/rician_projection.py --scans mni152:11 robex_brain:11 [--crop] [--snr 30] [--slab 24] \\
        [--model models/heads2d] [--samples 8] [--from-truth]

Each scan (``NAME:N``, synthetic subject ``N`` of a sample head) is cut to its central coronal slab of ``--slab`` mm
(with ``--crop``, cropped to its foreground with a 4-voxel margin, as ``data_disagreement.py`` does; else its whole
field of view, air and all), and super-resolved from 4 mm Gaussian axial slices with Rician noise at ``--snr``, given
the true noise std, twice with the same seed: every projection of the run (the guidance's and the final one) with the
Gaussian target, then with the Rician one. The Rician target's ``ν = max(A x, 0)`` is taken in the pipeline's
normalised units, whose zero is the 0.5th percentile of the scan (a tenth of σ in Rayleigh air): not offset here.
With ``--from-truth``, no sampling: each target's projection of the truth itself, and how far it moves the head
(the truth above 3σ; RMS over σ) and the air (mean over σ).
Printed per run: the PSNR in the brain (the truth's foreground) and over the whole slab, the mean and RMS error in
the air over σ, and the coverage in the brain of the calibrated interval the run's risk map used.
"""

from __future__ import annotations

import argparse
import time
from typing import Literal

import numpy as np
import torch

from gen_sr.eval.cases import central_slab, crop_to_foreground, simulate_case
from gen_sr.eval.metrics import foreground
from gen_sr.eval.uncertainty import coverage
from gen_sr.physics import AcquisitionOperator
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.run_record import run_calibration
from gen_sr.sample_data import synthetic_subject


class _Target(AcquisitionOperator):
    """The same acquisition, whose noise-aware projections take the target of ``noise``."""

    noise: Literal["gaussian", "rician"] = "gaussian"
    calls = 0

    def soft_project(self, x: torch.Tensor, y: torch.Tensor, noise_std, *, noise=None) -> torch.Tensor:
        type(self).calls += 1
        return super().soft_project(x, y, noise_std, noise=self.noise)


def with_target(op: AcquisitionOperator, noise: Literal["gaussian", "rician"]) -> AcquisitionOperator:
    out = _Target(op.transforms, op.hr_shape, op.hr_spacing, rcond=op.rcond)
    out.noise = noise
    return out


def _psnr(err: np.ndarray, mask: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak**2 / np.mean(err[mask] ** 2)))


def scan_case(spec: str, args: argparse.Namespace):
    """The central coronal slab of synthetic subject ``N`` of head ``NAME`` (``spec`` ``NAME:N``), cropped with
    ``--crop``, and its 4 mm Gaussian axial slices at ``--snr``."""
    name, _, subject = spec.partition(":")
    slab = central_slab(synthetic_subject(int(subject), "t1", name), args.slab, 1)
    return simulate_case(crop_to_foreground(slab) if args.crop else slab, spec, axis=2, thickness=4.0, snr=args.snr)


def from_truth(args: argparse.Namespace) -> None:
    print("| scan | field of view | target | head: RMS move / σ | air: mean move / σ |")
    print("| --- | --- | --- | --- | --- |")
    for spec in args.scans:
        case = scan_case(spec, args)
        x = torch.from_numpy(case.hr.data.astype(np.float64))[None, None]
        y = torch.from_numpy(np.asarray(case.lr.data, np.float64))[None, None]
        head = case.hr.data > 3 * case.noise_std
        for noise in ("gaussian", "rician"):
            moved = (case.operator.soft_project(x, y, case.noise_std, noise=noise) - x)[0, 0].numpy() / case.noise_std
            print(f"| {spec} | {'cropped' if args.crop else 'whole slab'} {case.hr.shape} | {noise} | "
                  f"{np.sqrt(np.mean(moved[head] ** 2)):.3f} | {moved[~head].mean():+.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", nargs="+", required=True, help="NAME:N (synthetic subject N of a sample head)")
    parser.add_argument("--crop", action="store_true", help="crop each slab to its foreground (4-voxel margin)")
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--slab", type=float, default=24.0, help="coronal slab thickness, mm")
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--from-truth", action="store_true", help="project the truth only (no sampling)")
    args = parser.parse_args()
    if args.from_truth:
        from_truth(args)
        return
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    print("| scan | field of view | target | PSNR brain (dB) | PSNR slab (dB) | air: mean error / σ "
          "| air: RMS error / σ | calibrated coverage (brain) | projections | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.scans:
        case = scan_case(spec, args)
        truth = case.hr.data.astype(np.float64)
        brain = foreground(truth)
        peak = truth.max() - truth.min()
        for noise in ("gaussian", "rician"):
            _Target.calls, tic = 0, time.perf_counter()
            out = pipe(case.lr, operator=with_target(case.operator, noise), noise_std=case.noise_std,
                       num_samples=args.samples, generator=torch.Generator().manual_seed(0), keep_samples=False,
                       output_type="np")
            seconds = time.perf_counter() - tic
            mean = np.asarray(out.mean, np.float64)
            err = mean - truth


            calibration = run_calibration(pipe, out.record)
            covered = (coverage(calibration.halfwidth(np.asarray(out.std, np.float64), mean, case.noise_std), err,
                                1.0, brain) if calibration is not None else float("nan"))
            air = err[~brain] / case.noise_std
            print(f"| {spec} | {'cropped' if args.crop else 'whole slab'} {case.hr.shape} | {noise} | "
                  f"{_psnr(err, brain, peak):.3f} | {_psnr(err, np.ones_like(brain), peak):.3f} | {air.mean():+.3f} | "
                  f"{np.sqrt(np.mean(air**2)):.3f} | {covered:.3f} | {_Target.calls} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
