"""Reproduce ``benchmarks/RESULTS.md``: quality, uncertainty, stress test and speed of the demo model, in one run.

    python benchmarks/reproduce_results.py --model models/heads2d [--regression-model models/heads2d_regression] \\
        [--samples 8] [--steps 50] [--output benchmarks/RESULTS.md] [--skip-speed] [--quick]

``--quick`` is a check in about a minute (2 samples x 10 steps, 4 mm at SNR 30 only, a small stress test, no speed
section) that a change kept the figures: it writes ``benchmarks/RESULTS_QUICK.md``.

Every figure is measured on the slab of the MNI152 template that the model folder records as held out (training
never saw it), cropped to the brain, beside the interpolation baselines and in the same masks (the template's brain,
GM and WM). Sections:

1. quality at 2x, 4x and 6x through-plane (2, 4, 6 mm Gaussian slices), noise-free and at SNR 30 for 4x;
2. uncertainty quality at 4x (Spearman, AUSE, UCE, ENCE, coverage of the raw and of the calibrated intervals);
3. the lesion stress test at 4x;
4. speed: ``pipeline_speed.py`` (pipeline against a hand-written loop, N = 1, 4, 8) and ``slice_consistency.py``
   (one slicing plane against two fused), each in its own processes.

The file is written at the end (atomically); the sections' commands and the machine are recorded in it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.cases import heldout_case, heldout_slab
from gen_sr.eval.evaluate import evaluate
from gen_sr.eval.metrics import region_masks
from gen_sr.eval.stress import run_stress_test
from gen_sr.eval.tables import markdown_table, summarize
from gen_sr.io import atomic_write
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152
from gen_sr.volume import resample_to

HERE = Path(__file__).parent
CALIBRATED_SNR = 30.0
QUALITY = [(2.0, None), (4.0, None), (4.0, CALIBRATED_SNR), (6.0, None)]
QUICK_QUALITY = [(4.0, CALIBRATED_SNR)]
COLUMNS = ("psnr", "ssim", "nrmse", "hfen", "relative_residual", "seconds")
UNCERTAINTY = ("spearman", "ause", "uce", "ence", "coverage_1sigma", "coverage_2sigma", "coverage_calibrated")


def _masks(case) -> dict[str, np.ndarray]:
    tissues = {k.upper(): resample_to(load_mni152(k), case.hr).data for k in ("gm", "wm")}
    return region_masks(case.hr.data, tissues=tissues)


def quality(pipe, regression, t1, kwargs: dict, acquisitions=QUALITY) -> tuple[str, dict]:
    """One table per acquisition; returns the Markdown and ``{(thickness, snr): (rows, relative noise level)}``."""
    lines, results = [], {}
    for thickness, snr in acquisitions:
        case = heldout_case(pipe, t1, f"held-out slab, {thickness:g} mm", thickness=thickness, snr=snr)
        rows = evaluate(pipe, [case], masks=_masks, regression=regression, progress=False, **kwargs)
        noise = f"Rician noise at SNR {snr:g}" if snr else "noise-free"
        label = f"{thickness:g} mm slices ({thickness:g}x), {noise}"
        lines += [f"### {label}\n", f"input {case.lr.shape} -> {case.hr.shape} voxels\n",
                  markdown_table(summarize(rows), COLUMNS)]
        level = float(np.sqrt(case.lr.data.size) * case.noise_std / np.linalg.norm(case.lr.data))
        results[thickness, snr] = (rows, level)
    return "\n".join(lines), results


def targets(results: dict, alpha: float | None) -> str:
    """The issue's targets at 4x in the brain of the held-out slab, against what was measured."""
    out = ["| acquisition | PSNR gain over best baseline (≥ 2 dB) | SSIM gain (≥ 0.03) | relative residual "
           "(noise level) | Spearman (≥ 0.4) | calibrated coverage (target ± 0.02) |", "|" + " --- |" * 6]
    for (thickness, snr), (rows, level) in results.items():
        if thickness != 4.0:
            continue
        brain = {r["method"]: r for r in rows if r["region"] == "brain"}
        ours, best = brain["gen_sr"], max((brain[b] for b in ("trilinear", "cubic", "sinc")), key=lambda r: r["psnr"])
        cover = f"{ours['coverage_calibrated']:.4f} (target {1 - alpha:g})" if "coverage_calibrated" in ours else "—"
        noise = f"SNR {snr:g}" if snr else "noise-free"
        out.append(f"| 4 mm, {noise} | {ours['psnr'] - best['psnr']:+.2f} "
                   f"(vs {best['method']}) | {ours['ssim'] - best['ssim']:+.4f} | {ours['relative_residual']:.3g} "
                   f"({level:.3g}) | {ours['spearman']:.3f} | {cover} |")
    return "\n".join(out) + "\n"


def uncertainty(rows: list[dict]) -> str:
    ours = [r for r in rows if r["method"] == "gen_sr"]
    head = "| region | " + " | ".join(UNCERTAINTY) + " |\n|" + " --- |" * (len(UNCERTAINTY) + 1)
    body = ["| " + r["region"] + " | " + " | ".join(f"{r[c]:.4f}" if c in r else "—" for c in UNCERTAINTY) + " |"
            for r in ours]
    return "\n".join([head, *body]) + "\n"


def stress(pipe, t1, kwargs: dict, out_dir: Path = HERE / "stress_test", n_per_size: int = 6,
           removed: int = 2) -> str:
    part = heldout_slab(pipe, t1)
    result = run_stress_test(pipe, [part], thickness_mm=4.0, num_samples=kwargs["num_samples"],
                             num_inference_steps=kwargs["num_inference_steps"], seed=0, output_dir=out_dir,
                             n_per_size=n_per_size, removed=removed, progress=False,
                             batch_size=kwargs.get("batch_size", 64))
    return (out_dir / "stress_test.md").read_text().split("\n", 2)[2] + \
        f"\nFigure: `benchmarks/{out_dir.name}/stress_test.png`; pooled voxel AUROC {result['auroc']:.3f}.\n"


def run_script(args: list[str]) -> str:
    tic = time.perf_counter()
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE")).stdout
    shown = [os.path.relpath(a) if os.path.isabs(a) else a for a in args]
    return f"`python {' '.join(shown)}` ({time.perf_counter() - tic:.0f} s)\n\n" + out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--regression-model")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a check in a few minutes: 2 samples x 10 steps, 4 mm at SNR 30 only, a small stress "
                             "test, no speed; writes RESULTS_QUICK.md (and stress_test_quick/) unless --output")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.steps, args.skip_speed = 2, 10, True
        if args.output == str(HERE / "RESULTS.md"):
            args.output = str(HERE / "RESULTS_QUICK.md")

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    regression = None
    if args.regression_model:
        regression = LatentDiffusionSRPipeline.from_pretrained(args.regression_model)
        regression.set_progress_bar_config(disable=True)
    t1 = load_mni152("t1")
    kwargs = {"num_samples": args.samples, "num_inference_steps": args.steps, "batch_size": args.batch_size,
              "generator": [torch.Generator().manual_seed(k) for k in range(args.samples)]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python " + " ".join(sys.argv)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, commit {commit}"
    tic = time.perf_counter()
    quality_md, results = quality(pipe, regression, t1, kwargs, QUICK_QUALITY if args.quick else QUALITY)
    sections = [
        "# Benchmark results\n",
        f"Made by `{command}` on {datetime.date.today()} ({machine}). Each section names the command that made it; "
        "all figures of a section come from one run. The machines are shared and noisy: compare figures within a "
        "table, not across tables. What the figures mean, and which targets are missed and why: the model card "
        f"`{args.model}/README.md`.\n",
        f"## Quality on the held-out slab\n\nModel `{args.model}`"
        + (f" (calibration: {pipe.calibration.method}, interval {pipe.calibration.describe()})" if pipe.calibration
           else " (uncalibrated)")
        + f"; {args.samples} samples, {args.steps} DDIM steps, projection data consistency; regions: the template's "
        "foreground (brain) and its GM/WM maps; data range of PSNR/SSIM: the reference's inside the brain, for "
        "every region.\n",
        "### Targets at 4x (brain of the held-out slab)\n",
        targets(results, pipe.calibration.alpha if pipe.calibration else None),
        quality_md,
        f"## Uncertainty at 4x (Rician noise at SNR {CALIBRATED_SNR:g})\n\nSpearman of std with |error|, AUSE "
        "(sparsification against the "
        "oracle), UCE/ENCE (10 equal-count bins), coverage of mean ± 1σ, ± 2σ and of the calibrated interval "
        "(target 1 − α; the interval is named above). How the calibration transfers between regions: "
        "`benchmarks/CALIBRATION_TRANSFER.md`.\n",
        uncertainty(results[4.0, CALIBRATED_SNR][0]),
        "## Lesion stress test at 4x\n",
        stress(pipe, t1, kwargs, HERE / "stress_test_quick", 2, 1) if args.quick else stress(pipe, t1, kwargs),
    ]
    if not args.skip_speed:
        sections += ["## Speed: pipeline against a hand-written loop\n",
                     run_script([str(HERE / "pipeline_speed.py"), "--model", args.model, "--steps", "5",
                                 "--repeats", "3"]),
                     "## Slice consistency of the 2D model: one plane or two fused\n",
                     run_script([str(HERE / "slice_consistency.py"), "--model", args.model, "--samples", "4",
                                 "--steps", "25"])]
    sections.append(f"\nTotal time of this run: {time.perf_counter() - tic:.0f} s.\n")
    notes = HERE / "RESULTS_NOTES.md"  # the hand-written reading of the figures; rewrite it after a new run
    if notes.is_file() and not args.quick:
        sections.append(notes.read_text())
    atomic_write(Path(args.output), lambda tmp: tmp.write_text("\n".join(sections)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
