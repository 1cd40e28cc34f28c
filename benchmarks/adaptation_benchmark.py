"""Issue 15's figures: the pretrained model against the same model adapted to the scan and calibrated on it, on a
real head that no model was trained on (Colin27 by default).

    python benchmarks/adaptation_benchmark.py --model models/heads2d [--contrast t1|t2like] [--samples 4] \\
        [--steps 10] [--adapt-steps 200] [--adapt-noise auto|estimate|true|none] [--adapt-recorrupt] \\
        [--target-noise none|estimate|true] [--keep-better] [--recorrupted] [--weight-mix W] [--slab 8] \\
        [--output PATH]

``--contrast t2like`` inverts the brain's intensities (as ``prior_benchmark.py`` does: CSF bright, white matter dark,
skull removed), a contrast no training head has. The whole head (cropped to its bounding box) is degraded with 4 mm
Gaussian slices along RAS+ axis 2, noise-free and at SNR 30. The adapted model learns from that whole LR scan's in-plane
slices and is calibrated on the ones it held out (``gen_sr.training.scan_fit.fit_to_scan``). Both models then
super-resolve a coronal slab ``--slab`` mm wide through the centre of the same LR scan (cropping an in-plane axis is
exact), to bound the cost; every figure is measured there, inside the brain (Colin27's own brain-extracted image), as
``prior_benchmark.py`` measures:

* PSNR of the mean against the best interpolation;
* Spearman(std, |err|), coverage of mean ± 2 std, λ90;
* the coverage of each model's calibrated interval: the pretrained model's own (fitted on synthetic subjects of its
  training heads, with its card's settings) and the adapted model's per-scan one (fitted here with these settings);
* the wall time of each phase.

Not run here: ECLARE (issue 15 asks for it in a separate environment under ``benchmarks/peers/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from prior_benchmark import measure, report

from gen_sr.eval.cases import Case, held_out_head, simulate_case
from gen_sr.eval.metrics import foreground
from gen_sr.eval.scan_calibration import calibrate_on_scan
from gen_sr.eval.tables import figures_table
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.training.adaptation import AdaptationConfig, mixed_with_pretrained
from gen_sr.training.scan_fit import fit_to_scan
from gen_sr.volume import load_volume

FIGURES = ("psnr", "ssim", "best interpolation", "gain", "spearman(std, |err|)", "spearman ceiling", "coverage ±2σ",
           "λ90", "coverage calibrated", "spearman(risk, |err|)", "super-resolve s")


def central_slab_case(case: Case, brain: np.ndarray, slab_mm: float, axis: int = 1) -> tuple[Case, np.ndarray]:
    """The case cut to a slab ``slab_mm`` wide across in-plane RAS+ ``axis`` through the centre: the LR, the truth
    and the operator cut alike (exact, as the slices run along another axis), and the brain mask."""
    n = case.hr.shape[axis]
    width = max(1, round(slab_mm / case.hr.spacing[axis]))
    lo = (n - width) // 2
    start, stop = [0, 0, 0], list(case.hr.shape)
    start[axis], stop[axis] = lo, lo + width
    lr_start, lr_stop = [0, 0, 0], list(case.lr.shape)
    lr_start[axis], lr_stop[axis] = lo, lo + width
    hr = case.hr.crop(start, stop)
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    return (Case(f"{case.name}, {slab_mm:g} mm slab", hr, case.lr.crop(lr_start, lr_stop),
                 case.operator.with_shape(hr.shape), case.noise_std), brain[box])


def seeded_sampling(samples: int, steps: int, first: int = 0) -> dict:
    """Pipeline settings with sample ``k`` drawn from seed ``first + k``: a fresh call draws the same noise again, so
    that every model and every pass of a benchmark sees the same draws."""
    return {"num_samples": samples, "num_inference_steps": steps, "batch_size": 64,
            "generator": [torch.Generator().manual_seed(first + k) for k in range(samples)]}


def row(pipe: LatentDiffusionSRPipeline, case: Case, brain: np.ndarray, kwargs: dict) -> dict[str, float]:
    tic = time.perf_counter()
    r = measure(pipe, None, case, brain, kwargs)
    r["super-resolve s"] = time.perf_counter() - tic
    r["best interpolation"] = max(v for k, v in r.items() if k.startswith("psnr "))
    r["gain"] = r["psnr"] - r["best interpolation"]
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--brain", default="colin27",
                        help="a head with a _brain version (colin27, robex), or a NIfTI file (its foreground is the "
                             "mask)")
    parser.add_argument("--contrast", choices=("t1", "t2like"), default="t1",
                        help="t2like: the brain's intensities inverted, skull removed (a named head only)")
    parser.add_argument("--adapt-noise", choices=("auto", "estimate", "true", "none"), default="auto",
                        help="the fine-tuning pairs' noise: auto (fit_to_scan's default: recorrupted with the std the "
                             "simulation added), or topped up to the scan's noise, estimated or the one the simulation "
                             "added, or none")
    parser.add_argument("--adapt-recorrupt", action="store_true",
                        help="with --adapt-noise estimate or true: recorrupt the pairs with that noise instead of "
                             "topping them up (adapt(recorrupt=True))")
    parser.add_argument("--target-noise", choices=("estimate", "true", "none"), default="none",
                        help="take the scan's noise in the pairs' truth as part of the diffusion noise, its std "
                             "estimated from the scan or the one the simulation added (an oracle, to tell the method's "
                             "effect from the estimate's), or take the truth as clean")
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--slab", type=float, default=8.0, help="width of the measured coronal slab in mm")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--adapt-steps", type=int, default=200)
    parser.add_argument("--keep-better", action="store_true",
                        help="also calibrate the pretrained UNet on the scan's held-out slices and keep the better of "
                             "the two there (fit_to_scan(keep_better=True)); adds a column for the kept model")
    parser.add_argument("--recorrupted", action="store_true",
                        help="with --keep-better, also compare the two on recorrupted held-out problems (noise "
                             "independent of the reference; fit_to_scan(reference='recorrupted')) where the scan is "
                             "noisy, and add a column for the model that comparison keeps")
    parser.add_argument("--oracle-calibration", action="store_true",
                        help="where the scan is noisy, also calibrate the model that fit_to_scan returns against its "
                             "held-out slices without their noise (an oracle: how far that noise moves the per-scan "
                             "calibration), and add a column for it")
    parser.add_argument("--weight-mix", type=float, metavar="W",
                        help="fine-tune to the end (weight_mix 1) and also measure the UNet whose weights are W "
                             "times the fine-tuned ones plus 1 - W times the pretrained ones (mixed_with_pretrained), "
                             "with its own per-scan calibration; with --keep-better, also the one of pretrained and "
                             "mixed that the held-out slices rank first")
    parser.add_argument("--snr", type=float, nargs="*", default=[0.0, 30.0], help="0 for noise-free")
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.brain in {n.removesuffix("_brain") for n in pipe.model_card.trained_on}:
        raise SystemExit(f"{args.model} was trained on {args.brain}: measure on a head it never saw")
    if Path(args.brain).is_file():  # e.g. a validation subject, for design choices
        if args.contrast != "t1":
            raise SystemExit("--contrast t2like needs a named head (its brain mask defines the inversion)")
        head = load_volume(args.brain).canonical()
        brain = foreground(head.data)
    else:
        head, brain = held_out_head(args.brain, contrast=args.contrast, margin=4)
    default = AdaptationConfig()
    config = dataclasses.replace(default, train=dataclasses.replace(default.train, steps=max(1, args.adapt_steps)),
                                 fine_tune=args.adapt_steps > 0,  # 0: the pretrained UNet, calibrated on the scan
                                 weight_mix=default.weight_mix if args.weight_mix is None else 1.0)

    def sampling() -> dict:
        return seeded_sampling(args.samples, args.steps)

    columns: dict[str, dict[str, float]] = {}
    for snr in args.snr:
        label = "noise-free" if snr == 0 else f"SNR {snr:g}"
        full = simulate_case(head, args.brain, axis=2, thickness=args.thickness, snr=snr or None)
        slab, slab_brain = central_slab_case(full, brain, args.slab)
        columns[f"pretrained, {label}"] = row(pipe, slab, slab_brain, sampling())
        with tempfile.TemporaryDirectory() as work:
            pairs = {} if args.adapt_noise == "auto" else {
                "noise_std": {"estimate": None, "true": full.noise_std, "none": 0.0}[args.adapt_noise],
                "recorrupt": args.adapt_recorrupt and snr > 0}
            fit = fit_to_scan(pipe, full.lr, work_dir=work, config=config, sampling=sampling(),
                              keep_better=args.keep_better, scan_noise_std=full.noise_std, reference="noisy", **pairs,
                              target_noise_std={"estimate": None, "true": full.noise_std,
                                                "none": 0.0}[args.target_noise])
        record = fit.pipe.model_card.adapted
        fine_tuned = fit.rejected if record.kept == "pretrained" else fit.pipe
        fine_tuned.set_progress_bar_config(disable=True)
        r = row(fine_tuned, slab, slab_brain, sampling())
        loss = record.heldout_loss or (float("nan"), float("nan"))  # none without fine-tuning (--adapt-steps 0)
        rmse = record.heldout_rmse or (float("nan"), float("nan"))  # none without --keep-better
        r |= {"adapt s": fit.timings["adapt_s"], "calibrate s": fit.timings["calibrate_s"],
              "λ̂ (per scan)": fine_tuned.calibration.scale, "held-out in-plane loss before": loss[0],
              "held-out in-plane loss after": loss[1], "noise std in the truth": record.target_noise_std,
              "first timestep trained": record.min_timestep, "held-out RMSE, pretrained": rmse[0],
              "held-out RMSE, fine-tuned": rmse[1]}
        columns[f"adapted, {label}"] = r
        print(label, {k: round(v, 4) for k, v in r.items()}, flush=True)
        if args.keep_better:  # the kept model with its own per-scan calibration
            pretrained = fit.pipe if record.kept == "pretrained" else fit.rejected
            chosen, redo = {"noisy": record.kept}, {}
            if args.recorrupted and full.noise_std > 0:  # the same choice on recorrupted problems
                tic = time.perf_counter()
                rerun = tuple(float(calibrate_on_scan(p, full.lr, noise_std=full.noise_std, recorrupt=True,
                                                     progress=False, **sampling()).rmse)
                             for p in (pretrained, fine_tuned))
                chosen["recorrupted"] = "pretrained" if rerun[0] <= rerun[1] else "fine-tuned"
                redo = {"held-out RMSE recorrupted, pretrained": rerun[0],
                        "held-out RMSE recorrupted, fine-tuned": rerun[1], "compare s": time.perf_counter() - tic}
            per_scan = {"fine-tuned": r}
            if "pretrained" in chosen.values():
                pretrained.set_progress_bar_config(disable=True)
                per_scan["pretrained"] = (row(pretrained, slab, slab_brain, sampling())
                                          | {"λ̂ (per scan)": pretrained.calibration.scale})
            columns[f"kept ({record.kept}), {label}"] = per_scan[record.kept] | {
                "compare s": fit.timings.get("compare_s", float("nan"))}
            if redo:
                choice = chosen["recorrupted"]
                columns[f"kept on recorrupted problems ({choice}), {label}"] = per_scan[choice] | redo
        if args.weight_mix is not None:  # the weight-space mix of the two, calibrated on the scan as fit_to_scan does
            tic = time.perf_counter()
            mixed = mixed_with_pretrained(pipe, fine_tuned, args.weight_mix)
            mixed.set_progress_bar_config(disable=True)
            result = calibrate_on_scan(mixed, full.lr, noise_std=full.noise_std, progress=False, **sampling())
            mixed.calibration = result.calibration
            mix = row(mixed, slab, slab_brain, sampling()) | {
                "λ̂ (per scan)": mixed.calibration.scale, "held-out RMSE, mixed": float(result.rmse),
                "calibrate s": time.perf_counter() - tic}
            columns[f"mixed {args.weight_mix:g}, {label}"] = mix
            print(label, "mixed", {k: round(v, 4) for k, v in mix.items()}, flush=True)
            if args.keep_better:
                pick = "pretrained" if record.heldout_rmse[0] <= mix["held-out RMSE, mixed"] else "mixed"
                if pick == "pretrained" and "pretrained" not in per_scan:
                    pretrained.set_progress_bar_config(disable=True)
                    per_scan["pretrained"] = (row(pretrained, slab, slab_brain, sampling())
                                              | {"λ̂ (per scan)": pretrained.calibration.scale})
                columns[f"kept of pretrained and mixed ({pick}), {label}"] = (
                    mix if pick == "mixed" else per_scan["pretrained"])
        if args.oracle_calibration and full.noise_std > 0:  # the same problems against clean held-out slices
            clean = simulate_case(head, args.brain, axis=2, thickness=args.thickness).lr
            kept, own = fit.pipe, fit.pipe.calibrations
            kept.calibration = calibrate_on_scan(kept, full.lr, noise_std=full.noise_std, clean_scan=clean,
                                                 progress=False, **sampling()).calibration
            kept.set_progress_bar_config(disable=True)
            columns[f"{record.kept}, calibrated against clean held-out slices, {label}"] = (
                row(kept, slab, slab_brain, sampling()) | {"λ̂ (per scan)": kept.calibration.scale})
            kept.calibrations = own
    figures = [*FIGURES, "adapt s", "calibrate s", "λ̂ (per scan)", "held-out in-plane loss before",
               "held-out in-plane loss after", "noise std in the truth", "first timestep trained",
               "held-out RMSE, pretrained", "held-out RMSE, fine-tuned", "held-out RMSE recorrupted, pretrained",
               "held-out RMSE recorrupted, fine-tuned", "held-out RMSE, mixed", "compare s"]
    pairs_noise = ("the true std, recorrupted" if args.adapt_noise == "auto" else "none" if args.adapt_noise == "none"
                   else f"{args.adapt_noise} std, {'recorrupted' if args.adapt_recorrupt else 'topped up'}")
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}, commit {commit}): {head.source}, whole head "
             f"{head.shape} voxels for the adaptation, contrast {args.contrast}, {args.thickness:g} mm Gaussian "
             "slices along RAS+ axis 2; "
             f"measured on the central {args.slab:g} mm coronal slab, inside the brain; {args.samples} samples x "
             f"{args.steps} steps; {args.adapt_steps} adaptation steps"
             f"{', the better one kept' if args.keep_better else ''}, noise in the pairs: {pairs_noise}, "
             f"noise in the truth: {args.target_noise}.", ""]
    report("\n".join(lines) + "\n" + figures_table(columns, figures), args.output)


if __name__ == "__main__":
    main()
