"""Calibration volumes for the demo model: the MNI152 template's *training* region cut into slabs as thick as the
held-out slab, each cropped to the brain (:func:`gen_sr.eval.evaluate.training_slabs`).

    python benchmarks/calibration_volumes.py --model models/mni2d --output-dir runs/calibration_volumes
    gen-sr calibrate --model models/mni2d --data runs/calibration_volumes --blocks 48 --interval auto ...

With a single template there is only one brain, so the exchangeable units of the calibration are blocks of these
slabs (``--blocks``), never voxels and never the held-out slab, on which coverage is then measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gen_sr.eval.evaluate import training_slabs
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152
from gen_sr.volume import save_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--slabs", type=int, default=None, help="only the first this many (nearest the held-out slab)")
    parser.add_argument("--margin", type=int, default=4)
    args = parser.parse_args()

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, vol in training_slabs(pipe, load_mni152("t1"), margin=args.margin)[: args.slabs]:
        path = save_volume(vol, out / f"train_{name}.nii.gz", overwrite=True)
        print(f"{path}: {vol.shape} voxels")


if __name__ == "__main__":
    main()
