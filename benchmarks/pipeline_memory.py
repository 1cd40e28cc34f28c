"""Peak resident memory of one pipeline run against the HR grid size and the number of samples, each in its own
process (``ru_maxrss`` is a high-water mark):

    for a in "2 64" "8 64" "8 128"; do python benchmarks/pipeline_memory.py --samples ${a% *} --crop ${a#* }; done

The slope between two grid sizes at the same number of samples is what ``BYTES_PER_VOXEL_AND_SAMPLE`` in
``gen_sr/pipelines/pipeline_latent_sr.py`` rounds up, for refusing grids that cannot fit before any sampling.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np

from gen_sr.eval.cases import simulate_case
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.sample_data import load_mni152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64, help="in-plane size of the HR crop (96 slices at 1 mm)")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    hr = load_mni152("t1").canonical().crop([40, 40, 20], [40 + args.crop, 40 + args.crop, 116])
    case = simulate_case(hr, "crop", axis=pipe.sr_axis, thickness=4.0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pipe(case.lr, operator=case.operator, noise_std=0.0, num_samples=args.samples, num_inference_steps=args.steps,
         batch_size=64)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    voxels = int(np.prod(case.operator.hr_shape))
    print(f"samples {args.samples}, HR grid {case.operator.hr_shape} ({voxels} voxels): before the run "
          f"{base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
