"""Held-out subjects: does a calibration fitted on some subjects cover the truth at the target rate on others?

With one template there is one brain, and no region of it is exchangeable with another
(``benchmarks/CALIBRATION_TRANSFER.md``). :func:`gen_sr.sample_data.synthetic_subject` makes a population from it:
each seed deforms the template smoothly and changes its bias field and contrast. Subjects drawn this way are
exchangeable, as conformal calibration assumes; they vary less than real brains.

    for s in 1 2 3 4 5 6 7 8; do
      gen-sr sample-data --subject $s --output runs/subjects/calibration/subject_$s.nii.gz
    done
    gen-sr calibrate --model models/heads2d --data runs/subjects/calibration --region heldout --snr 30 \\
        --blocks 12 --interval auto --method crc --batch-size 64 --overwrite
    python benchmarks/subject_calibration.py --model models/heads2d --output-dir runs/subject_calibration

This script measures the calibration on *other* subjects (``--seeds``, never used to calibrate) and on the template
itself, all on the model's held-out slab (training never saw it), degraded as the calibration was (4 mm Gaussian
slices, SNR 30). ``--other-regions`` adds the template's training slabs, to show how a calibration made for one
region fares in others. Each case is super-resolved once and cached in ``--output-dir``; ``--compare`` names folders
of other calibrations to score on the same outputs. Prints and writes ``subject_calibration.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.calibration import CalibrationVolume, calibration_volumes, case_grid
from gen_sr.eval.cases import heldout_case, simulate_case, training_slabs
from gen_sr.io import write_json
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.risk import Calibration
from gen_sr.sample_data import load_mni152, synthetic_subject


def seeds(text: str) -> list[int]:
    """``"101-108"`` or ``"1,5,9"``."""
    if "-" in text:
        lo, hi = (int(t) for t in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(t) for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a calibrated model folder")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seeds", type=seeds, default=seeds("101-108"), help="test subjects (default: 101-108)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="DIR",
                        help="folders holding other calibration.json files, scored on the same outputs")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--other-regions", action="store_true",
                        help="also score the template's training slabs (in-sample regions; the same names and seeds "
                             "as calibration_transfer.py, so its cached outputs can be reused)")
    args = parser.parse_args()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.calibration is None:
        parser.error(f"{args.model} has no calibration.json; run gen-sr calibrate first")
    calibrations = {"model": pipe.calibration} | {p: Calibration.load(p) for p in args.compare}
    if None in calibrations.values():
        parser.error(f"no calibration.json in {[p for p, c in calibrations.items() if c is None]}")
    acq = {"thickness": args.thickness, "snr": args.snr}
    cases = [heldout_case(pipe, synthetic_subject(s), f"subject {s}", seed=s, **acq) for s in args.seeds]
    t1 = load_mni152("t1")
    cases.append(heldout_case(pipe, t1, "template", seed=0, **acq))
    if args.other_regions:
        cases += [simulate_case(v, f"train {n}", axis=pipe.sr_axis, seed=1 + i, **acq)
                  for i, (n, v) in enumerate(training_slabs(pipe, t1))]
    volumes = calibration_volumes(pipe, cases, cache=out, num_samples=args.samples, num_inference_steps=args.steps,
                                  batch_size=args.batch_size,
                                  generator=[torch.Generator().manual_seed(k) for k in range(args.samples)])
    grid = case_grid(cases[0])  # every case is cut from a 1 mm MNI152 head: one output grid
    report(volumes, len(args.seeds), {n: c.at_grid(grid) for n, c in calibrations.items()}, out)


def report(volumes: list[CalibrationVolume], n_subjects: int, calibrations: dict[str, Calibration],
           out: Path) -> None:
    """Per-volume coverage under each calibration; the first ``n_subjects`` volumes are the test subjects, then the
    template's held-out slab, then any other regions."""
    subjects = volumes[:n_subjects]
    names = list(calibrations)
    cover = {n: [v.coverage(c) for v in volumes] for n, c in calibrations.items()}
    ratio = [float(np.quantile(np.abs(v.error[v.mask]) / v.std[v.mask], 0.9)) for v in volumes]
    lines = ["| volume | brain voxels | " + " | ".join(f"coverage ({n})" for n in names)
             + " | 90 % point of abs(error) / std |", "|" + " --- |" * (len(names) + 3)]
    for i, v in enumerate(volumes):
        lines.append(f"| {v.name} | {int(v.mask.sum())} | " + " | ".join(f"{cover[n][i]:.4f}" for n in names)
                     + f" | {ratio[i]:.2f} |")
    summary = {}
    for n in names:
        c = np.asarray(cover[n][:n_subjects])
        pooled = 1.0 - sum((1.0 - cv) * v.mask.sum() for cv, v in zip(c, subjects, strict=True)) / sum(
            v.mask.sum() for v in subjects)
        summary[n] = {"interval": calibrations[n].describe(), "target": 1.0 - calibrations[n].alpha,
                      "mean": float(c.mean()), "std": float(c.std(ddof=1)) if len(c) > 1 else 0.0,
                      "min": float(c.min()), "max": float(c.max()), "pooled": float(pooled),
                      "template": cover[n][n_subjects]}
    lines += ["", f"Over the {len(subjects)} test subjects (mean ± sample std; pooled over their voxels):", ""]
    lines += [f"- {n}: `{s['interval']}`: {s['mean']:.4f} ± {s['std']:.4f} (range {s['min']:.4f}–{s['max']:.4f}; "
              f"pooled {s['pooled']:.4f}; target {s['target']:g}); the template: {s['template']:.4f}"
              for n, s in summary.items()]
    text = "\n".join(lines) + "\n"
    (out / "subject_calibration.md").write_text(text)
    write_json(out / "subject_calibration.json", {"volumes": [v.name for v in volumes], "coverage": cover,
                                                  "ratio_q90": ratio, "summary": summary})
    print(text)


if __name__ == "__main__":
    main()
