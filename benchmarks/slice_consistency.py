"""Does a 2D model need more than one slicing plane? Slice-to-slice consistency of single-plane and fused sampling.

    python benchmarks/slice_consistency.py --model models/heads2d [--samples 4] [--steps 10]

A 2D model super-resolves each slice on its own (here slices across RAS+ axis 0, sagittal, or axis 1, coronal; both
contain the super-resolved inferior-superior axis), so neighbouring slices may disagree: seams in the orthogonal
views. The script runs, on the held-out slab of the MNI152 template degraded to 4 mm slices, in one process:

* ``plane 0``, ``plane 1``: slices across one axis;
* ``fused 0+1``: each sample drawn once per plane and averaged before the final projection
  (``slice_normal=(0, 1)``, twice the cost);

and reports, inside the brain, PSNR/SSIM of the mean and :func:`gen_sr.eval.metrics.slice_jitter` along axes 0 and 1
for the mean and for single samples (1 = as smooth across slices as the truth; above 1, seams/jitter). It also
writes orthogonal views (``--figure``) to look at the seams.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from gen_sr.eval.baselines import baseline
from gen_sr.eval.cases import heldout_case, super_resolve
from gen_sr.eval.metrics import foreground, psnr, slice_jitter, ssim_volume
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152
from gen_sr.schedulers.ddim import describe_sampler

VARIANTS = {"plane 0": 0, "plane 1": 1, "fused 0+1": (0, 1)}


def measure(estimate: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(estimate, ref, mask), "ssim": ssim_volume(estimate, ref, mask),
            "jitter_axis0": slice_jitter(estimate, ref, 0, mask), "jitter_axis1": slice_jitter(estimate, ref, 1, mask)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--thickness", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--figure", help="write orthogonal views as PNG here")
    args = parser.parse_args()

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    case = heldout_case(pipe, load_mni152("t1"), "mni152 held-out slab", thickness=args.thickness)
    ref, mask = case.hr.data.astype(np.float64), foreground(case.hr.data)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"input {case.lr.shape} -> {case.hr.shape}, {args.samples} samples, {args.steps} steps of "
          f"{describe_sampler(pipe.scheduler)}")
    results: dict[str, dict] = {"cubic": measure(baseline(case, "cubic"), ref, mask)}
    views = {"truth": ref, "cubic": baseline(case, "cubic")}
    for name, normal in VARIANTS.items():
        tic = time.perf_counter()
        gens = [torch.Generator().manual_seed(args.seed + k) for k in range(args.samples)]
        out = super_resolve(pipe, case, num_samples=args.samples, num_inference_steps=args.steps, generator=gens,
                            slice_normal=normal, output_type="np")
        seconds = time.perf_counter() - tic
        single = [measure(s, ref, mask) for s in out.samples]
        results[name] = measure(out.mean, ref, mask) | {
            "seconds": seconds,
            "sample_jitter_axis0": float(np.median([m["jitter_axis0"] for m in single])),
            "sample_jitter_axis1": float(np.median([m["jitter_axis1"] for m in single])),
            "sample_psnr": float(np.median([m["psnr"] for m in single])),
        }
        views[name] = out.mean
    cols = ["psnr", "ssim", "jitter_axis0", "jitter_axis1", "sample_psnr", "sample_jitter_axis0",
            "sample_jitter_axis1", "seconds"]
    print("| variant | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "—" for c in cols) + " |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "shape": list(case.hr.shape), "results": results}, f, indent=2)
    if args.figure:
        plot_views(views, args.figure)


def plot_views(views: dict[str, np.ndarray], path: str) -> None:
    """Axial and coronal planes through the middle (seams of sagittal slicing show in both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(views)
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.2), squeeze=False)
    truth = views["truth"]
    vmax = float(np.percentile(truth, 99.5))
    for j, name in enumerate(names):
        v = views[name]
        for i, (plane, img) in enumerate((("axial", v[:, :, v.shape[2] // 2]), ("coronal", v[:, v.shape[1] // 2]))):
            axes[i, j].imshow(np.rot90(img), cmap="gray", vmin=0, vmax=vmax)
            axes[i, j].set_title(f"{name} ({plane})", fontsize=8)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
