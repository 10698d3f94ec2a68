# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Learned time grids for diffusers' own solvers (LD3-style: Tong et al., "Learning to Discretize Denoising
Diffusion ODEs", arXiv 2405.15506, ICLR 2025; official code ``vinhsuhi/LD3``).

The ``n`` timesteps of an unchanged diffusers solver are optimised on the training bank to minimise the RMSE of its
final sample against the reference; the validation bank picks the best iterate. LD3 back-propagates through the
solver; here the search is derivative-free (Nelder-Mead on ``n`` log-gaps), because the objective is the real
diffusers scheduler with integer ``timesteps=`` (what a user passes to a pipeline), which is piecewise constant in
continuous time. ``n`` parameters and a few hundred solver runs on the bank suffice on the testbed and the bundled
model.

Bases: ``"dpmpp2m"`` (``DPMSolverMultistepScheduler``, DPM-Solver++(2M)) and ``"ddim"`` (the same class at
``solver_order=1``, which is DDIM exactly: DPM-Solver++'s first-order step is the DDIM step, Lu et al.,
arXiv 2211.01095, Sec. 4). diffusers' ``UniPCMultistepScheduler`` takes custom ``sigmas`` only with
``use_flow_sigmas`` and ``DDIMScheduler`` takes no custom timesteps, so neither can carry a learned VP grid.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import read_json
from .bank import FitModel, TrajectoryBank, rmse, sample_loop, validated_search

TIMEGRID_BASES = ("dpmpp2m", "ddim")
LEARNED_KEY = "learned_timesteps"


def base_scheduler(base: str, config: dict):
    """The diffusers scheduler a learned grid is for."""
    from diffusers import DPMSolverMultistepScheduler

    if base == "unipc":
        raise ValueError(
            "base='unipc' cannot carry a learned VP grid: diffusers' UniPCMultistepScheduler takes custom sigmas only "
            "with use_flow_sigmas=True; use base='dpmpp2m' or 'ddim'"
        )
    if base not in TIMEGRID_BASES:
        raise ValueError(f"base must be one of {TIMEGRID_BASES}, got {base!r}")
    order = 2 if base == "dpmpp2m" else 1
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=order)


def _timesteps_from_theta(theta: np.ndarray, t0: int) -> list[int]:
    """``n`` strictly decreasing integer timesteps from ``t0``: softmax gaps over ``[t0, -1]`` (the last gap ends
    on clean data), rounded, then nudged apart so that no two coincide."""
    w = np.exp(theta - theta.max())
    gaps = w / w.sum() * (t0 + 1)
    ts = t0 - np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    out = [int(t0)]
    for t in ts[1:]:
        out.append(int(min(max(round(t), 0), out[-1] - 1)))
    if out[-1] < 0:  # too many steps squeezed near 0: push up from the bottom
        for k in range(len(out) - 1, 0, -1):
            out[k] = max(out[k], len(out) - 1 - k)
    return out


def _theta_from_timesteps(timesteps: list[int]) -> np.ndarray:
    ts = np.asarray(list(timesteps) + [-1], dtype=np.float64)
    return np.log(ts[:-1] - ts[1:])


@dataclass
class LearnedTimeGrid:
    """A learned grid for a diffusers solver.

    ``timesteps`` is the list a pipeline takes (``pipe(..., timesteps=grid.timesteps)`` with diffusers'
    ``DPMSolverMultistepScheduler`` of the base); ``scheduler`` is a
    :class:`~diffsamplers.samplers.learned_timesteps.LearnedTimestepsScheduler` that runs the grid by itself at
    ``len(timesteps)`` steps, and :meth:`save` writes its folder (``LearnedTimestepsScheduler.from_pretrained``)."""

    base: str
    timesteps: list[int]
    scheduler: Any
    fit_info: dict

    def save(self, out_dir: str | os.PathLike) -> None:
        self.scheduler.save_pretrained(out_dir)


def load_learned_grid(path: str | os.PathLike) -> tuple[Any, list[int]]:
    """``(scheduler, timesteps)`` from a folder written by :meth:`LearnedTimeGrid.save`."""
    from ..samplers.learned_timesteps import LearnedTimestepsScheduler

    config = read_json(Path(path) / "scheduler_config.json")
    if config.get(LEARNED_KEY) is None:
        raise ValueError(f"{path}/scheduler_config.json has no {LEARNED_KEY!r}: not a learned time grid")
    scheduler = LearnedTimestepsScheduler.from_pretrained(path)
    return scheduler, list(scheduler.config.learned_timesteps)


def fit_timesteps(
    model: FitModel,
    bank: TrajectoryBank,
    nfe: int,
    *,
    base: str = "dpmpp2m",
    val_bank: TrajectoryBank | None = None,
    iterations: int = 150,
    val_every: int = 10,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> LearnedTimeGrid:
    """Optimise the ``nfe`` timesteps of a diffusers solver on ``bank`` (see the module docstring).

    Args:
        model (`FitModel`): the model.
        bank, val_bank (`TrajectoryBank`): training and validation trajectories; the iterate with the lowest
            validation RMSE is returned (default: the training bank).
        nfe (`int`): number of timesteps (model calls).
        base (`str`): ``"dpmpp2m"`` or ``"ddim"``.
        iterations (`int`): Nelder-Mead iterations.
        checkpoint (`str`, *optional*): a JSON file written every ``val_every`` iterations; an existing one (same
            model, base and ``nfe``) resumes: the search restarts from its best iterate for the iterations left.
        val_every (`int`): iterations between validations (the best validated iterate is returned).
        progress (`bool`): show a progress bar.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    start = time.perf_counter()
    config = model.scheduler_config
    scheduler = base_scheduler(base, config)
    scheduler.set_timesteps(nfe)
    init = [int(t) for t in scheduler.timesteps]
    t0 = init[0]
    theta0 = _theta_from_timesteps(init)
    val = val_bank if val_bank is not None else bank
    cache: dict[tuple, float] = {}

    def score(b: TrajectoryBank, ts: list[int]) -> float:
        key = (id(b), tuple(ts))
        if key not in cache:
            out = sample_loop(base_scheduler(base, config), model, b.x_T.to(torch.float64), None, timesteps=ts)
            value = rmse(out, b.final)
            cache[key] = value if math.isfinite(value) else float("inf")
        return cache[key]

    state = validated_search(
        lambda theta: score(bank, _timesteps_from_theta(theta, t0)),
        lambda theta: score(val, _timesteps_from_theta(theta, t0)), theta0,
        iterations=iterations, simplex_step=0.3, val_every=val_every, checkpoint=checkpoint,
        key=dict(nfe=nfe, base=base, model_hash=model.model_hash), progress=progress,
        desc=f"time grid ({base}, {nfe})",
    )
    timesteps = _timesteps_from_theta(np.asarray(state["best_theta"]), t0)
    fit_info = model.provenance(
        method=f"timesteps:{base}", reference=bank.info.get("reference"),
        reference_steps=bank.info.get("reference_steps"), num_train=len(bank), num_val=len(val),
        val_rmse=state["best_val"], val_rmse_initial=state["init_val"], initial_timesteps=init,
        fit_seconds=time.perf_counter() - start,
    )
    from ..samplers.learned_timesteps import LearnedTimestepsScheduler

    scheduler = LearnedTimestepsScheduler.from_config(base_scheduler(base, config).config, learned_timesteps=timesteps,
                                                      fit_info=fit_info)
    return LearnedTimeGrid(base, timesteps, scheduler, fit_info)
