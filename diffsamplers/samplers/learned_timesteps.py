# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""diffusers' DPM-Solver(++) on a learned time grid (LD3-style: Tong et al., "Learning to Discretize Denoising
Diffusion ODEs", ICLR 2025, arXiv 2405.15506; official code ``vinhsuhi/LD3``).

The solver is ``DPMSolverMultistepScheduler`` unchanged; the config carries the grid (``learned_timesteps``) and its
provenance (``fit_info``), so the scheduler folder written by :func:`diffsamplers.train.timegrid.fit_timesteps`
(``diffsamplers fit timesteps``) loads with ``from_pretrained`` and any pipeline then runs the learned grid when it
asks for ``len(learned_timesteps)`` steps. The grid is also a plain list: ``pipe(..., timesteps=grid)`` with
diffusers' own scheduler gives the same samples.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler

from ._fitted import check_fit_info, warn_if_off_fit
from .checks import (
    check_config_argument,
    check_custom_timesteps,
    check_learned_variance,
    check_model_output,
    check_num_inference_steps,
    check_on_grid,
)

__all__ = ["LearnedTimestepsScheduler"]

_EXTRA_CONFIG = ("learned_timesteps", "fit_info")


class LearnedTimestepsScheduler(DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` whose default grid, at its fitted step count, is a learned one.

    Build it with ``LearnedTimestepsScheduler.from_config(config, learned_timesteps=[...])`` or
    ``from_pretrained(folder)``; every DPM-Solver argument of ``config`` is kept (``solver_order=1`` is DDIM).
    ``set_timesteps(len(learned_timesteps))`` (what a pipeline calls) or ``set_timesteps()`` runs the learned grid;
    another step count runs the config's own grid with a warning, and explicit ``timesteps=`` are honoured as
    diffusers does. Without ``learned_timesteps`` it is ``DPMSolverMultistepScheduler``.

    Config (besides DPM-Solver's):
        learned_timesteps (`list[int]`, *optional*): strictly decreasing timesteps in ``[0, num_train_timesteps)``.
        fit_info (`dict`, *optional*): provenance of the fit (model, reference, validation error, ...).
    """

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As diffusers' ``from_config``; a path or Hub id raises a ``TypeError`` (use ``from_pretrained``), a
        learned-variance config a ``ValueError``."""
        check_config_argument(config, cls)
        if config is not None:
            check_learned_variance(dict(config), cls)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs: Any):
        # the two extra entries are registered to the config by from_config, not passed to DPM-Solver's __init__
        config_dict = dict(config_dict)
        extra = {k: kwargs.pop(k) if k in kwargs else config_dict.pop(k, None) for k in _EXTRA_CONFIG}
        config_dict = {k: v for k, v in config_dict.items() if k not in _EXTRA_CONFIG}
        init_dict, unused, hidden = super().extract_init_dict(config_dict, **kwargs)
        _check_grid(extra["learned_timesteps"], init_dict.get("num_train_timesteps", 1000))
        check_fit_info(extra["fit_info"])
        hidden.update(extra)
        return init_dict, unused, hidden

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        # the argument checks diffusers' DPMSolverMultistepScheduler leaves out (0, True, 2.5 or a reversed list)
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        if timesteps is not None:
            timesteps = check_custom_timesteps(timesteps, self.config.num_train_timesteps).tolist()
        grid = self.config.get("learned_timesteps")
        if grid is not None and timesteps is None:
            if num_inference_steps is None or num_inference_steps == len(grid):
                num_inference_steps, timesteps = None, list(grid)
            else:
                warnings.warn(
                    f"LearnedTimestepsScheduler: fitted for {len(grid)} steps, asked for {num_inference_steps}: "
                    "running the config's own grid", stacklevel=2,
                )
        super().set_timesteps(num_inference_steps, device, mu=mu, timesteps=timesteps)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """DPM-Solver's step, after the checks it leaves out: ``model_output`` of the sample's shape and a first
        ``timestep`` on the grid (diffusers would otherwise silently start from the last level)."""
        check_model_output(model_output, sample)
        if self.step_index is None:
            check_on_grid(timestep, self.timesteps if self.num_inference_steps is not None else None)
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict)

    def check_fit(self, resolution: Any = None, guidance_scale: float | None = None) -> None:
        """Warn when used at another resolution or guidance scale than the fit's."""
        warn_if_off_fit(type(self).__name__, self.config.get("fit_info"), resolution, guidance_scale)


def _check_grid(grid: Any, num_train_timesteps: int) -> None:
    if grid is None:
        return
    if not isinstance(grid, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in grid):
        raise ValueError(f"learned_timesteps must be a list of integer timesteps, got {grid!r}")
    check_custom_timesteps(grid, num_train_timesteps, "learned_timesteps")
