"""What a scheduler alone cannot do: skipping model calls, teleported starts for flow pipelines, data statistics,
inversion and editing."""

from ..samplers.gaussian_teleport import teleport
from .adaptive import AdaptiveDiffusionHandle, AdaptiveSkipController, AdaptiveStepRecord, enable_adaptive_diffusion
from .gaussian_stats import GaussianStats
from .inverse_problems import IdentityAutoencoder, InverseProblemOutput, InverseProblemSolver
from .inversion import Inversion, decode_images, edit, encode_images, invert, reconstruct
from .operators import (
    BlurOperator,
    BoxInpainting,
    GaussianBlur,
    InpaintingOperator,
    MeasurementOperator,
    RandomInpainting,
    SuperResolution,
)
from .polaris import PolarisGuidance, polaris_omega
from .teleported_start import teleport_pipeline

__all__ = [
    "BlurOperator",
    "BoxInpainting",
    "GaussianBlur",
    "IdentityAutoencoder",
    "InpaintingOperator",
    "InverseProblemOutput",
    "InverseProblemSolver",
    "MeasurementOperator",
    "RandomInpainting",
    "SuperResolution",
    "AdaptiveDiffusionHandle",
    "AdaptiveSkipController",
    "AdaptiveStepRecord",
    "GaussianStats",
    "Inversion",
    "PolarisGuidance",
    "decode_images",
    "edit",
    "enable_adaptive_diffusion",
    "encode_images",
    "invert",
    "polaris_omega",
    "reconstruct",
    "teleport",
    "teleport_pipeline",
]
