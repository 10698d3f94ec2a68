"""What a scheduler alone cannot do: skipping model calls, teleported starts for flow pipelines, data statistics."""

from ..samplers.gaussian_teleport import teleport
from .adaptive import AdaptiveDiffusionHandle, AdaptiveSkipController, AdaptiveStepRecord, enable_adaptive_diffusion
from .gaussian_stats import GaussianStats
from .teleported_start import teleport_pipeline

__all__ = [
    "AdaptiveDiffusionHandle",
    "AdaptiveSkipController",
    "AdaptiveStepRecord",
    "GaussianStats",
    "enable_adaptive_diffusion",
    "teleport",
    "teleport_pipeline",
]
