"""``make demo``: super-resolution with uncertainty and the hallucination audit, end to end on a real head that no
training, calibration or design choice saw.

1. Load Colin27 (one person, 27 averaged scans, 1 mm, skull included) from the data cache (``make data`` fetched it
   from Debian's mricron-data; nothing is downloaded here), and cut a coronal slab through its centre, cropped to
   the head, so that the demo runs in minutes on a laptop-class CPU.
2. Simulate a 4 mm Gaussian-profile axial acquisition with Rician noise.
3. Super-resolve it with N samples and data consistency, and run the audit against the 1 mm truth: NIfTI maps,
   ``report.html`` and ``report.json``.
4. Print PSNR/SSIM of the SR mean beside trilinear, cubic and sinc interpolation inside the brain (Colin27's own
   brain extraction), the coverage of the (calibrated) intervals, the highest-risk place (where the report's views
   point), the verdict (the brain's flagged share and its largest cluster there), and where the report is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen_sr.audit.audit import audit
from gen_sr.audit.summary import peaks_where
from gen_sr.errors import InputError
from gen_sr.eval.baselines import BASELINES
from gen_sr.eval.cases import HELD_OUT_HEAD, held_out_head, simulate_case
from gen_sr.io import check_output_dir, check_output_path
from gen_sr.risk import Calibration, grid_text
from gen_sr.schedulers import sampler_text
from gen_sr.volume import save_volume

__all__ = ["DEFAULT_MODEL", "run_demo"]

DEFAULT_MODEL = Path("models") / "heads2d"
THICKNESS_MM = 4.0
SNR = 30.0
SEED = 0
SLAB_MM = 4.0
"""The coronal slab of the held-out head that the demo super-resolves (0: the whole head, 50 times the voxels): the
cost grows with the voxels, so that the demo stays under 5 minutes on the 2-core CPU (``benchmarks/RESULTS.md``)."""


def run_demo(output_dir: Path, overwrite: bool = False, model: Path = DEFAULT_MODEL, num_samples: int = 8,
             num_inference_steps: int | None = None, batch_size: int = 8, slab_mm: float = SLAB_MM) -> dict[str, Any]:
    """Run the demo, writing into ``output_dir``; returns the audit's JSON payload (figures included)."""
    from gen_sr.pipelines import LatentDiffusionSRPipeline

    tic = time.perf_counter()
    if not (Path(model) / "model_index.json").is_file():
        raise InputError("holds no trained model (model_index.json)", model,
                         "run the demo from the repository root, or pass --model")
    check_output_dir(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = ("hr_1mm.nii.gz", "lr_4mm.nii.gz", "brain_mask.nii.gz")
    paths = [check_output_path(output_dir / n, overwrite) for n in names]
    print(f"gen-sr demo: super-resolution with uncertainty on {HELD_OUT_HEAD}, a real head no training, calibration "
          "or design choice saw (from the data cache: `make data`; nothing is downloaded)")
    pipe = LatentDiffusionSRPipeline.from_pretrained(model)
    num_inference_steps = num_inference_steps or pipe.model_card.num_inference_steps
    head, brain = held_out_head(slab_mm=slab_mm, margin=4)
    case = simulate_case(head, f"{HELD_OUT_HEAD} coronal slab", axis=2, thickness=THICKNESS_MM, snr=SNR, seed=SEED)
    mask = head.with_data(brain.astype(np.float32))
    for path, vol in zip(paths, (case.hr, case.lr, mask), strict=True):
        save_volume(vol, path, overwrite=overwrite)
    print(f"  1. truth (1 mm)     {paths[0]}  ({_dims(case.hr)}: a {slab_mm:g} mm coronal slab through the centre, "
          "cropped to the head)")
    print(f"  2. acquisition      {paths[1]}  ({_dims(case.lr)}; {THICKNESS_MM:g} mm Gaussian axial slices, Rician "
          f"noise at SNR {SNR:g})")
    print(f"     brain mask       {paths[2]}  (Colin27's own brain extraction: where the figures are measured)")
    print(f"  3. super-resolving  {num_samples} samples, {sampler_text(pipe.sampler_name, num_inference_steps)}, "
          f"projection data consistency, model {model} ...")
    payload = audit(pipe, case.lr, output_dir / "audit", input_name=paths[1].name, model_name=str(model),
                    reference=case.hr, masks={"brain": mask}, overwrite=overwrite, operator=case.operator,
                    noise_std=case.noise_std, num_samples=num_samples, num_inference_steps=num_inference_steps,
                    batch_size=batch_size, generator=[torch.Generator().manual_seed(SEED + k)
                                                      for k in range(num_samples)])
    _print_summary(payload, output_dir / "audit", time.perf_counter() - tic)
    return payload


def _print_summary(payload: dict[str, Any], audit_dir: Path, seconds: float) -> None:
    metrics = payload["metrics"]
    print("\n  method      PSNR (dB)   SSIM     (inside the brain)")
    for name in ("gen_sr", *BASELINES):
        print(f"  {name:<10}  {metrics[name]['psnr']:8.2f}   {metrics[name]['ssim']:.4f}")
    best = max(BASELINES, key=lambda b: metrics[b]["psnr"])
    print(f"  gen_sr - best baseline ({best}): {metrics['gen_sr']['psnr'] - metrics[best]['psnr']:+.2f} dB PSNR, "
          f"{metrics['gen_sr']['ssim'] - metrics[best]['ssim']:+.4f} SSIM")
    curve = payload["calibration_curve"]
    label = "calibrated" if curve["calibrated"] else "UNcalibrated (no calibration.json in the model folder)"
    i = int(np.argmin(np.abs(np.asarray(curve["nominal"]) - (1 - curve["alpha"]))))
    record = payload["card"].get("calibration")
    made_for = ""
    if curve["calibrated"] and isinstance(record, dict):
        made_for = f" ({', '.join(filter(None, (payload['card']['interval'], grid_text(Calibration(**record)))))})"
    print(f"  coverage of the {label} {100 * (1 - curve['alpha']):g} % intervals{made_for}: "
          f"{100 * curve['observed'][i]:.1f} %")
    if payload["peaks"]:
        peak = payload["peaks"][0]
        where = peaks_where(payload["peak_rule"]["fallback"], payload["verdict"]["region"])
        print(f"  highest-risk place {where}: risk {peak['risk']:.3f} at "
              f"({', '.join(f'{x:.1f}' for x in peak['position_mm'])}) mm, {peak.get('tissue') or 'no tissue map'} "
              "(the report's views point here)")
    print(f"  {payload['verdict']['text']}")
    print(f"\nReport: {audit_dir / 'report.html'}  (self-contained; open it in any browser)  [{seconds:.0f} s]")


def _dims(volume) -> str:
    shape = " x ".join(map(str, volume.shape))
    spacing = " x ".join(f"{s:g}" for s in volume.spacing)
    return f"{shape} voxels of {spacing} mm"
