"""Diffusers-style pipelines (``LatentDiffusionSRPipeline``); see the pipeline issue. Nothing here yet."""
