# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""BDIA-EDM on the exact testbed: RMSE against the exact probability-flow solution at equal model calls.

EDM's Euler and Heun samplers (gamma = 0) and BDIA-EDM's two forms at several gamma, on the digits Gaussian mixture
behind EDM's preconditioning (default EDM config: Karras grid from sigma 80), from the same x_T; then the error ratio
per doubling of the levels on ``toy_2d`` (4 = second order, 2 = first). The figures are in benchmarks/RESULTS.md
and in ``BDIAEDMScheduler``'s docstring.

    python benchmarks/bdia_edm_testbed.py [--samples 64]
"""

from __future__ import annotations

import argparse
import math

import torch
from diffusers import EDMEulerScheduler

from diffsamplers import BDIAEDMScheduler, GaussianMixtureModel, exact_solution
from diffsamplers.testing import EDMPreconditionedGMM

SETTINGS = [("euler", g) for g in (0.0, 0.5, 0.9, 1.0)] + [("heun", g) for g in (0.0, 0.5, 1.0)]


def sample(scheduler: BDIAEDMScheduler, model: EDMPreconditionedGMM, x: torch.Tensor, levels: int) -> torch.Tensor:
    """A pipeline-style loop from ``x`` at sigma_0 (``scale_model_input`` then ``step``); the final sample."""
    scheduler.set_timesteps(levels)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def rmse_table(mixture: GaussianMixtureModel, samples: int, calls: tuple[int, ...]) -> dict:
    model = EDMPreconditionedGMM(mixture)
    x_T = 80.0 * torch.randn(samples, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = exact_solution(mixture, x_T, math.log(80.0) / 4)
    table = {}
    for solver, gamma in SETTINGS:
        for nfe in calls:
            levels = nfe if solver == "euler" else (nfe + 1) // 2  # Heun: 2N - 1 calls
            out = sample(BDIAEDMScheduler(gamma=gamma, solver=solver), model, x_T, levels)
            table[solver, gamma, nfe] = float((out - reference).pow(2).mean().sqrt())
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    edm = dict(EDMEulerScheduler().config)
    calls = (5, 9, 19, 39)
    table = rmse_table(GaussianMixtureModel.digits(scheduler_config=edm), args.samples, calls)
    print(f"RMSE vs exact, digits mixture, {args.samples} samples, at equal model calls")
    print(f"{'sampler':<22}" + "".join(f"{c:>9}" for c in calls))
    for solver, gamma in SETTINGS:
        name = f"{solver}, gamma {gamma}" if gamma else f"EDM {solver}"
        print(f"{name:<22}" + "".join(f"{table[solver, gamma, c]:9.2g}" for c in calls))
    toy = GaussianMixtureModel.toy_2d(scheduler_config=edm)
    model = EDMPreconditionedGMM(toy)
    x_T = 80.0 * torch.randn(16, *model.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = exact_solution(toy, x_T, math.log(80.0) / 4)
    print("\nerror ratio per doubling of the levels (80 -> 160 -> 320), toy_2d")
    for solver, gamma in (("heun", 0.0), ("heun", 1.0), ("euler", 0.0), ("euler", 1.0)):
        scheduler = BDIAEDMScheduler(gamma=gamma, solver=solver)
        errors = [float((sample(scheduler, model, x_T, n) - reference).pow(2).mean().sqrt()) for n in (80, 160, 320)]
        print(f"{solver}, gamma {gamma}: {errors[0] / errors[1]:.2f}, {errors[1] / errors[2]:.2f}")


if __name__ == "__main__":
    main()
