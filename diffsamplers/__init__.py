"""diffsamplers: fast, exact and well-tested diffusion samplers for Hugging Face diffusers.

The public names are resolved on first use (PEP 562), so ``import diffsamplers`` and the command line's ``--help``
do not import torch and diffusers; ``from diffsamplers import BDIAScheduler`` works as usual.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_EXPORTS: dict[str, str] = {
    "GaussianMixtureModel": "models",
    "exact_solution": "models",
    "AdaptiveDiffusionHandle": "pipelines",
    "AdaptiveSkipController": "pipelines",
    "AdaptiveStepRecord": "pipelines",
    "GaussianStats": "pipelines",
    "BlurOperator": "pipelines",
    "BoxInpainting": "pipelines",
    "GaussianBlur": "pipelines",
    "IdentityAutoencoder": "pipelines",
    "InpaintingOperator": "pipelines",
    "InverseProblemOutput": "pipelines",
    "InverseProblemSolver": "pipelines",
    "MeasurementOperator": "pipelines",
    "RandomInpainting": "pipelines",
    "SuperResolution": "pipelines",
    "Inversion": "pipelines",
    "PolarisGuidance": "pipelines",
    "decode_images": "pipelines",
    "edit": "pipelines",
    "encode_images": "pipelines",
    "invert": "pipelines",
    "polaris_omega": "pipelines",
    "reconstruct": "pipelines",
    "enable_adaptive_diffusion": "pipelines",
    "teleport": "pipelines",
    "teleport_pipeline": "pipelines",
    "BDIAEDMPredictorOutput": "samplers",
    "BDIAEDMScheduler": "samplers",
    "BDIAInverseOutput": "samplers",
    "BDIAScheduler": "samplers",
    "BNSScheduler": "samplers",
    "BespokeScheduler": "samplers",
    "DualFastScheduler": "samplers",
    "LMLScheduler": "samplers",
    "LearnedTimestepsScheduler": "samplers",
    "OLSSScheduler": "samplers",
    "SLAMScheduler": "samplers",
    "TeleportScheduler": "samplers",
    "NoiseSchedule": "schedule",
    "convert_model_output": "schedule",
    "ddim_step": "schedule",
    "from_x0_eps": "schedule",
    "gaussian_flow_map": "schedule",
    "to_x0_eps": "schedule",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

