"""Calibration volumes for the demo model: slabs of the MNI152 template's *training* region, next to the held-out
slab and as thick as it, each cropped to the brain.

    python benchmarks/calibration_volumes.py --model models/mni2d --output-dir runs/calibration_volumes [--slabs 2]
    gen-sr calibrate --model models/mni2d --data runs/calibration_volumes --blocks 48 ...

With a single template there is only one brain, so the exchangeable units of the calibration are blocks of these
slabs (``--blocks``), never voxels and never the held-out slab, on which coverage is then measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gen_sr.data import slab_bounds
from gen_sr.eval.evaluate import crop_to_foreground
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152
from gen_sr.volume import save_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--slabs", type=int, default=2)
    parser.add_argument("--margin", type=int, default=4)
    args = parser.parse_args()

    holdout = LatentDiffusionSRPipeline.load_config(args.model)["acquisition"]["holdout"]
    t1 = load_mni152("t1").canonical()
    axis = holdout["axis"]
    start, _ = slab_bounds(t1.shape, axis, holdout["fraction"], "val")
    width = t1.shape[axis] - start[axis]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(args.slabs):
        lo, hi = [0, 0, 0], list(t1.shape)
        lo[axis], hi[axis] = start[axis] - (k + 1) * width, start[axis] - k * width
        vol = crop_to_foreground(t1.crop(lo, hi), args.margin)
        path = save_volume(vol, out / f"train_slab{k}.nii.gz", overwrite=True)
        print(f"{path}: {vol.shape} voxels, RAS+ axis {axis} voxels {lo[axis]}..{hi[axis] - 1} of the template")


if __name__ == "__main__":
    main()
