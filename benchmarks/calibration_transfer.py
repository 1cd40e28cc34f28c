"""Does a calibration fitted on some parts of the brain hold on another? Leave-one-out over the calibration volumes
of the MNI152 template, then one measurement on the held-out slab.

    python benchmarks/calibration_transfer.py --model models/heads2d --output-dir runs/calibration_transfer

1. The calibration volumes: the model's reserved calibration slab (training never saw it) in ``--pieces`` pieces
   across sagittal slices, as ``benchmarks/calibration_volumes.py`` writes them; for a model without one, the
   training region cut into slabs as thick as the held-out slab. Each is degraded (4 mm Gaussian slices, SNR 30) and
   super-resolved once; the outputs are cached in ``--output-dir`` (``<name>.npz``), so a second run only
   re-analyses.
2. For every interval family, fit ``λ̂`` by conformal risk control on the blocks of all calibration volumes but one
   and measure coverage on the left-out one. The spread of these coverages is the transfer error that a new region
   should expect; the held-out slab plays no part in it.
3. Fit on blocks of every calibration volume and measure coverage on the held-out slab, once, for each family.
4. With ``--in-sample``, also super-resolve the training region's slabs, to compare errors where the model was
   trained with errors where it was not (the |error| / std quantiles).

Prints and writes ``calibration_transfer.md`` and ``.json`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

from gen_sr.eval.calibration import (
    CalibrationVolume,
    calibration_volumes,
    choose_shape,
    fit_calibration,
    fit_shape,
    split_units,
)
from gen_sr.eval.cases import calibration_slabs, has_calibration_slab, heldout_case, simulate_case, training_slabs
from gen_sr.eval.metrics import foreground
from gen_sr.eval.uncertainty import miss_rate
from gen_sr.io import write_json
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import IntervalShape
from gen_sr.sample_data import load_mni152


def cached_volumes(pipe, cases, out: Path, samples: int, steps: int) -> list[CalibrationVolume]:
    """Each case super-resolved once (kept in ``out/<name>.npz``), as calibration volumes."""
    return calibration_volumes(pipe, cases, cache=out, progress=False, num_samples=samples,
                               num_inference_steps=steps, generator=[torch.Generator().manual_seed(k)
                                                                     for k in range(samples)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--blocks", type=int, default=12, help="calibration units per calibration volume")
    parser.add_argument("--pieces", type=int, default=4, help="pieces of the calibration slab (default: 4)")
    parser.add_argument("--in-sample", action="store_true", help="also measure the training region's slabs")
    parser.add_argument("--cache-only", action="store_true", help="super-resolve and cache, skip the analysis")
    args = parser.parse_args()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    t1 = load_mni152("t1")
    acq = {"axis": pipe.sr_axis, "thickness": args.thickness, "snr": args.snr}
    reserved = has_calibration_slab(pipe)
    training = [(f"train {n}", v) for n, v in training_slabs(pipe, t1)]
    named = [(f"calibration {n}", v) for n, v in calibration_slabs(pipe, t1, pieces=args.pieces)] if reserved \
        else list(training)
    n_calibration = len(named)
    if reserved and args.in_sample:
        named += training
    cases = [simulate_case(v, n, seed=1 + i, **acq) for i, (n, v) in enumerate(named)]
    cases.append(heldout_case(pipe, t1, "held-out", thickness=args.thickness, snr=args.snr))
    volumes = cached_volumes(pipe, cases, out, args.samples, args.steps)
    if not args.cache_only:
        analyse(volumes[:n_calibration], volumes[-1], out, args.blocks, in_sample=volumes[n_calibration:-1])


def analyse(train: list[CalibrationVolume], held: CalibrationVolume, out: Path, blocks: int,
            alpha: float = 0.1, in_sample: Sequence[CalibrationVolume] = ()) -> None:
    """The tables, for calibration volumes ``train`` (the chosen shape, fitted on all of them, is measured on
    ``held``); ``in_sample`` volumes enter only the |error| / std quantiles."""
    chosen, rows = choose_shape(train, blocks=blocks, alpha=alpha, method="crc")
    for row in rows:  # every candidate fitted on all calibration volumes, measured on the held-out slab (not chosen on)
        shape = IntervalShape(**row["shape"])
        cal = fit_shape(train, shape, blocks=blocks, alpha=alpha, method="crc")
        u = shape.spread(held.std, held.mean, held.noise_std)
        row |= {"scale": cal.scale, "heldout_coverage": held.coverage(cal),
                "heldout_spearman": float(spearmanr(u[held.mask], np.abs(held.error[held.mask]))[0])}
    names = [v.name for v in train]
    lines = [f"Leave-one-out over the calibration volumes ({', '.join(names)}); {blocks} blocks of equal brain "
             f"volume per volume; conformal risk control at α = {alpha:g}. The shape is chosen on the left-out "
             "coverages only; the held-out columns are measured after fitting on every calibration volume.", "",
             "| std smoothing (voxels) | noise floor | edge weight | left-out coverages | RMS from target "
             "| λ̂ | held-out coverage | held-out Spearman |", "|" + " --- |" * 8]
    for row in rows:
        sh = row["shape"]
        mark = " **(chosen)**" if IntervalShape(**sh) == chosen else ""
        lines.append(f"| {sh['smoothing']:g} | {sh['noise_floor']:g} | {sh['edge_weight']:g}{mark} | "
                     f"{', '.join(f'{c:.3f}' for c in row['coverages'])} | {row['rms']:.4f} | {row['scale']:.3g} | "
                     f"{row['heldout_coverage']:.4f} | {row['heldout_spearman']:.3f} |")
    lines += ["", f"Voxel-wise {1 - alpha:.0%} point of |error| / std (the λ a volume alone would need): "
              + ", ".join(f"{v.name} {np.quantile(np.abs(v.error[v.mask]) / v.std[v.mask], 1 - alpha):.2f}"
                          for v in [*train, *in_sample, held]) + "."]
    lines += ["", "Interleaved blocks (calibrate on every other block of every calibration volume, measure on the "
              "blocks between: exchangeable up to neighbour correlation, the case conformal calibration is made "
              "for): " + ", ".join(f"{sh} {interleaved(train, sh, blocks, alpha):.4f}"
                                   for sh in (IntervalShape(), chosen)) + "."]
    lines += ["", "Separate λ̂ per band of distance (0-2, 2-5, > 5 voxels) to the SR mean's foreground surface "
              "(Mondrian), left-out coverages:", ""]
    lines += [f"- {sh}: {', '.join(f'{c:.3f}' for c in surface_bands(train, sh, blocks, alpha))}"
              for sh in (IntervalShape(), chosen)]
    text = "\n".join(lines) + "\n"
    (out / "calibration_transfer.md").write_text(text)
    write_json(out / "calibration_transfer.json", {"rows": rows, "chosen": dataclasses.asdict(chosen),
                                                   "slabs": names, "blocks": blocks, "alpha": alpha})
    print(text)


def interleaved(volumes: list[CalibrationVolume], shape: IntervalShape, blocks: int, alpha: float) -> float:
    """Coverage of the odd-numbered blocks under a calibration (conformal risk control) fitted on the even ones."""
    errors, spreads, masks = split_units(volumes, shape, blocks=blocks)
    cal = fit_calibration(errors[0::2], spreads[0::2], masks[0::2], alpha=alpha, method="crc")
    test = list(zip(errors[1::2], spreads[1::2], masks[1::2], strict=True))
    missed = sum(float(miss_rate(e, u, cal.scale, m)) * m.sum() for e, u, m in test)
    return 1.0 - missed / sum(m.sum() for _, _, m in test)


def surface_bands(train: list[CalibrationVolume], shape: IntervalShape, blocks: int, alpha: float,
                  bands: tuple = ((0, 2), (2, 5), (5, np.inf))) -> list[float]:
    """Leave-one-out coverages when each band of distance (voxels) to the SR mean's foreground surface gets its
    own λ̂; the left-out volume is scored inside the bands."""
    def band_volumes(v: CalibrationVolume) -> list[CalibrationVolume]:
        depth = ndimage.distance_transform_edt(np.pad(foreground(v.mean), 1))[1:-1, 1:-1, 1:-1]
        return [dataclasses.replace(v, mask=v.mask & (depth > lo) & (depth <= hi)) for lo, hi in bands]

    per_band = [band_volumes(v) for v in train]
    coverages = []
    for k, v in enumerate(train):
        halfwidth = np.zeros_like(v.std)
        for b in range(len(bands)):
            rest = [per_band[j][b] for j in range(len(train)) if j != k]
            lam = fit_shape(rest, shape, blocks=blocks, alpha=alpha, method="crc").scale
            halfwidth += lam * shape.spread(v.std, v.mean, v.noise_std) * per_band[k][b].mask
        inside = np.any([band.mask for band in per_band[k]], axis=0)
        coverages.append(1.0 - float(miss_rate(v.error, halfwidth, 1.0, inside)))
    return coverages


if __name__ == "__main__":
    main()
