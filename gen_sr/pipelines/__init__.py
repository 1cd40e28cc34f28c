"""Diffusers-style pipelines: :class:`LatentDiffusionSRPipeline` and the volume tiling it runs on."""

from gen_sr.pipelines.pipeline_latent_sr import LatentDiffusionSRPipeline, SRPipelineOutput

__all__ = ["LatentDiffusionSRPipeline", "SRPipelineOutput"]
