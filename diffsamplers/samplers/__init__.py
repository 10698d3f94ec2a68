"""Schedulers that follow the diffusers contract, one method per file."""

from .base import DiffSamplersScheduler, DiffSamplersSchedulerOutput
from .bdia import BDIAInverseOutput, BDIAScheduler
from .bdia_edm import BDIAEDMPredictorOutput, BDIAEDMScheduler
from .bespoke import BespokeScheduler
from .bns import BNSScheduler
from .dualfast import DualFastScheduler
from .gaussian_teleport import GaussianStatsLike, frame_coeffs, latent_frame, teleport
from .learned_timesteps import LearnedTimestepsScheduler
from .lml import LMLScheduler, lm_correct
from .olss import OLSSScheduler
from .slam import SLAMScheduler
from .teleport_scheduler import TeleportScheduler

__all__ = [
    "BDIAEDMPredictorOutput",
    "BDIAEDMScheduler",
    "BDIAInverseOutput",
    "BDIAScheduler",
    "BNSScheduler",
    "BespokeScheduler",
    "DiffSamplersScheduler",
    "DiffSamplersSchedulerOutput",
    "DualFastScheduler",
    "GaussianStatsLike",
    "LMLScheduler",
    "LearnedTimestepsScheduler",
    "OLSSScheduler",
    "SLAMScheduler",
    "TeleportScheduler",
    "frame_coeffs",
    "latent_frame",
    "lm_correct",
    "teleport",
]

