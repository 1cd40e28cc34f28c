"""Quality against network calls (issue 16, item 1), on validation data: the training heads' held-out slabs, which no
training saw and which are not the held-out test head (Colin27). Defaults are chosen from this curve, never from a
figure on Colin27.

    python benchmarks/sampling_curve.py --model models/heads2d --data mni152 robex --slab 8 \\
        --settings 50 25 10 25:0.5 25:1:1 [--samples 8] [--snr 30] [--output PATH]

Each setting is ``[SAMPLER[,KEY=VALUE...]@]STEPS[:STRENGTH[:NORMAL[:PATCH]]][+FLAG...]``: the sampler (``ddim``,
the default, ``dpmsolver++``, ``sde-dpmsolver++`` or ``unipc``, each with the data-consistency hook) with any entries
of its diffusers config set over the model's (e.g. ``dpmsolver++,timestep_spacing=trailing@3``), its steps, the strength
(1: from pure noise; below 1 from the noised condition, running that fraction of the steps), the RAS+ slice normal
of a 2D model (default, or empty: the pipeline's) and the size of square in-slice patches (default: whole slices);
e.g. ``unipc@10:1::64``; each ``+FLAG`` sets a pipeline option on (``+share_first_call``) and a ``-FLAG`` off.
Unless a setting says, the model folder's defaults hold (`gen-sr info --model DIR`).
Each volume's held-out slab (the model card's), cut to a coronal slab ``--slab`` mm wide, is degraded with 4 mm
Gaussian slices along RAS+ axis 2 and Rician noise at ``--snr``. Printed per setting, as means over the volumes:
network calls per tile (denoising steps), PSNR/SSIM in the foreground, the gain over the best interpolation,
Spearman(std, |err|), the coverage of mean ± 2 std, and the seconds of the pipeline call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from gen_sr.eval.cases import load_hr_volumes, simulate_cases
from gen_sr.eval.evaluate import evaluate
from gen_sr.io import atomic_write
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.schedulers import scheduler_from_name

BASELINE_NAMES = ("trilinear", "cubic", "sinc")


def parse_setting(text: str) -> dict:
    """``"unipc@25:0.5:1"`` → ``{"scheduler": "unipc", "scheduler_options": {}, "num_inference_steps": 25,
    "strength": 0.5, "slice_normal": 1}``; ``"dpmsolver++,timestep_spacing=trailing@3"`` sets
    ``"scheduler_options": {"timestep_spacing": "trailing"}``; ``"dpmsolver++@3+share_first_call"`` sets
    ``"share_first_call": True``."""
    sampler, _, text = text.rpartition("@")
    sampler, *options = (sampler or "ddim").split(",")
    text, *flags = re.split(r"(?=[+-][a-z_])", text)
    parts = text.split(":")
    setting = {"scheduler": sampler, "scheduler_options": dict(_option(o) for o in options),
               "num_inference_steps": int(parts[0]),
               "strength": float(parts[1]) if len(parts) > 1 else 1.0}
    if len(parts) > 2 and parts[2]:
        setting["slice_normal"] = int(parts[2])
    if len(parts) > 3:
        setting["patch_size"] = (int(parts[3]),) * 2
    setting.update((flag[1:], flag[0] == "+") for flag in flags)
    return setting


def _option(text: str) -> tuple[str, object]:
    """``"solver_order=3"`` → ``("solver_order", 3)``; a value that is not JSON stays a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def measure(pipe: LatentDiffusionSRPipeline, cases: list, setting: dict, samples: int) -> dict:
    """Mean figures over the cases for one setting."""
    setting = dict(setting)
    default = pipe.scheduler
    pipe.scheduler = scheduler_from_name(setting.pop("scheduler"), default.config, **setting.pop("scheduler_options"))
    try:
        rows = evaluate(pipe, cases, progress=False, num_samples=samples,
                        generator=[torch.Generator().manual_seed(k) for k in range(samples)], **setting)
    finally:
        pipe.scheduler = default
    inside = [r for r in rows if r["region"] == "foreground"]
    ours = [r for r in inside if r["method"] == "gen_sr"]
    best = [max((r for r in inside if r["volume"] == o["volume"] and r["method"] in BASELINE_NAMES),
                key=lambda r: r["psnr"]) for o in ours]
    steps = max(1, round(setting["strength"] * setting["num_inference_steps"]))
    if pipe.sampling_settings(**setting, num_samples=samples).share_first_call:
        steps -= 1 - 1 / samples  # the first call is made once for all samples
    return {"calls": steps,
            "psnr": np.mean([o["psnr"] for o in ours]), "ssim": np.mean([o["ssim"] for o in ours]),
            "gain": np.mean([o["psnr"] - b["psnr"] for o, b in zip(ours, best, strict=True)]),
            "spearman": np.mean([o["spearman"] for o in ours]), "cov2": np.mean([o["coverage_2sigma"] for o in ours]),
            "seconds": np.mean([o["seconds"] for o in ours])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--data", nargs="+", default=["mni152", "robex"])
    parser.add_argument("--slab", type=float, default=8.0)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--settings", nargs="+", default=["50", "25", "10", "25:0.5"])
    parser.add_argument("--output", help="also write the table here (Markdown)")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    named = load_hr_volumes(args.data, pipe, region="heldout", model=args.model, slab_mm=args.slab)
    cases = simulate_cases(named, axis=2, thickness=4.0, snr=args.snr or None)
    shapes = ", ".join(f"{n} {c.hr.shape}" for (n, _), c in zip(named, cases, strict=True))
    lines = [f"`python {' '.join(sys.argv)}` ({datetime.date.today()}): held-out slabs {shapes}, 4 mm Gaussian "
             f"slices along RAS+ axis 2, SNR {args.snr:g}, {args.samples} samples, projection guidance; means over "
             "the volumes, inside the foreground.\n",
             "| sampler@steps:strength:normal | network calls per tile | PSNR | SSIM | gain over best interpolation | "
             "Spearman(std, \\|err\\|) | ±2σ coverage | seconds |", "|" + " --- |" * 8]
    print("\n".join(lines), flush=True)
    for text in args.settings:
        r = measure(pipe, cases, parse_setting(text), args.samples)
        lines.append(f"| {text} | {r['calls']:g} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['gain']:+.2f} dB | "
                     f"{r['spearman']:.3f} | {r['cov2']:.3f} | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)
    if args.output:
        atomic_write(Path(args.output), lambda p: p.write_text("\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
