"""diffsamplers: fast, exact and well-tested diffusion samplers for Hugging Face diffusers.

The public names are resolved on first use (PEP 562), so ``import diffsamplers`` and the command line's ``--help``
do not import torch and diffusers; ``from diffsamplers import BDIAScheduler`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the subpackage that defines it
_EXPORTS: dict[str, str] = {
    "GaussianMixtureModel": "models",
    "exact_solution": "models",
    "AdaptiveDiffusionHandle": "pipelines",
    "AdaptiveSkipController": "pipelines",
    "AdaptiveStepRecord": "pipelines",
    "GaussianStats": "pipelines",
    "enable_adaptive_diffusion": "pipelines",
    "teleport": "pipelines",
    "teleport_pipeline": "pipelines",
    "BDIAEDMPredictorOutput": "samplers",
    "BDIAEDMScheduler": "samplers",
    "BDIAInverseOutput": "samplers",
    "BDIAScheduler": "samplers",
    "DualFastScheduler": "samplers",
    "LMLScheduler": "samplers",
    "TeleportScheduler": "samplers",
    "NoiseSchedule": "schedule",
    "convert_model_output": "schedule",
    "ddim_step": "schedule",
    "from_x0_eps": "schedule",
    "gaussian_flow_map": "schedule",
    "to_x0_eps": "schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffsamplers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    # cache it in the package namespace, but never let a submodule of the same name shadow it there: `import
    # diffsamplers.pipelines.teleport` binds the submodule on its parent package only
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .models import GaussianMixtureModel, exact_solution
    from .pipelines import (
        AdaptiveDiffusionHandle,
        AdaptiveSkipController,
        AdaptiveStepRecord,
        GaussianStats,
        enable_adaptive_diffusion,
        teleport,
        teleport_pipeline,
    )
    from .samplers import (
        BDIAEDMPredictorOutput,
        BDIAEDMScheduler,
        BDIAInverseOutput,
        BDIAScheduler,
        DualFastScheduler,
        LMLScheduler,
        TeleportScheduler,
    )
    from .schedule import NoiseSchedule, convert_model_output, ddim_step, from_x0_eps, gaussian_flow_map, to_x0_eps
