"""The figures of issue 14 on the held-out head (Colin27 by default, which no training, calibration or design choice
has seen): quality against the best interpolation and the regression baseline, and whether the sample spread
follows the error.

    python benchmarks/prior_benchmark.py --model models/heads2d [--regression-model models/heads2d_regression] \\
        [--axis 2] [--contrast t1|t2like] [--slab 24] [--samples 8] [--steps 50] [--output PATH]

The head is cut to a slab of ``--slab`` mm through its centre, coronal (an axial one for a coronal stack, ``--axis
1``; 0: the whole head, which takes hours on a CPU), degraded with 4 mm Gaussian slices along RAS+ ``--axis`` (2: an
axial stack, 1: coronal), noise-free and at SNR 30, and super-resolved with its exact operator.
Everything is measured inside the brain (Colin27's own brain-extracted image, ``colin27_brain``):

* PSNR of the SR mean against the best interpolation (trilinear, cubic, sinc) and the regression baseline;
* Spearman(std, |err|) and its ceiling (what it would be were the errors drawn from N(0, std²): the most a std map
  of that shape allows); the coverage of mean ± 2 std; ``λ90``: the factor by which std must be scaled for 90 %
  coverage on this head (a diagnostic of how informative the std is, not a calibration);
* the coverage of the model's calibrated interval, and Spearman(risk, |err|) against Spearman(risk, |∇ mean|);
* the autoencoder's share: the reconstruction error of the truth through the autoencoder (after projection onto
  the data), the same in every sample, against the sample std (median ratio in the brain).

``--contrast t2like`` inverts the brain's intensities (CSF bright, white matter dark; skull-stripped): a crude T2-like
contrast the T1-only demo model never saw.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from gen_sr.eval.baselines import BASELINES, baseline
from gen_sr.eval.cases import Case, held_out_head, simulate_case, super_resolve
from gen_sr.eval.metrics import psnr, ssim_volume
from gen_sr.eval.tables import figures_table
from gen_sr.eval.uncertainty import coverage, spearman_ceiling
from gen_sr.io import atomic_write
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.pipelines.guidance import final_projection
from gen_sr.pipelines.tiling import SliceTiler
from gen_sr.run_record import run_calibration
from gen_sr.schedulers import SCHEDULERS, scheduler_from_name
from gen_sr.schedulers.ddim import describe_sampler


def _spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(spearmanr(a[mask], b[mask])[0])


def autoencoder_error(pipe: LatentDiffusionSRPipeline, case: Case) -> np.ndarray:
    """``|P(D(E(x))) − x|`` in input units: the truth through the autoencoder slice by slice (across the pipeline's
    default slicing axis, for a 2D model), projected onto the data as every sample is."""
    norm = pipe.intensity_normalization(case.lr.data)
    x = torch.from_numpy(norm(case.hr.data.astype(np.float32)))[None, None]
    axis = pipe.input_axes(case.lr, case.operator)[0]
    shape = case.operator.hr_shape
    tiler = SliceTiler(shape, pipe.default_slice_normal(shape, axis), axis, pipe.tile_multiple)
    with torch.no_grad():
        tiles = torch.cat([pipe.vae.decode_latent(pipe.vae.encode_latent(t)) for t in tiler.split(x).split(32)])
        y = torch.from_numpy(norm(case.lr.data.astype(np.float32)))[None, None].double()
        rec = final_projection(tiler.merge(tiles.double()), case.operator, y, case.noise_std / norm.scale)
    return np.abs(norm.inverse(rec[0, 0].numpy()) - case.hr.data)


def measure(pipe: LatentDiffusionSRPipeline, regression: LatentDiffusionSRPipeline | None, case: Case,
            brain: np.ndarray, kwargs: dict) -> dict[str, float]:
    truth = case.hr.data.astype(np.float64)
    data_range = float(np.ptp(truth[brain]))
    out = super_resolve(pipe, case, output_type="np", keep_samples=False, **kwargs)
    err = np.abs(truth - out.mean)
    row = {"psnr": psnr(out.mean, truth, brain, data_range), "ssim": ssim_volume(out.mean, truth, brain, data_range)}
    row |= {f"psnr {b}": psnr(baseline(case, b), truth, brain, data_range) for b in BASELINES}
    if regression is not None:
        reg = super_resolve(regression, case, output_type="np", keep_samples=False, num_samples=1,
                            generator=torch.Generator().manual_seed(0), batch_size=kwargs.get("batch_size", 64))
        row["psnr regression"] = psnr(reg.mean, truth, brain, data_range)
    std = np.asarray(out.std, np.float64)
    ratio = np.divide(err, std, out=np.full_like(err, np.inf), where=std > 0)
    grad = np.sqrt(sum(g**2 for g in np.gradient(np.asarray(out.mean, np.float64))))
    risk = np.asarray(out.risk, np.float64)
    row |= {"spearman(std, |err|)": _spearman(std, err, brain), "spearman ceiling": spearman_ceiling(std, brain),
            "coverage ±2σ": float(coverage(std, err, 2.0, brain)),
            "λ90": float(np.quantile(ratio[brain], 0.9)),
            "spearman(risk, |err|)": _spearman(risk, err, brain), "spearman(risk, |∇ mean|)": _spearman(risk, grad,
                                                                                                         brain)}
    if (calibration := run_calibration(pipe, out.record)) is not None:  # the record the run's risk map used
        half = calibration.halfwidth(std, np.asarray(out.mean, np.float64), case.noise_std)
        row["coverage calibrated"] = float(coverage(half, err, 1.0, brain))
        row["calibrated scale"] = calibration.scale
    row["autoencoder error / std (median)"] = float(np.median(autoencoder_error(pipe, case)[brain])
                                                    / np.median(std[brain]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--regression-model")
    parser.add_argument("--brain", default="colin27")
    parser.add_argument("--contrast", choices=("t1", "t2like"), default="t1")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=2, help="RAS+ axis of the thick slices")
    parser.add_argument("--slab", type=float, default=24.0, help="slab width in mm (0: the whole head)")
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS),
                        help="the sampler (default: the model folder's); its config entries stay the folder's")
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    regression = LatentDiffusionSRPipeline.from_pretrained(args.regression_model) if args.regression_model else None
    if regression is not None:
        regression.set_progress_bar_config(disable=True)
    trained = {n.removesuffix("_brain") for n in pipe.model_card.trained_on}
    if args.brain in trained:
        raise SystemExit(f"{args.model} was trained on {args.brain}: measure on a head it never saw")
    slab_axis = 1 if args.axis != 1 else 2  # a coronal stack is cut into an axial slab
    head, brain = held_out_head(args.brain, contrast=args.contrast, slab_mm=args.slab, slab_axis=slab_axis)
    kwargs = {"num_samples": args.samples, "num_inference_steps": args.steps, "batch_size": 64,
              "generator": [torch.Generator().manual_seed(k) for k in range(args.samples)]}
    rows = {}
    for snr in (None, 30.0):
        case = simulate_case(head, "held-out", axis=args.axis, thickness=args.thickness, snr=snr)
        rows["noise-free" if snr is None else f"SNR {snr:g}"] = measure(pipe, regression, case, brain, kwargs)
    columns = list(next(iter(rows.values())))
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}, commit {commit}): {head.source}, "
             f"{head.shape} voxels, {args.thickness:g} mm Gaussian slices along RAS+ axis {args.axis}, contrast "
             f"{args.contrast}, {args.samples} samples x {args.steps} steps of {describe_sampler(pipe.scheduler)}; "
             "inside the brain.", ""]
    report("\n".join(lines) + "\n" + figures_table(rows, columns), args.output)


def report(text: str, output: str | None) -> None:
    """Print a benchmark's table and, with ``output``, write it there (atomically)."""
    print(text)
    if output:
        atomic_write(Path(output), lambda tmp: tmp.write_text(text))


if __name__ == "__main__":
    main()
