"""Calibration volumes for the demo model from the MNI152 template: the model's reserved *calibration* slab, which
training never saw, cut into pieces of equal brain volume across sagittal slices
(:func:`gen_sr.eval.cases.calibration_slabs`); for a model without one (the first demo model,
``configs/mni2d.yaml``), the training region cut into slabs as thick as the held-out slab
(:func:`gen_sr.eval.cases.training_slabs`).

    python benchmarks/calibration_volumes.py --model models/heads2d --output-dir runs/calibration_volumes
    gen-sr calibrate --model models/heads2d --data runs/calibration_volumes --blocks 48 --interval auto ...

With a single template there is only one brain, so the units are blocks of these volumes (``--blocks``), never
voxels and never the held-out slab, on which coverage is then measured. Several volumes let ``--interval auto``
check how a calibration transfers between regions. Errors on the training region are in-sample;
``benchmarks/CALIBRATION_TRANSFER.md`` measures what a reserved calibration slab changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gen_sr.eval.cases import calibration_slabs, has_calibration_slab, training_slabs
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152
from gen_sr.volume import save_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--pieces", type=int, default=4, help="pieces of the calibration slab (default: 4)")
    parser.add_argument("--training-slabs", action="store_true",
                        help="write the training region's slabs even when the model reserved a calibration slab")
    parser.add_argument("--margin", type=int, default=4)
    args = parser.parse_args()

    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    t1 = load_mni152("t1")
    reserved = has_calibration_slab(pipe)
    if args.training_slabs or not reserved:
        if not reserved:
            print(f"{args.model} reserved no calibration slab: writing its training slabs (in-sample errors)")
        named = [(f"train_{n}", v) for n, v in training_slabs(pipe, t1, margin=args.margin)]
    else:
        named = [(f"calibration_{n.replace(' ', '_')}", v)
                 for n, v in calibration_slabs(pipe, t1, pieces=args.pieces, margin=args.margin)]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, vol in named:
        path = save_volume(vol, out / f"{name}.nii.gz", overwrite=True)
        print(f"{path}: {vol.shape} voxels")


if __name__ == "__main__":
    main()
