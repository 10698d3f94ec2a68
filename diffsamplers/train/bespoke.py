# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Fitting Bespoke solvers (Shaul et al., "Bespoke Solvers for Generative Flow Models", arXiv 2310.19075).

The ``4 m - 1`` scale-time parameters of a :class:`~diffsamplers.samplers.bespoke.BespokeScheduler` (``m`` grid
points: ``n`` for RK1, ``2 n`` for RK2; OT times ``t``, rates ``t_dot``, scales ``s``, scale rates ``s_dot``, Sec. 2.3)
are fitted to one of two losses:

* ``"bound"`` (the paper's, Eqs. 24-27): the sum over steps of each step's local error on the reference path,
  ``d_i = |x(t_{i+1}) - step_i(x(t_i))|``, weighted by the product of the later steps' Lipschitz constants
  ``M_i = prod_{j > i} L_j`` (Appendix D; ``L_tau`` stands for the model's unknown Lipschitz constant, 1 in the
  paper). The reference points at the solver's times come from the bank's dense output
  (:func:`~diffsamplers.train.bank.reference_states`). It bounds the global error when ``L_tau`` is at least the
  velocity's Lipschitz constant; with ``L_tau = 1`` it is a weighting;
* ``"rmse"``: the global RMSE of the final sample against the bank's reference finals (a full rollout).

Either way the validation bank's *global* RMSE picks the best iterate (the paper keeps the best validated iterate
too; the bound alone can be gamed at very few steps). The paper back-propagates through the loss; here the search is
derivative-free (Nelder-Mead), because the testbed's closed-form denoiser is not differentiable in its input and the
scheduler rollout used is the exact one a pipeline runs. Times are parametrised
by normalised cumulative gaps, so they stay increasing with fixed ends; rates and scales by logs, so they stay
positive. The search starts at the unfitted solver (DDIM for RK1, the OT midpoint rule for RK2).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from ..samplers.bespoke import BESPOKE_BASES, BespokeScheduler, ot_velocity, rk1_step, rk2_stage1, rk2_stage2
from .bank import FitModel, TrajectoryBank, increasing_times, reference_states, rmse, sample_loop, validated_search

__all__ = ["bound_loss", "train_bespoke"]

LOSSES = ("bound", "rmse")


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square (the paper's ``|v|^2 = mean_k v_k^2``)."""
    return x.reshape(x.shape[0], -1).pow(2).mean(1).sqrt()


def bound_loss(
    scheduler: BespokeScheduler, model: FitModel, bank: TrajectoryBank, lipschitz: float = 1.0
) -> torch.Tensor:
    """Bespoke's parallel error bound (arXiv 2310.19075, Eqs. 24-27) of ``scheduler`` per bank sample, shape ``(N,)``.

    ``sum_i M_i d_i`` with the local errors ``d_i`` of each step started on the reference path (in OT coordinates,
    where the final equals the sample) and ``M_i = prod_{j > i} L_j``, ``L_j`` the step's Lipschitz constant for a
    velocity with Lipschitz constant ``lipschitz`` (RK1: ``s_j / s_{j+1} (1 + h L(r_j))``; RK2:
    ``s_j / s_{j+1} (1 + h L(r_{j+1/2}) (1 + h / 2 L(r_j)))``, ``L(r) = |s_dot| / s + t_dot lipschitz``, App. D).
    """
    if not (isinstance(lipschitz, (int, float)) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a positive number, got {lipschitz!r}")
    scheduler.set_timesteps(scheduler.config.num_steps)
    g = scheduler.stage_grid()
    rk2 = scheduler.config.solver_type == "rk2"
    stride = 2 if rk2 else 1
    n = len(g["t_dot"]) // stride
    tau, alpha, sigma = g["tau"], g["alpha"], g["sigma"]
    td, sc, sd = g["t_dot"], g["s"], g["s_dot"]
    h = stride * g["h"]  # one step
    gt = reference_states(bank, dict(scheduler.config), tau[::stride], model.prediction_type)
    pred_type = scheduler.config.prediction_type

    def velocity(y: torch.Tensor, j: int) -> torch.Tensor:
        x = y * float(alpha[j] + sigma[j])
        return ot_velocity(model(x, g["timesteps"][j]), x, float(alpha[j]), float(sigma[j]), pred_type)[1]

    def lip(j: int) -> float:
        return abs(sd[j]) / sc[j] + td[j] * lipschitz

    local, factors = [], []
    for i in range(n):
        j = stride * i
        y = gt[:, i]
        u = velocity(y, j)
        if rk2:
            y_half = rk2_stage1(y, u, h, td[j], sc[j], sd[j], sc[j + 1])
            y_next = rk2_stage2(y, y_half, velocity(y_half, j + 1), h, sc[j], td[j + 1], sc[j + 1], sd[j + 1],
                                sc[j + 2])
            factors.append(sc[j] / sc[j + 2] * (1 + h * lip(j + 1) * (1 + 0.5 * h * lip(j))))
        else:
            y_next = rk1_step(y, u, h, td[j], sc[j], sd[j], sc[j + 1])
            factors.append(sc[j] / sc[j + 1] * (1 + h * lip(j)))
        local.append(_rms(gt[:, i + 1] - y_next))
    # M_i multiplies the factors of the *later* steps (M_{n-1} = 1): an early error is amplified by every later step
    weights = [math.prod(factors[i + 1 :]) for i in range(n)]
    return sum(w * d for w, d in zip(weights, local))


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
    t = increasing_times(gaps, tau0)
    # clamp the log-scale: the bound loss and few steps can send s to 1e5 with no gain (Sec. 6 pitfalls)
    s = np.concatenate([[1.0], np.exp(np.clip(log_s, -5.0, 5.0))])
    return dict(t=t, t_dot=(np.asarray(t_dot0) * np.exp(log_rate)).tolist(), s=s.tolist(),
                s_dot=s_dot.tolist()) if m else {}


def train_bespoke(
    model: FitModel,
    bank: TrajectoryBank,
    nfe: int,
    *,
    solver_type: str = "rk2",
    loss: str = "rmse",
    lipschitz: float = 1.0,
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
        loss (`str`): ``"bound"`` (the paper's local-error bound, Eq. 26) or ``"rmse"`` (the global RMSE of the final
            sample; the default: it is what the bench measures, and what the validation keeps either way).
        lipschitz (`float`): ``L_tau`` of the bound (the paper's 1).
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
    if not (isinstance(lipschitz, (int, float)) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a positive number, got {lipschitz!r}")
    start = time.perf_counter()
    n = nfe // 2 if solver_type == "rk2" else nfe
    config = dict(model.scheduler_config)
    tau0, t_dot0 = _initial(config, solver_type, n)
    m = len(t_dot0)
    val = val_bank if val_bank is not None else bank

    def scheduler_for(theta: np.ndarray, **extra) -> BespokeScheduler:
        return BespokeScheduler.from_config(config, solver_type=solver_type, num_steps=n,
                                            **_params(theta, tau0, t_dot0), **extra)

    def score(b: TrajectoryBank, theta: np.ndarray, kind: str = "rmse") -> float:
        try:
            scheduler = scheduler_for(theta)
            if kind == "bound":
                value = float(bound_loss(scheduler, model, b, lipschitz).mean())
            else:
                value = rmse(sample_loop(scheduler, model, b.x_T.to(torch.float64)), b.final)
        except ValueError:  # a non-finite parameter set
            return float("inf")
        return value if math.isfinite(value) else float("inf")

    state = validated_search(
        lambda theta: score(bank, theta, loss), lambda theta: score(val, theta), np.zeros(4 * m),
        iterations=iterations, simplex_step=lr, val_every=val_every, checkpoint=checkpoint,
        key=dict(nfe=nfe, solver_type=solver_type, loss=loss, lipschitz=lipschitz, model_hash=model.model_hash),
        progress=progress,
        desc=f"bespoke ({solver_type}, {nfe})",
    )
    fit_info = model.provenance(
        method=f"bespoke:{solver_type}", loss=loss, lipschitz=lipschitz if loss == "bound" else None,
        reference=bank.info.get("reference"), reference_steps=bank.info.get("reference_steps"), num_train=len(bank),
        num_val=len(val),
        val_rmse=state["best_val"], val_rmse_initial=state["init_val"], nfe=nfe,
        fit_seconds=time.perf_counter() - start,
    )
    return scheduler_for(np.asarray(state["best_theta"]), fit_info=fit_info)
