"""Evaluation: image-quality metrics now; baselines, uncertainty quality, calibration and the audit report follow."""
