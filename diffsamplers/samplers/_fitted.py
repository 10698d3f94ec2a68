# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""What fitted (learned) schedulers share: the fitted-for checks read from the provenance in their config.

A learned solver (OLSS, Bespoke, BNS) is fitted to one model at one step count, one resolution and one guidance
scale. It cannot run at another step count (its coefficients are per step), and is off-distribution at another
resolution or guidance scale (Duan et al., arXiv 2305.14677, fit their coefficients on trajectories generated at
one guidance scale; Shaul et al., arXiv 2403.01329, Sec. 5, fit one solver per guidance scale).
"""

from __future__ import annotations

import warnings
from typing import Any

# provenance keys every fitted scheduler's ``fit_info`` carries (absent values are None)
PROVENANCE_KEYS = (
    "model",
    "model_hash",
    "resolution",
    "guidance_scale",
    "prediction_type",
    "reference",
    "reference_steps",
    "num_train",
    "val_rmse",
)


def check_fitted_steps(name: str, fitted_steps: int, num_inference_steps: Any, timesteps: Any, sigmas: Any) -> None:
    """A fitted solver runs only at the step count it was fitted for, on its own grid."""
    if timesteps is not None or sigmas is not None:
        raise ValueError(
            f"{name} was fitted on its own grid of {fitted_steps} steps; custom timesteps/sigmas cannot be used "
            "(refit it for another grid)"
        )
    if num_inference_steps is not None and int(num_inference_steps) != fitted_steps:
        raise ValueError(
            f"{name} was fitted for num_inference_steps={fitted_steps}, got num_inference_steps="
            f"{num_inference_steps}; its coefficients are per step: refit it (`diffsamplers fit ... --nfe "
            f"{num_inference_steps}`)"
        )


def refuse_begin_index(name: str, begin_index: int) -> None:
    """img2img / ``strength`` starts mid-way; a solver whose steps combine ``x_T`` and the whole history of model
    outputs cannot (it was fitted from pure noise)."""
    if int(begin_index) != 0:
        raise ValueError(
            f"{name} cannot start mid-way (begin_index={begin_index}: img2img/`strength` < 1): it was fitted from "
            "pure noise x_T and combines the whole run's history; use a training-free scheduler for img2img"
        )


def warn_if_off_fit(name: str, fit_info: dict | None, resolution: Any = None, guidance_scale: Any = None) -> None:
    """Warn when a fitted scheduler is used at another resolution or guidance scale than it was fitted at."""
    if not fit_info:
        return
    fitted_res = fit_info.get("resolution")
    if resolution is not None and fitted_res is not None and list(resolution) != list(fitted_res):
        warnings.warn(
            f"{name} was fitted at resolution {list(fitted_res)} but is used at {list(resolution)}; its "
            "coefficients may be off-distribution (refit for this resolution)",
            stacklevel=3,
        )
    fitted_w = fit_info.get("guidance_scale")
    if guidance_scale is not None and fitted_w is not None and float(guidance_scale) != float(fitted_w):
        warnings.warn(
            f"{name} was fitted at guidance_scale={fitted_w} but is used at {guidance_scale}; refit for this "
            "guidance scale",
            stacklevel=3,
        )


def check_fit_info(fit_info: Any) -> dict | None:
    if fit_info is None:
        return None
    if not isinstance(fit_info, dict):
        raise TypeError(f"fit_info must be a dict of provenance (JSON values), got {type(fit_info).__name__}")
    return fit_info
