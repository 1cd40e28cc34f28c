"""Does the data-consistency residual mark the lesions the model takes contrast from? (a measurement for the design
of a residual-based flag; no choice is made here)

    python benchmarks/residual_at_lesions.py HR.nii.gz [HR.nii.gz ...] [--model models/heads2d] [--snr 30] \\
        [--slab 24] [--samples 8]

Each HR volume (a validation subject, e.g. ``gen-sr sample-data --name robex_brain --subject 10``; brain-only, so
every lesion lies in tissue) is cut to a central coronal slab of ``--slab`` mm and cropped to its foreground; the
stress test's lesions are inserted (2 and 6 mm, six of each, one removed site per size, seed 0), 4 mm Gaussian slices
simulated at ``--snr`` and super-resolved at the model folder's sampler. Printed per site kind and size: the mean of
``|A x − y| / σ`` inside each site (the residual brought onto the HR grid by
:meth:`~gen_sr.physics.AcquisitionOperator.residual_map`, in units of the noise std), the model's ``recovered`` and
what the slices alone carry (``data_alone``); and the site AUROC of that mean residual, added lesions against control
sites of the same size.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gen_sr.eval.cases import central_slab, crop_to_foreground, simulate_case, super_resolve
from gen_sr.eval.stress import insert_lesions, measure_sites
from gen_sr.eval.uncertainty import auroc
from gen_sr.pipelines import LatentDiffusionSRPipeline
from gen_sr.volume import load_volume

SIZES = ("2 mm", "6 mm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("volumes", nargs="+", help="HR volumes (NIfTI), brain-only")
    parser.add_argument("--model", default="models/heads2d")
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--slab", type=float, default=24.0, help="coronal slab width in mm")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    pipe = LatentDiffusionSRPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    for path in args.volumes:
        hr = crop_to_foreground(central_slab(load_volume(path), args.slab, 1))
        truth, lesions = insert_lesions(hr, diameters_mm=(2.0, 6.0), n_per_size=6, removed=1, seed=0)
        case = simulate_case(truth, path, axis=2, thickness=4.0, snr=args.snr, seed=0)
        out = super_resolve(pipe, case, num_samples=args.samples, generator=torch.Generator().manual_seed(0),
                            keep_samples=False, output_type="np")
        sr = np.asarray(out.mean, np.float64)
        x = torch.from_numpy(sr)[None, None]
        residual = case.operator.residual_map(x, case.lr_tensor())[0, 0].numpy() / case.noise_std
        sites = measure_sites(sr, truth.data, lesions, truth.affine, operator=case.operator)
        print(f"== {path}: {hr.shape} voxels, noise std {case.noise_std:.3g}, {out.record.scheduler} x "
              f"{out.record.num_inference_steps}; |A x - y| / sigma over the slab's foreground: mean "
              f"{residual[truth.data > 0].mean():.2f}")
        inside: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for les, s in zip(lesions, sites, strict=True):
            mask = les.mask(truth.affine, truth.shape)
            inside.setdefault((les.kind, les.label), []).append((float(residual[mask].mean()), s["recovered"],
                                                                  s["data_alone"]))
        for (kind, label), rows in sorted(inside.items()):
            v = np.array(rows)
            print(f"{kind} {label}: residual/sigma inside {np.round(v[:, 0], 2).tolist()}; recovered "
                  f"{np.round(v[:, 1], 2).tolist()}; the slices alone {np.round(v[:, 2], 2).tolist()}")
        for label in SIZES:
            added = [r[0] for r in inside[("added", label)]]
            controls = [r[0] for r in inside[("control", label)]]
            labels = np.array([True] * len(added) + [False] * len(controls))
            print(f"{label}: site AUROC of the mean residual, added against control: "
                  f"{auroc(np.array(added + controls), labels):.3f}")


if __name__ == "__main__":
    main()
