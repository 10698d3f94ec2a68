"""Schedulers that follow the diffusers contract, one method per file."""

from typing import Any

from .base import DiffSamplersScheduler, DiffSamplersSchedulerOutput
from .bdia import BDIAInverseOutput, BDIAScheduler
from .bdia_edm import BDIAEDMPredictorOutput, BDIAEDMScheduler
from .dualfast import DualFastScheduler
from .gaussian_teleport import GaussianStatsLike, frame_coeffs, latent_frame, teleport
from .lml import LMLScheduler, lm_correct
from .teleport_scheduler import TeleportScheduler

__all__ = [
    "BDIAEDMPredictorOutput",
    "BDIAEDMScheduler",
    "BDIAInverseOutput",
    "BDIAScheduler",
    "DiffSamplersScheduler",
    "DiffSamplersSchedulerOutput",
    "DualFastScheduler",
    "GaussianStatsLike",
    "LMLScheduler",
    "TeleportScheduler",
    "frame_coeffs",
    "latent_frame",
    "lm_correct",
    "teleport",
]


def __getattr__(name: str) -> Any:
    # GaussianStats streams datasets through VAEs, so it lives in diffsamplers.pipelines; this lazy alias keeps
    # `from diffsamplers.samplers import GaussianStats` (diffsamplers.eval.samplers) working until that import moves
    if name == "GaussianStats":
        from ..pipelines.gaussian_stats import GaussianStats

        return GaussianStats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
