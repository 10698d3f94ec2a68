"""diffsamplers: fast, exact and well-tested diffusion samplers for Hugging Face diffusers."""

from .models import GaussianMixtureModel, exact_solution
from .schedule import NoiseSchedule, convert_model_output, ddim_step, from_x0_eps, to_x0_eps

__version__ = "0.1.0"

__all__ = [
    "GaussianMixtureModel",
    "NoiseSchedule",
    "convert_model_output",
    "ddim_step",
    "exact_solution",
    "from_x0_eps",
    "to_x0_eps",
]
