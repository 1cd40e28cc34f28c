"""Re-measure the demo model's headline figures on the held-out head in one run: quality, uncertainty, the lesion
stress test and speed. ``benchmarks/RESULTS.md`` is curated from the issues' own benchmarks; this script is the
one command that checks, after a change, that the shipped model still gives its figures.

    python benchmarks/reproduce_results.py [--model models/heads2d] [--regression-model models/heads2d_regression] \\
        [--samples 8] [--steps N] [--slab 24] [--output benchmarks/REPRODUCE.md] [--skip-speed] \\
        [--quick | --stress-only]

``--quick`` is a check in a few minutes (4 mm at SNR 30 only, a small stress test, no speed section):
it writes ``benchmarks/REPRODUCE_QUICK.md`` and ``benchmarks/stress_test_quick/``. ``--stress-only`` runs the full
run's stress test alone (4 min): it rewrites ``benchmarks/stress_test/`` and prints its table, nothing else.

Every figure is measured on the held-out head (Colin27: no training, calibration or design choice saw it), cut to a
coronal slab of ``--slab`` mm through its centre, degraded with Gaussian slices along RAS+ axis 2 (an axial stack),
beside the interpolation baselines and the regression baseline, inside Colin27's own brain mask and over the head.
The sampler is the model folder's (``--steps``: its default unless given). Sections:

1. quality at 2x, 4x and 6x through-plane (2, 4, 6 mm slices), noise-free and at SNR 30 for 4x, with issue 14's
   targets at 4x;
2. uncertainty at 4x, SNR 30 (Spearman, AUSE, UCE, ENCE, coverage of the raw and of the calibrated intervals);
3. the lesion stress test at 4x, noise-free, in the brain (the slab skull-stripped by the brain mask, so every lesion
   lies in brain tissue);
4. speed: ``pipeline_speed.py`` (pipeline against a hand-written loop) and ``slice_consistency.py`` (one slicing
   plane against two fused), each in its own processes.

The file is written at the end (atomically), with the commands and the machine; a full run appends the hand-written
reading of its figures, ``benchmarks/REPRODUCE_NOTES.md`` (rewrite it after a new full run).
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

from gen_sr.eval.cases import HELD_OUT_HEAD, held_out_head, simulate_case
from gen_sr.eval.evaluate import evaluate
from gen_sr.eval.metrics import foreground
from gen_sr.eval.stress import run_stress_test
from gen_sr.eval.tables import UNCERTAINTY_COLUMNS as UNCERTAINTY
from gen_sr.eval.tables import markdown_table, summarize
from gen_sr.io import atomic_write
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.schedulers.ddim import describe_sampler
from gen_sr.volume import Volume

HERE = Path(__file__).parent
CALIBRATED_SNR = 30.0
QUALITY = [(2.0, None), (4.0, None), (4.0, CALIBRATED_SNR), (6.0, None)]
QUICK_QUALITY = [(4.0, CALIBRATED_SNR)]
COLUMNS = ("psnr", "ssim", "nrmse", "hfen", "relative_residual", "seconds")


def quality(pipe, regression, head: Volume, brain: np.ndarray, kwargs: dict, acquisitions=QUALITY) -> tuple[str, dict]:
    """One table per acquisition; returns the Markdown and ``{(thickness, snr): (rows, relative noise level)}``."""
    lines, results = [], {}
    masks = lambda case: {"brain": brain, "head": foreground(case.hr.data)}  # noqa: E731
    for thickness, snr in acquisitions:
        case = simulate_case(head, f"held-out head, {thickness:g} mm", axis=2, thickness=thickness, snr=snr)
        seeds = [torch.Generator().manual_seed(k) for k in range(kwargs["num_samples"])]  # afresh for every row
        rows = evaluate(pipe, [case], masks=masks, regression=regression, progress=False, generator=seeds, **kwargs)
        noise = f"Rician noise at SNR {snr:g}" if snr else "noise-free"
        label = f"{thickness:g} mm slices ({thickness:g}x), {noise}"
        lines += [f"### {label}\n", f"input {case.lr.shape} -> {case.hr.shape} voxels\n",
                  markdown_table(summarize(rows), COLUMNS)]
        level = float(np.sqrt(case.lr.data.size) * case.noise_std / np.linalg.norm(case.lr.data))
        results[thickness, snr] = (rows, level)
    return "\n".join(lines), results


def targets(results: dict, alpha: float | None) -> str:
    """Issue 14's targets at 4x in the brain of the held-out head, against what was measured."""
    out = ["| acquisition | PSNR gain over the best interpolation (≥ +2.5 dB) | SSIM gain | relative residual "
           "(noise level) | Spearman(std, \\|err\\|) (≥ 0.4) | ±2σ coverage (≥ 0.80) | calibrated coverage "
           "(target ± 0.02) |", "|" + " --- |" * 7]
    for (thickness, snr), (rows, level) in results.items():
        if thickness != 4.0:
            continue
        brain = {r["method"]: r for r in rows if r["region"] == "brain"}
        ours, best = brain["gen_sr"], max((brain[b] for b in ("trilinear", "cubic", "sinc")), key=lambda r: r["psnr"])
        cover = f"{ours['coverage_calibrated']:.4f} (target {1 - alpha:g})" if "coverage_calibrated" in ours else "—"
        noise = f"SNR {snr:g}" if snr else "noise-free"
        out.append(f"| 4 mm, {noise} | {ours['psnr'] - best['psnr']:+.2f} "
                   f"(vs {best['method']}) | {ours['ssim'] - best['ssim']:+.4f} | {ours['relative_residual']:.3g} "
                   f"({level:.3g}) | {ours['spearman']:.3f} | {ours['coverage_2sigma']:.3f} | {cover} |")
    return "\n".join(out) + "\n"


def uncertainty(rows: list[dict]) -> str:
    ours = [r for r in rows if r["method"] == "gen_sr"]
    head = "| region | " + " | ".join(UNCERTAINTY) + " |\n|" + " --- |" * (len(UNCERTAINTY) + 1)
    body = ["| " + r["region"] + " | " + " | ".join(f"{r[c]:.4f}" if c in r else "—" for c in UNCERTAINTY) + " |"
            for r in ours]
    return "\n".join([head, *body]) + "\n"


def stress(pipe, brain_slab: Volume, kwargs: dict, out_dir: Path = HERE / "stress_test", n_per_size: int = 6,
           removed: int = 2) -> str:
    result = run_stress_test(pipe, [brain_slab], thickness_mm=4.0, num_samples=kwargs["num_samples"],
                             num_inference_steps=kwargs["num_inference_steps"], seed=0, output_dir=out_dir,
                             n_per_size=n_per_size, removed=removed, progress=False,
                             batch_size=kwargs.get("batch_size", 64))
    return (out_dir / "stress_test.md").read_text().split("\n", 2)[2] + \
        f"\nFigure: `benchmarks/{out_dir.name}/stress_test.png`; pooled voxel AUROC {result['auroc']:.3f}.\n"


def run_script(args: list[str], failures: list[str]) -> str:
    """A speed script's output as a section; a failure becomes the section (and is counted), so that the rest of
    the run is still written."""
    tic = time.perf_counter()
    shown = [os.path.relpath(a) if os.path.isabs(a) else a for a in args]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    head = f"`python {' '.join(shown)}` ({time.perf_counter() - tic:.0f} s)\n\n"
    if done.returncode:
        failures.append(shown[0])
        return head + f"**Failed** (exit code {done.returncode}):\n\n```\n{done.stderr.strip()[-2000:]}\n```\n"
    return head + done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--regression-model")
    parser.add_argument("--samples", type=int, default=8, help="samples per run (the calibration's: 8)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model folder's)")
    parser.add_argument("--slab", type=float, default=24.0, help="width in mm of the held-out head's coronal slab")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="default: benchmarks/REPRODUCE.md (REPRODUCE_QUICK.md with --quick)")
    parser.add_argument("--skip-speed", action="store_true")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--quick", action="store_true",
                      help="a check in a few minutes: 4 mm at SNR 30 only, a small stress test, no speed; "
                           "writes REPRODUCE_QUICK.md (and stress_test_quick/) unless --output")
    only.add_argument("--stress-only", action="store_true",
                      help="the full run's stress test alone: rewrites stress_test/ and prints its table")
    args = parser.parse_args()
    args.skip_speed |= args.quick
    output = Path(args.output or HERE / ("REPRODUCE_QUICK.md" if args.quick else "REPRODUCE.md"))

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if HELD_OUT_HEAD in {n.removesuffix("_brain") for n in pipe.model_card.trained_on}:
        raise SystemExit(f"{args.model} was trained on {HELD_OUT_HEAD}: these figures need a head it never saw")
    regression = None
    if args.regression_model and not args.stress_only:
        regression = LatentDiffusionSRPipeline.from_pretrained(args.regression_model)
        regression.set_progress_bar_config(disable=True)
    head, brain = held_out_head(slab_mm=args.slab)
    steps = args.steps or pipe.model_card.num_inference_steps
    kwargs = {"num_samples": args.samples, "num_inference_steps": steps, "batch_size": args.batch_size}
    brain_slab = head.with_data(np.where(brain, head.data, 0).astype(head.data.dtype))
    if args.stress_only:
        print(stress(pipe, brain_slab, kwargs))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python " + " ".join(sys.argv)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, commit {commit}"
    tic = time.perf_counter()
    quality_md, results = quality(pipe, regression, head, brain, kwargs, QUICK_QUALITY if args.quick else QUALITY)
    sections = [
        "# The demo model's figures, re-measured in one run\n",
        f"Made by `{command}` on {datetime.date.today()} ({machine}). Each section names the command that made it; "
        "all figures of a section come from one run. The machines are shared and noisy: compare figures within a "
        "table, not across tables. The curated figures, with the issues' own benchmarks: `benchmarks/RESULTS.md`; "
        f"what the model is: `{args.model}/README.md`.\n",
        f"## Quality on the held-out head\n\nModel `{args.model}`"
        + (f" (calibration: {pipe.calibration.method}; each run uses the record made for its sampler settings and "
           f"output grid, as `gen-sr info --model {args.model}` lists them)" if pipe.calibration else " (uncalibrated)")
        + f"; {args.samples} samples x {steps} steps of {describe_sampler(pipe.scheduler)}, projection data "
        f"consistency; {head.source}, a {args.slab:g} mm coronal slab through its centre ({head.shape} voxels), "
        "slices along RAS+ axis 2; regions: its brain mask and the head's foreground; data range of PSNR/SSIM: the "
        "reference's inside the brain, for every region.\n",
        "### Issue 14's targets at 4x (in the brain)\n",
        targets(results, pipe.calibration.alpha if pipe.calibration else None),
        quality_md,
        f"## Uncertainty at 4x (Rician noise at SNR {CALIBRATED_SNR:g})\n\nSpearman of std with |error|, AUSE "
        "(sparsification against the oracle), UCE/ENCE (10 equal-count bins), coverage of mean ± 1σ, ± 2σ and of the "
        "calibrated interval (target 1 − α; each run's record, as above).\n",
        uncertainty(results[4.0, CALIBRATED_SNR][0]),
        "## Lesion stress test at 4x, in the brain\n",
        stress(pipe, brain_slab, kwargs, HERE / "stress_test_quick", 2, 1) if args.quick
        else stress(pipe, brain_slab, kwargs),
    ]
    failures: list[str] = []
    if not args.skip_speed:
        sections += ["## Speed: pipeline against a hand-written loop\n",
                     run_script([str(HERE / "pipeline_speed.py"), "--model", args.model, "--steps", str(steps),
                                 "--samples", "1", "4", "--repeats", "3", "--crop", "48", "112", "96"], failures),
                     "## Slice consistency of the 2D model: one plane or two fused\n",
                     run_script([str(HERE / "slice_consistency.py"), "--model", args.model, "--samples", "4",
                                 "--steps", str(steps)], failures)]
    sections.append(f"\nTotal time of this run: {time.perf_counter() - tic:.0f} s.\n")
    notes = HERE / "REPRODUCE_NOTES.md"  # the hand-written reading of the figures; rewrite it after a new run
    if notes.is_file() and not args.quick:
        sections.append(notes.read_text())
    atomic_write(output, lambda tmp: tmp.write_text("\n".join(sections)))
    print(f"wrote {output}")
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)} (their sections in {output} hold the errors)")


if __name__ == "__main__":
    main()
