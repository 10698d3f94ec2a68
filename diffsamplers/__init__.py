"""diffsamplers: fast, exact and well-tested diffusion samplers for Hugging Face diffusers."""

from .models import GaussianMixtureModel, exact_solution
from .pipelines import (
    AdaptiveDiffusionHandle,
    AdaptiveSkipController,
    AdaptiveStepRecord,
    enable_adaptive_diffusion,
    teleport_pipeline,
)
from .samplers import (
    BDIAEDMPredictorOutput,
    BDIAEDMScheduler,
    BDIAInverseOutput,
    BDIAScheduler,
    DualFastScheduler,
    GaussianStats,
    LMLScheduler,
    TeleportScheduler,
    teleport,
)
from .schedule import NoiseSchedule, convert_model_output, ddim_step, from_x0_eps, gaussian_flow_map, to_x0_eps

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDiffusionHandle",
    "AdaptiveSkipController",
    "AdaptiveStepRecord",
    "BDIAEDMPredictorOutput",
    "BDIAEDMScheduler",
    "BDIAInverseOutput",
    "BDIAScheduler",
    "DualFastScheduler",
    "GaussianMixtureModel",
    "GaussianStats",
    "LMLScheduler",
    "NoiseSchedule",
    "TeleportScheduler",
    "convert_model_output",
    "ddim_step",
    "enable_adaptive_diffusion",
    "exact_solution",
    "from_x0_eps",
    "gaussian_flow_map",
    "teleport",
    "teleport_pipeline",
    "to_x0_eps",
]
