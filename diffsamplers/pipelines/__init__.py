"""What a scheduler alone cannot do: skipping model calls, teleported starts for flow pipelines."""

from ..samplers.gaussian_stats import GaussianStats, teleport
from .adaptive import AdaptiveDiffusionHandle, AdaptiveSkipController, AdaptiveStepRecord, enable_adaptive_diffusion
from .teleport import teleport_pipeline

__all__ = [
    "AdaptiveDiffusionHandle",
    "AdaptiveSkipController",
    "AdaptiveStepRecord",
    "GaussianStats",
    "enable_adaptive_diffusion",
    "teleport",
    "teleport_pipeline",
]
