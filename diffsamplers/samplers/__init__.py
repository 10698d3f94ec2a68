"""Schedulers that follow the diffusers contract, one method per file."""

from .base import DiffSamplersScheduler, DiffSamplersSchedulerOutput
from .bdia import BDIAInverseOutput, BDIAScheduler
from .gaussian_stats import GaussianStats, frame_coeffs, latent_frame, teleport
from .teleport import TeleportScheduler

__all__ = [
    "BDIAInverseOutput",
    "BDIAScheduler",
    "DiffSamplersScheduler",
    "DiffSamplersSchedulerOutput",
    "GaussianStats",
    "TeleportScheduler",
    "frame_coeffs",
    "latent_frame",
    "teleport",
]
