# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Fitting Bespoke solvers (Shaul et al., "Bespoke Solvers for Generative Flow Models", arXiv 2310.19075).

The ``4 m - 1`` scale-time parameters of a :class:`~diffsamplers.samplers.bespoke.BespokeScheduler` (``m`` grid
points: ``n`` for RK1, ``2 n`` for RK2; OT times ``t``, rates ``t_dot``, scales ``s``, scale rates ``s_dot``, Sec. 2.3)
are fitted to minimise the global RMSE of the final sample against the bank's reference finals; the validation bank
picks the best iterate (the paper keeps the best validated iterate too). The paper back-propagates through the
rollout; here the search is derivative-free (Nelder-Mead), because the testbed's closed-form denoiser is not
differentiable in its input and the scheduler rollout used is the exact one a pipeline runs. Times are parametrised
by normalised cumulative gaps, so they stay increasing with fixed ends; rates and scales by logs, so they stay
positive. The search starts at the unfitted solver (DDIM for RK1, the OT midpoint rule for RK2).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from ..samplers.bespoke import BESPOKE_BASES, BespokeScheduler
from .bank import FitModel, TrajectoryBank, rmse, sample_loop, validated_search

__all__ = ["train_bespoke"]

LOSSES = ("rmse",)


def _initial(config: dict, solver_type: str, n: int) -> tuple[list[float], list[float]]:
    """OT times and rates of the unfitted solver on the config's grid (the DDIM embedding)."""
    scheduler = BespokeScheduler.from_config(config, solver_type=solver_type)
    scheduler.set_timesteps(n)
    tau = (scheduler._alpha / (scheduler._alpha + scheduler._sigma)).tolist()
    return tau, list(scheduler._t_dot)


def _params(theta: np.ndarray, tau0: list[float], t_dot0: list[float]) -> dict:
    """Scheduler parameters from the unconstrained ``theta`` (gaps, log-rates, log-scales, scale rates)."""
    m = len(t_dot0)
    gaps, log_rate, log_s, s_dot = np.split(np.asarray(theta, dtype=np.float64), 4)
    gaps0 = np.diff(tau0)
    w = gaps0 * np.exp(gaps)
    t = tau0[0] + (tau0[-1] - tau0[0]) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    t[-1] = tau0[-1]
    # clamp the log-scale: the bound loss and few steps can send s to 1e5 with no gain (Sec. 6 pitfalls)
    s = np.concatenate([[1.0], np.exp(np.clip(log_s, -5.0, 5.0))])
    return dict(t=t.tolist(), t_dot=(np.asarray(t_dot0) * np.exp(log_rate)).tolist(), s=s.tolist(),
                s_dot=s_dot.tolist()) if m else {}


def train_bespoke(
    model: FitModel,
    bank: TrajectoryBank,
    nfe: int,
    *,
    solver_type: str = "rk2",
    loss: str = "rmse",
    val_bank: TrajectoryBank | None = None,
    iterations: int = 300,
    lr: float = 0.1,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    val_every: int = 10,
) -> BespokeScheduler:
    """Fit a Bespoke RK1/RK2 solver with ``nfe`` model calls to ``model`` on ``bank`` (see the module docstring).

    Args:
        model (`FitModel`): the model.
        bank, val_bank (`TrajectoryBank`): training and validation trajectories (default validation: ``bank``).
        nfe (`int`): model calls; RK2 makes two per step, so it needs an even ``nfe``.
        solver_type (`str`): ``"rk1"`` or ``"rk2"``.
        loss (`str`): ``"rmse"``, the global RMSE of the final sample.
        iterations (`int`): Nelder-Mead iterations.
        lr (`float`): size of the initial simplex in the unconstrained parameters.
        checkpoint (`str`, *optional*): a JSON file written every ``val_every`` iterations; an existing one for the
            same model, solver and ``nfe`` resumes from its best iterate for the iterations left.
        progress (`bool`): show a progress bar.
    """
    if solver_type not in BESPOKE_BASES:
        raise ValueError(f"solver_type must be one of {BESPOKE_BASES}, got {solver_type!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver_type == "rk2" and nfe % 2:
        raise ValueError(f"nfe must be even for solver_type='rk2' (two model calls per step), got nfe={nfe}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    start = time.perf_counter()
    n = nfe // 2 if solver_type == "rk2" else nfe
    config = dict(model.scheduler_config)
    tau0, t_dot0 = _initial(config, solver_type, n)
    m = len(t_dot0)
    val = val_bank if val_bank is not None else bank

    def scheduler_for(theta: np.ndarray, **extra) -> BespokeScheduler:
        return BespokeScheduler.from_config(config, solver_type=solver_type, num_steps=n,
                                            **_params(theta, tau0, t_dot0), **extra)

    def score(b: TrajectoryBank, theta: np.ndarray) -> float:
        try:
            value = rmse(sample_loop(scheduler_for(theta), model, b.x_T.to(torch.float64)), b.final)
        except ValueError:  # a non-finite parameter set
            return float("inf")
        return value if math.isfinite(value) else float("inf")

    state = validated_search(
        lambda theta: score(bank, theta), lambda theta: score(val, theta), np.zeros(4 * m),
        iterations=iterations, simplex_step=lr, val_every=val_every, checkpoint=checkpoint,
        key=dict(nfe=nfe, solver_type=solver_type, loss=loss, model_hash=model.model_hash), progress=progress,
        desc=f"bespoke ({solver_type}, {nfe})",
    )
    fit_info = model.provenance(
        method=f"bespoke:{solver_type}", loss=loss, reference=bank.info.get("reference"),
        reference_steps=bank.info.get("reference_steps"), num_train=len(bank), num_val=len(val),
        val_rmse=state["best_val"], val_rmse_initial=state["init_val"], nfe=nfe,
        fit_seconds=time.perf_counter() - start,
    )
    return scheduler_for(np.asarray(state["best_theta"]), fit_info=fit_info)
