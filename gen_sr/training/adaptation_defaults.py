"""The defaults of per-scan adaptation (:mod:`gen_sr.training.adaptation`, :mod:`gen_sr.training.scan_fit`) and of its
per-scan calibration (:mod:`gen_sr.eval.scan_calibration`), in a module that imports nothing: the command line shows
them in ``gen-sr super-resolve --help`` without importing torch, diffusers and MONAI, and the dataclasses and
functions of those modules take their defaults from here."""

from __future__ import annotations

from typing import Literal

__all__ = ["BATCH_SIZE", "HOLDOUT_EVERY", "KEEP_BETTER", "LEARNING_RATE", "RECORRUPT_PAIRS", "REFERENCE",
           "REFERENCE_NOISE", "STEPS", "WEIGHT_MIX", "HeldOutReference", "ReferenceNoise"]

STEPS = 200
"""Fine-tuning steps (:class:`gen_sr.training.adaptation.AdaptationConfig`'s ``train.steps``)."""

BATCH_SIZE = 8
"""In-plane crops per fine-tuning step."""

LEARNING_RATE = 2e-5
"""The fine-tuning's learning rate (constant after a short warm-up)."""

HOLDOUT_EVERY = 5
"""Every k-th in-plane slice is kept out of the fine-tuning, for the per-scan calibration."""

WEIGHT_MIX = 1.0
"""The share of the fine-tuned weights in the adapted UNet (WiSE-FT): on validation scans the mix's through-plane
PSNR lay on the line between its two ends (``benchmarks/ADAPTATION.md``, "Round 5"), so the fine-tuned UNet is kept."""

HeldOutReference = Literal["noisy", "recorrupted"]

KEEP_BETTER = True
""":func:`~gen_sr.training.scan_fit.fit_to_scan`'s and the CLI's default for ``keep_better``: adopted on three
validation subjects by a criterion fixed before the runs (``benchmarks/ADAPTATION.md``, "Round 2")."""

REFERENCE: HeldOutReference = "noisy"
""":func:`~gen_sr.training.scan_fit.fit_to_scan`'s and the CLI's default ``reference``: recorrupted references changed
no choice on six validation scans (``benchmarks/ADAPTATION.md``, "Round 3"), so the cheaper comparison stays."""

RECORRUPT_PAIRS = True
"""Whether :func:`~gen_sr.training.scan_fit.fit_to_scan` recorrupts the fine-tuning pairs with the scan's noise std
where it is known (given, or read from its air: ``scan_noise_std="auto"``) and the caller sets no ``noise_std`` of its
own: adopted on six validation scans at SNR 30 by a criterion fixed before the runs (``benchmarks/ADAPTATION.md``,
"Round 4")."""

ReferenceNoise = Literal["keep", "extrapolate"]

REFERENCE_NOISE: ReferenceNoise = "keep"
""":func:`~gen_sr.eval.scan_calibration.calibrate_on_scan`'s default ``reference_noise``: ``"extrapolate"`` came nearer
the scale that clean references give than ``"keep"`` on four fresh validation scans at SNR 30, but 18 % from it on
one (round 7 of ``benchmarks/ADAPTATION.md``), so it is not the default."""
