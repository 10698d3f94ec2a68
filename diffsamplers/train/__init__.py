"""Fitting and learning sampler parameters: learned solvers (OLSS, Bespoke/BNS, time grids) and distillation (SLAM).

Names are resolved on first use, as in the top-level package.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "FitModel": "bank",
    "TrajectoryBank": "bank",
    "build_bank": "bank",
    "fit_olss": "olss",
    "train_bespoke": "bespoke",
    "train_bns": "bns",
    "LearnedTimeGrid": "timegrid",
    "fit_timesteps": "timegrid",
    "load_learned_grid": "timegrid",
    "SLAMConfig": "slam",
    "SLAMDistiller": "slam",
    "load_lora_student": "slam",
    "load_student": "slam",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
