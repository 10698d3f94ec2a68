# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Fitting Bespoke Non-Stationary solvers (Shaul et al., arXiv 2403.01329) on a bank of reference trajectories.

The paper fits the ``n(n+5)/2 - 1`` parameters (``n - 1`` interior OT times, ``n`` weights ``a_i``, ``n(n+1)/2``
weights ``b_ij``) of a :class:`~diffsamplers.samplers.bns.BNSScheduler` by gradient descent on the PSNR of the final
sample, through the whole rollout, from Euler, on 520 fixed pairs with the best validation iterate kept (Sec. 5).
Here, derivative-free (the testbed's closed-form denoiser is not differentiable in its input), in two stages:

1. *times by variable projection*: for candidate times, the weights of step ``i`` are the least-squares fit of the
   reference state at ``t_{i+1}`` on ``[y_0, u_0 .. u_i]`` along the solver's *own* rollout (closed loop). The last
   row's fit is then the optimum of the final error given the earlier rows, so the loss over the times is the global
   one. Nelder-Mead searches the ``n - 1`` interior times (normalised cumulative gaps, increasing by construction);
2. *joint refinement*: Nelder-Mead on all parameters, from stage 1, on the global RMSE of the final sample (the
   paper's loss is its log).

Both stages keep the iterate with the lowest *held-out* RMSE.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict

import numpy as np
import torch

from ..samplers.bns import BNSScheduler
from ..schedule import NoiseSchedule, native_from_ot, ot_velocity
from .bank import FitModel, TrajectoryBank, increasing_times, reference_states, rmse, sample_loop, validated_search
from .olss import ridge_lstsq

__all__ = ["fit_bns_weights", "train_bns"]


def fit_bns_weights(
    model: FitModel, bank: TrajectoryBank, tau: list[float], ridge: float = 0.0
) -> tuple[list[float], list[list[float]], torch.Tensor]:
    """Closed-loop least-squares weights ``(a, b)`` of an NS solver on OT times ``tau`` (stage 1 of the module
    docstring), with the solver's final samples on ``bank``."""
    schedule = NoiseSchedule.from_config(model.scheduler_config)
    ts, alpha, sigma = native_from_ot(schedule, torch.tensor(tau, dtype=torch.float64))
    targets = reference_states(bank, model.scheduler_config, tau[1:], model.prediction_type)
    y0 = bank.x_T.double() / float(alpha[0] + sigma[0])
    y, feats, a, b = y0, [y0.reshape(-1)], [], []
    for i in range(len(tau) - 1):
        x = y * float(alpha[i] + sigma[i])
        t = float(ts[i])
        t = round(t) if abs(t - round(t)) < 1e-9 else t
        feats.append(ot_velocity(model(x, t), x, float(alpha[i]), float(sigma[i]), model.prediction_type)[1]
                     .reshape(-1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a near-collinear basis is regularised by the ridge
            w, _ = ridge_lstsq(torch.stack(feats, 1), targets[:, i].reshape(-1), ridge, step=i)
        a.append(float(w[0]))
        b.append([float(v) for v in w[1:]])
        y = (torch.stack(feats, 1) @ w).reshape(y0.shape)
    return a, b, y * float(alpha[-1] + sigma[-1])


def _flat(a: list[float], b: list[list[float]]) -> np.ndarray:
    return np.asarray(a + [w for row in b for w in row], dtype=np.float64)


def _unflat(values: np.ndarray, n: int) -> tuple[list[float], list[list[float]]]:
    values = list(map(float, values))
    a, rest = values[:n], values[n:]
    b, k = [], 0
    for i in range(n):
        b.append(rest[k : k + i + 1])
        k += i + 1
    return a, b


def train_bns(
    model: FitModel,
    bank: TrajectoryBank,
    nfe: int,
    *,
    val_bank: TrajectoryBank | None = None,
    iterations: int = 150,
    refine_iterations: int = 200,
    lr: float = 0.3,
    ridge: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    val_every: int = 10,
) -> BNSScheduler:
    """Fit a BNS solver with ``nfe`` steps (= model calls) to ``model`` on ``bank`` (see the module docstring).

    Args:
        model (`FitModel`): the model.
        bank, val_bank (`TrajectoryBank`): training and validation trajectories (default validation: ``bank``).
        nfe (`int`): steps of the solver.
        iterations (`int`): Nelder-Mead iterations over the times (stage 1; 0 keeps the config's grid).
        refine_iterations (`int`): Nelder-Mead iterations over all parameters (stage 2; 0 skips it).
        lr (`float`): size of the initial simplex over the times' log-gaps (stage 2 uses a tenth of it, relative to
            each weight).
        ridge (`float`): relative ridge of the least squares.
        checkpoint (`str`, *optional*): a JSON file per stage (``<checkpoint>.times.json``,
            ``<checkpoint>.refine.json``) written every ``val_every`` iterations; an interrupted fit resumes.
        progress (`bool`): show progress bars.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    for name, value in (("iterations", iterations), ("refine_iterations", refine_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    start = time.perf_counter()
    config = dict(model.scheduler_config)
    val = val_bank if val_bank is not None else bank
    base = BNSScheduler.from_config(config)
    base.set_timesteps(nfe)
    tau0 = base.ot_times()
    key = dict(nfe=nfe, ridge=ridge, model_hash=model.model_hash)

    def scheduler_for(tau: list[float], a: list[float], b: list[list[float]], **extra) -> BNSScheduler:
        return BNSScheduler.from_config(config, num_steps=nfe, t=tau, a=a, b=b, **extra)

    def rollout_rmse(b_: TrajectoryBank, scheduler: BNSScheduler) -> float:
        value = rmse(sample_loop(scheduler, model, b_.x_T.double(), nfe), b_.final)
        return value if math.isfinite(value) else float("inf")

    def guarded(fn):
        def score(theta: np.ndarray) -> float:
            try:
                return fn(theta)
            except (ValueError, RuntimeError, torch.linalg.LinAlgError):  # degenerate times or weights
                return float("inf")

        return score

    weights_cache: OrderedDict[tuple, tuple] = OrderedDict()

    def weights(theta: np.ndarray) -> tuple[list[float], list[float], list[list[float]], torch.Tensor]:
        # the validation re-scores an iterate the search has just fitted: keep the recent fits
        k = tuple(np.asarray(theta, dtype=np.float64).tolist())
        if k not in weights_cache:
            tau = increasing_times(theta, tau0)
            weights_cache[k] = (tau, *fit_bns_weights(model, bank, tau, ridge))
            if len(weights_cache) > 64:
                weights_cache.popitem(last=False)
        return weights_cache[k]

    def times_train(theta: np.ndarray) -> float:
        return rmse(weights(theta)[3], bank.final)

    def times_val(theta: np.ndarray) -> float:
        tau, a, b, _ = weights(theta)
        return rollout_rmse(val, scheduler_for(tau, a, b))

    def path(suffix: str):
        return None if checkpoint is None else f"{checkpoint}.{suffix}.json"

    init_val = rollout_rmse(val, base)  # Euler = DDIM on the config's grid
    stage1 = validated_search(
        guarded(times_train), guarded(times_val), np.zeros(nfe), iterations=iterations, simplex_step=lr,
        val_every=val_every, checkpoint=path("times"), key=dict(key, stage="times"), progress=progress,
        desc=f"bns times ({nfe})",
    )
    tau, a, b, _ = weights(np.asarray(stage1["best_theta"]))
    best = dict(tau=tau, a=a, b=b, val=stage1["best_val"])
    if refine_iterations:
        gaps0 = np.asarray(stage1["best_theta"], dtype=np.float64)
        w0 = _flat(a, b)
        scale = np.maximum(np.abs(w0), 1e-3)

        def unpack(theta: np.ndarray) -> BNSScheduler:
            a_, b_ = _unflat(w0 + scale * theta[nfe:], nfe)
            return scheduler_for(increasing_times(gaps0 + theta[:nfe], tau0), a_, b_)

        stage2 = validated_search(
            guarded(lambda th: rollout_rmse(bank, unpack(th))), guarded(lambda th: rollout_rmse(val, unpack(th))),
            np.zeros(nfe + len(w0)), iterations=refine_iterations, simplex_step=0.1 * lr, val_every=val_every,
            checkpoint=path("refine"), key=dict(key, stage="refine", times=tau), progress=progress,
            desc=f"bns refine ({nfe})",
        )
        if stage2["best_val"] < best["val"]:
            refined = unpack(np.asarray(stage2["best_theta"]))
            best = dict(tau=list(refined.config.t), a=list(refined.config.a), b=[list(r) for r in refined.config.b],
                        val=stage2["best_val"])
    fit_info = model.provenance(
        method="bns", reference=bank.info.get("reference"), reference_steps=bank.info.get("reference_steps"),
        num_train=len(bank), num_val=len(val), val_rmse=best["val"], val_rmse_initial=init_val,
        val_rmse_times_stage=stage1["best_val"], nfe=nfe, ridge=ridge, fit_seconds=time.perf_counter() - start,
    )
    return scheduler_for(best["tau"], best["a"], best["b"], fit_info=fit_info)
