# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Fitting OLSS (Duan et al., CIKM 2023, arXiv 2305.14677) on a bank of reference trajectories.

Three departures from the official code (``alibaba/EasyNLP``, ``diffusion/olss_scheduler/olss.py``), each because
it fails there on small fits:

* closed-loop rows: row ``i`` is fitted on the outputs of the model along OLSS's *own* rollout (rows 0..i-1 already
  fitted), not on the reference's outputs (teacher forcing), so the fit sees the states it will meet;
* a small ridge (relative to the basis' column norms) and a conditioning check that warns on a near-singular basis;
* the min-max path search (the paper's Algorithms 1-3) bisects the error bound from an interval built from the data
  (not a fixed ``[0, 10]``), and a failed search warns instead of silently using the uniform path.

The uniform path (the paper's OLSS-P) is always fitted too, and the better of the two on the validation bank kept.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from ..samplers.olss import OLSSScheduler
from .bank import FitModel, TrajectoryBank, evaluate

CONDITION_WARN = 1e8
AUTO_RIDGE = 1e-10


def ridge_lstsq(basis: torch.Tensor, target: torch.Tensor, ridge: float = 0.0, step: int | None = None):
    """Least squares ``min |A w - b|^2 + ridge * sum_j |A_j|^2 w_j^2`` in float64; returns ``(w, mse)``.

    ``basis`` is ``(rows, k)``, ``target`` ``(rows,)``. The ridge is relative to each column's squared norm, so it
    is scale-free. A condition number of the column-normalised basis above 1e8 (collinear features, too few
    trajectories) warns and, when ``ridge`` is 0, applies a ridge of ``AUTO_RIDGE``: a fixed ridge on a
    well-conditioned basis would only bias the fit (by about ``ridge * cond^2``).
    """
    A, b = basis.double(), target.double()
    norms = A.norm(dim=0).clamp(min=1e-300)
    An = A / norms
    sv = torch.linalg.svdvals(An)
    cond = float(sv[0] / sv[-1].clamp(min=1e-300))
    if cond > CONDITION_WARN or not torch.isfinite(sv).all():
        where = "" if step is None else f" at step {step}"
        warnings.warn(f"OLSS least squares{where} is ill-conditioned (condition number {cond:.3g}): collinear "
                      "features or too few trajectories; the ridge regularises it", stacklevel=2)
        ridge = ridge or AUTO_RIDGE
    k = A.shape[1]
    aug = torch.cat([An, (ridge**0.5) * torch.eye(k, dtype=A.dtype)])
    rhs = torch.cat([b, torch.zeros(k, dtype=b.dtype)])
    w = torch.linalg.lstsq(aug, rhs[:, None], driver="gelsd").solution[:, 0] / norms
    mse = float((A @ w - b).pow(2).mean())
    return w, mse


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


def _target(bank: TrajectoryBank, index: int) -> torch.Tensor:
    return bank.final if index >= len(bank.timesteps) else bank.states[:, index]


def _search_error(bank: TrajectoryBank, path: list[int], j: int, ridge: float) -> float:
    """Teacher-forced one-jump error from the path's last index to ``j`` (the official search basis: the current
    reference latent plus the outputs selected so far)."""
    c = path[-1]
    cols = [_flat(bank.states[:, c])] + [_flat(bank.outputs[:, p]) for p in path]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ridge_lstsq(torch.stack(cols, 1), _flat(_target(bank, j)), ridge)[1]


def _greedy_path(bank: TrajectoryBank, n: int, bound: float, ridge: float) -> list[int] | None:
    """Algorithms 1-2: from index 0 jump to the furthest index whose one-step error is <= ``bound``; a path is
    feasible if it reaches the reference's final within ``n`` steps."""
    R = len(bank.timesteps)
    path = [0]
    for _ in range(n):
        if _search_error(bank, path, R, ridge) <= bound:
            return path
        if len(path) == n:
            return None
        lo, hi = path[-1] + 1, R - 1  # binary search assumes the error grows with the jump's length
        if _search_error(bank, path, lo, ridge) > bound:
            return None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _search_error(bank, path, mid, ridge) <= bound:
                lo = mid
            else:
                hi = mid - 1
        path.append(lo)
    return None


def uniform_path(num_reference: int, n: int) -> list[int]:
    """The paper's OLSS-P path: ``n`` evenly spaced reference indices from 0."""
    return [int(round(i * num_reference / n)) for i in range(n)]


def search_path(bank: TrajectoryBank, n: int, ridge: float = 0.0, iterations: int = 30) -> tuple[list[int], float]:
    """Algorithm 3: bisect the per-step error bound; returns the feasible path of the smallest bound found."""
    R = len(bank.timesteps)
    if n > R:
        raise ValueError(f"nfe ({n}) cannot exceed the reference's {R} steps")
    hi = 1e-12 + max(_search_error(bank, uniform_path(R, n)[: i + 1], j, ridge)
                     for i, j in enumerate(uniform_path(R, n)[1:] + [R]))
    best = None
    for _ in range(8):  # grow the bound until a path is feasible
        best = _greedy_path(bank, n, hi, ridge)
        if best is not None:
            break
        hi *= 4
    if best is None:
        warnings.warn("OLSS path search found no feasible path; using the uniform path (OLSS-P)", stacklevel=2)
        return uniform_path(R, n), float("inf")
    lo = 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        path = _greedy_path(bank, n, mid, ridge)
        if path is None:
            lo = mid
        else:
            hi, best = mid, path
    if len(best) < n:  # a shorter feasible path: spend the remaining steps on the longest jumps (still within bound)
        best = _pad_path(best, n, R)
    return best, hi


def _pad_path(path: list[int], n: int, R: int) -> list[int]:
    path = list(path)
    while len(path) < n:
        ends = path[1:] + [R]
        gaps = [e - s for s, e in zip(path, ends)]
        k = max(range(len(gaps)), key=gaps.__getitem__)
        if gaps[k] < 2:
            break
        path.insert(k + 1, path[k] + gaps[k] // 2)
    return path


def fit_rows(
    model: Any, bank: TrajectoryBank, path: list[int], *, closed_loop: bool = True, ridge: float = 0.0
) -> tuple[list[float], list[list[float]], list[float]]:
    """Fit the rows on ``path``: row ``i`` maps ``[x_T, e_0..e_i]`` to the reference state at ``path[i + 1]`` (the
    final for the last row). Closed loop: ``e_i`` is the model at OLSS's own ``x_i`` (``model`` required);
    otherwise the reference's outputs (the official teacher forcing)."""
    R = len(bank.timesteps)
    x_T = bank.x_T
    x = x_T
    feats: list[torch.Tensor] = []
    coef_x, coef_e, mses = [], [], []
    for i, p in enumerate(path):
        if closed_loop:
            feats.append(model(x, bank.timesteps[p]).double())
        else:
            feats.append(bank.outputs[:, p].double())
        basis = torch.stack([_flat(x_T)] + [_flat(e) for e in feats], 1)
        target = _target(bank, path[i + 1] if i + 1 < len(path) else R)
        w, mse = ridge_lstsq(basis, _flat(target), ridge, step=i)
        coef_x.append(float(w[0]))
        coef_e.append([float(v) for v in w[1:]])
        mses.append(mse)
        x = (basis @ w).reshape(x_T.shape)
    return coef_x, coef_e, mses


def _timestep_value(t: torch.Tensor) -> float:
    v = float(t)
    return float(round(v)) if abs(v - round(v)) < 1e-9 else v


def fit_olss(
    model: FitModel,
    bank: TrajectoryBank,
    nfe: int,
    *,
    val_bank: TrajectoryBank | None = None,
    path_search: bool = True,
    closed_loop: bool = True,
    ridge: float = 0.0,
) -> OLSSScheduler:
    """Fit an ``nfe``-step :class:`OLSSScheduler` to ``model`` on ``bank`` (see the module docstring).

    Args:
        model (`FitModel`): the model (its outputs are recomputed along the rollout when ``closed_loop``).
        bank (`TrajectoryBank`): training trajectories (:func:`~diffsamplers.train.bank.build_bank`).
        nfe (`int`): steps (= model calls) of the fitted solver.
        val_bank (`TrajectoryBank`, *optional*): held-out trajectories; the searched and the uniform path are both
            fitted and the one with the lower validation RMSE is kept (default: the training bank).
        path_search (`bool`): run the min-max path search (else the uniform path only: OLSS-P).
        closed_loop (`bool`): fit rows on OLSS's own rollout (recommended) or teacher-forced.
        ridge (`float`): relative ridge of the least squares.
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if nfe > len(bank.timesteps):
        raise ValueError(f"nfe ({nfe}) cannot exceed the bank's {len(bank.timesteps)} reference steps")
    start = time.perf_counter()
    R = len(bank.timesteps)
    candidates = {"uniform": (uniform_path(R, nfe), None)}
    if path_search:
        path, bound = search_path(bank, nfe, ridge)
        candidates["search"] = (path, bound)
    val = val_bank if val_bank is not None else bank
    best = None
    scores = {}
    for name, (path, bound) in candidates.items():
        coef_x, coef_e, mses = fit_rows(model, bank, path, closed_loop=closed_loop, ridge=ridge)
        scheduler = OLSSScheduler.from_config(
            model.scheduler_config,
            solver_timesteps=[_timestep_value(bank.timesteps[p]) for p in path],
            coef_x=coef_x,
            coef_e=coef_e,
        )
        score = evaluate(scheduler, model, val)
        scores[name] = score
        if best is None or score < best[0]:
            best = (score, name, path, bound, coef_x, coef_e, mses)
    score, name, path, bound, coef_x, coef_e, mses = best
    fit_info = model.provenance(
        method="olss", reference=bank.info.get("reference"), reference_steps=bank.info.get("reference_steps"),
        num_train=len(bank), num_val=len(val), val_rmse=score, val_rmse_candidates=scores, path=name,
        path_indices=path, search_bound=None if bound is None or bound == float("inf") else bound,
        fit_mse=mses, closed_loop=closed_loop, ridge=ridge, fit_seconds=time.perf_counter() - start,
    )
    return OLSSScheduler.from_config(
        model.scheduler_config,
        solver_timesteps=[_timestep_value(bank.timesteps[p]) for p in path],
        coef_x=coef_x,
        coef_e=coef_e,
        fit_info=fit_info,
    )
