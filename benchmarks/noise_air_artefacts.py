"""How far the noise std read from a scan's air (``gen_sr.physics.scan_noise_std``, the commands' default) is off
where the air is not what the estimator assumes: a Nyquist ghost in it, noise that varies over the field of view
(a parallel reconstruction's g-factor), or a scan stored as integers whose air noise is a few steps wide. Readings
only, no sampling; figures in ``benchmarks/NOISE_ESTIMATE.md``.

    python benchmarks/noise_air_artefacts.py [--head robex] [--subject 11] [--snr 30] [--ghosts 0 0.02 0.05 0.1 0.2]
        [--g-factors 0 0.25 0.5 1] [--steps 0.7 1.5 3]

The scan: a synthetic subject's whole head and field of view, its background set to 0 (``without_air`` of
``data_disagreement.py``, so that the air holds only what is added), 4 mm Gaussian axial slices, noise-free; then per
row

* **ghost** ``g``: the slices plus ``g`` times themselves shifted by half the field of view along the in-plane axis
  A-P (RAS+ 1, the usual phase-encoding direction of an axial scan), before complex Gaussian noise of std ``σ`` (the
  std of SNR ``--snr``), magnitude taken;
* **g-factor** ``a``: the noise std varies as ``σ (1 + a w)``, ``w`` a smooth bump that is 1 at the centre of the
  field of view and falls towards its edges (a Gaussian of 1/4 the field of view per axis), as a parallel
  reconstruction's g-factor does;
* **stored as integers** ``k``: the noisy slices (std ``σ``) rounded to whole multiples of ``σ / k`` (the noise is
  ``k`` steps wide), as a scanner's int16 file with that ``scl_slope`` holds them.

Printed per row: the std read, and the std that the head itself holds (the root mean square of the per-voxel std
over the head's foreground), and their ratio.

``--psnr SPEC ...`` instead: for each scan spec of ``data_disagreement.py`` (``NAME[+air0]:N``: its 24 mm central
coronal slab, cropped to the foreground) and each g-factor of ``--g-factors``, the slices with that noise are
super-resolved by ``--model`` (8 samples, seed 0) with no noise std, the std read from their air, and the head's RMS
std, and the PSNR in the truth's foreground is printed beside cubic interpolation's: what a low reading costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.cases import simulate_case
from gen_sr.eval.metrics import foreground
from gen_sr.physics import noise_std_for_snr, scan_noise_std
from gen_sr.sample_data import synthetic_subject

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_disagreement import without_air


def noisy(signal: np.ndarray, std: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``signal`` plus complex Gaussian noise of ``std`` per real channel (per voxel or one)."""
    return np.hypot(signal + std * rng.standard_normal(signal.shape), std * rng.standard_normal(signal.shape))


def centre_bump(shape: tuple[int, ...]) -> np.ndarray:
    """1 at the centre of an array of ``shape``, a Gaussian of a quarter of its extent per axis."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 4) for n in shape], indexing="ij")
    return np.exp(-0.5 * sum(g**2 for g in grids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", default="robex", help="a sample head (default: robex, with skull)")
    parser.add_argument("--subject", type=int, default=11, help="its synthetic subject (default: 11, a design one)")
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--ghosts", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--g-factors", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    parser.add_argument("--steps", type=float, nargs="+", default=[0.7, 1.5, 3.0],
                        help="noise std in steps of integer storage")
    parser.add_argument("--psnr", nargs="+", metavar="SPEC", help="super-resolve these slabs (see the docstring)")
    parser.add_argument("--model", default="models/heads2d")
    args = parser.parse_args()
    if args.psnr:
        return psnr_with_g_factors(args)

    name = f"{args.head} subject {args.subject}, air zeroed"
    hr = without_air(synthetic_subject(args.subject, "t1", args.head))  # its whole field of view
    case = simulate_case(hr, name)  # 4 mm Gaussian axial slices, noise-free
    clean = case.lr.data.astype(np.float64)
    sigma = noise_std_for_snr(torch.from_numpy(clean), args.snr)
    head = foreground(clean)
    print(f"{name}: slices {clean.shape}, SNR {args.snr:g}, sigma {sigma:.4g}")
    print("| artefact | std read | the head's std | read / head's |\n| --- | --- | --- | --- |")
    for g in args.ghosts:
        signal = clean + g * np.roll(clean, clean.shape[1] // 2, axis=1)
        read = scan_noise_std(case.lr.with_data(noisy(signal, sigma, np.random.default_rng(0))))
        _row(f"ghost {g:g}", read, sigma)
    for a in args.g_factors:
        std = sigma * (1 + a * centre_bump(clean.shape))
        read = scan_noise_std(case.lr.with_data(noisy(clean, std, np.random.default_rng(0))))
        _row(f"g-factor {a:g}", read, float(np.sqrt(np.mean(std[head] ** 2))))
    for k in args.steps:
        step = sigma / k
        stored = np.round(noisy(clean, sigma, np.random.default_rng(0)) / step) * step
        _row(f"stored as integers, noise {k:g} steps", scan_noise_std(case.lr.with_data(stored)), sigma)


def psnr_with_g_factors(args: argparse.Namespace) -> None:
    """``--psnr``: PSNR with no std, the std read from the air and the head's RMS std, per scan and g-factor."""
    from data_disagreement import brain_psnr, scan_volume

    from gen_sr.pipelines import LatentDiffusionSRPipeline

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    print("| scan | g-factor a | cubic | no std | read (std) | head's RMS std (std) | read − none | read − RMS |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.psnr:
        case = simulate_case(scan_volume(spec, 24.0)[0], spec)
        clean, truth = case.lr.data.astype(np.float64), case.hr.data.astype(np.float64)
        sigma = noise_std_for_snr(torch.from_numpy(clean), args.snr)
        y = torch.from_numpy(clean)[None, None]
        cubic = brain_psnr(case.operator.interpolate(y, "cubic")[0, 0].numpy(), truth)
        for a in args.g_factors:
            std = sigma * (1 + a * centre_bump(clean.shape))
            lr = case.lr.with_data(noisy(clean, std, np.random.default_rng(0)).astype(np.float32))
            given = {"none": 0.0, "read": scan_noise_std(lr) or 0.0,
                     "rms": float(np.sqrt(np.mean(std[foreground(clean)] ** 2)))}
            psnr = {k: brain_psnr(np.asarray(pipe(lr, operator=case.operator, noise_std=v, num_samples=8,
                                                  generator=torch.Generator().manual_seed(0), keep_samples=False,
                                                  output_type="np").mean, np.float64), truth)
                    for k, v in given.items()}
            print(f"| {spec} | {a:g} | {cubic:.2f} | {psnr['none']:.2f} | {psnr['read']:.2f} ({given['read']:.4g}) | "
                  f"{psnr['rms']:.2f} ({given['rms']:.4g}) | {psnr['read'] - psnr['none']:+.2f} | "
                  f"{psnr['read'] - psnr['rms']:+.2f} |", flush=True)


def _row(label: str, read: float | None, truth: float) -> None:
    print(f"| {label} | {'none' if read is None else f'{read:.4g}'} | {truth:.4g} | "
          f"{'' if read is None else f'{read / truth:.3f}'} |", flush=True)


if __name__ == "__main__":
    main()
