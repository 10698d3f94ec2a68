# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Error of any scheduler against the exact ODE solution of the Gaussian-mixture testbed.

This is the exact half of ``diffsamplers bench``: each sampler starts from the same ``x_T`` and its final sample is
compared with :func:`~diffsamplers.models.exact_solution` from the sampler's own first level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..models import GaussianMixtureModel, exact_solution

# diffusers VP config the testbed runs under: trailing spacing starts at t = 999 and ends on clean data
TESTBED_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    clip_sample=False,
    set_alpha_to_one=True,
    timestep_spacing="trailing",
    prediction_type="epsilon",
)


@dataclass
class SamplerSpec:
    """How to build one sampler and how many of its steps give an NFE budget.

    Args:
        name (`str`): the label in tables.
        build (`Callable[[dict], scheduler]`): makes a fresh scheduler from the testbed config.
        steps_for_nfe (`Callable[[int], int]`): number of inference steps for a model-call budget.
        default (`bool`): part of the default ``diffsamplers bench`` run (variants are run on request).
        adaptive (`dict`, *optional*): run with :func:`~diffsamplers.enable_adaptive_diffusion` and these arguments;
            the model calls it actually makes are reported as the NFE (next to the budget asked for).
        description (`str`): one line for ``diffsamplers bench --list``.
        fit (`Callable[[model, int, list[int]], scheduler]`, *optional*): fitted samplers: ``fit(model, nfe, seeds)``
            returns a scheduler fitted to the bench model for that budget on seeds disjoint from the bench's
            ``seeds`` (used instead of ``build``; the cost of the fit, ``fit_info["fit_seconds"]`` of its config,
            is reported as ``fit_seconds``).
        denoiser (`Callable[[device], torch.nn.Module]`, *optional*): distilled samplers: the network to run instead
            of the bench model's (a distilled student is another model as well as another scheduler).
    """

    name: str
    build: Callable[[dict], Any]
    steps_for_nfe: Callable[[int], int] = lambda nfe: nfe
    default: bool = True
    adaptive: dict | None = None
    description: str = ""
    fit: Callable[[Any, int, list[int]], Any] | None = None
    denoiser: Callable[[Any], Any] | None = None


def fit_seconds(scheduler: Any) -> float | None:
    """What fitting ``scheduler`` cost, from the provenance a fitted scheduler records (``None`` if it has none)."""
    info = getattr(scheduler, "config", {}).get("fit_info") or {}
    seconds = info.get("fit_seconds")
    return None if seconds is None else float(seconds)


def diffusers_baselines() -> dict[str, SamplerSpec]:
    """diffusers' DDIM, Euler, Heun, DPM-Solver++(2M) and UniPC(bh2) as the baselines."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    return {
        "ddim": SamplerSpec("ddim", lambda c: DDIMScheduler.from_config(c), description="diffusers' DDIM (eta = 0)"),
        "euler": SamplerSpec("euler", lambda c: EulerDiscreteScheduler.from_config(c),
                             description="diffusers' Euler (first order in the EDM sigma)"),
        # Heun calls the model twice per step except on its last (Euler) step. It keeps its own default
        # "linspace" spacing: with "trailing" its final Euler jump starts at sigma ~ sqrt(T / N), an O(1/N) error.
        "heun": SamplerSpec(
            "heun",
            lambda c: HeunDiscreteScheduler.from_config(c, timestep_spacing="linspace"),
            lambda nfe: (nfe + 1) // 2,
            description="diffusers' Heun (second order, two calls per step but the last)",
        ),
        "dpmpp2m": SamplerSpec(
            "dpmpp2m", lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++"),
            description="diffusers' DPM-Solver++(2M), the ground truth's solver",
        ),
        "unipc": SamplerSpec("unipc", lambda c: UniPCMultistepScheduler.from_config(c),
                             description="diffusers' UniPC (bh2 predictor-corrector)"),
    }


class AdaptiveHolder:
    """What :func:`~diffsamplers.enable_adaptive_diffusion` patches, a ``unet`` and a ``scheduler``, for loops that
    drive a bare model instead of a pipeline (the bench's own loop keeps its noise, spacing and call counting)."""

    def __init__(self, unet: Any, scheduler: Any):
        self.unet, self.scheduler = unet, scheduler


def run_scheduler(
    scheduler: Any,
    model: Any,
    x_T: torch.Tensor,
    num_inference_steps: int,
    adaptive: dict | None = None,
    **call_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """A plain diffusers sampling loop; returns the final sample and the number of model calls. With ``adaptive``
    (arguments of :func:`~diffsamplers.enable_adaptive_diffusion`) the model output is reused where the
    AdaptiveDiffusion criterion allows, and the calls it really made are returned."""
    if adaptive is not None:
        from ..pipelines.adaptive import enable_adaptive_diffusion

        with enable_adaptive_diffusion(AdaptiveHolder(model, scheduler), **adaptive) as handle:
            sample, _ = run_scheduler(scheduler, model, x_T, num_inference_steps, **call_kwargs)
            return sample, handle.nfe
    scheduler.set_timesteps(num_inference_steps)
    sample = x_T * scheduler.init_noise_sigma
    calls = 0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        out = model(model_input, t, **call_kwargs).sample
        calls += 1
        sample = scheduler.step(out, t, sample).prev_sample
    return sample, calls


def first_level_timestep(scheduler: Any, num_inference_steps: int) -> float:
    """The diffusers timestep of a scheduler's first model evaluation (its start level)."""
    scheduler.set_timesteps(num_inference_steps)
    return float(scheduler.timesteps[0])


def exact_testbed_errors(
    samplers: dict[str, SamplerSpec],
    nfes: list[int],
    *,
    model: GaussianMixtureModel | None = None,
    num_samples: int = 16,
    seed: int = 0,
    config: dict | None = None,
    progress: bool = False,
) -> list[dict]:
    """RMSE of each sampler's final sample against the exact solution, one record per (sampler, NFE).

    Records carry ``sampler``, ``budget`` (the entry of ``nfes``), ``nfe`` (model calls actually made), ``steps``,
    ``rmse_vs_gt`` and ``seconds_per_image``.
    """
    config = dict(config or TESTBED_CONFIG)
    model = model or GaussianMixtureModel.digits(scheduler_config=config)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, *model.shape, generator=g, dtype=torch.float64)
    references: dict[float, torch.Tensor] = {}
    records = []
    items = [(name, spec, nfe) for name, spec in samplers.items() for nfe in nfes]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="testbed bench")
    bench_seeds = list(range(seed, seed + num_samples))
    for name, spec, nfe in items:
        if spec.denoiser is not None:
            raise ValueError(f"{name} runs its own network: it has no place on the exact testbed")
        if spec.fit is not None:
            scheduler = spec.fit(testbed_bench_model(model, config), nfe, bench_seeds)
        else:
            scheduler = spec.build(config)
        steps = spec.steps_for_nfe(nfe)
        start = time.perf_counter()
        sample, calls = run_scheduler(scheduler, model, x_T, steps, adaptive=spec.adaptive)
        seconds = time.perf_counter() - start
        t0 = first_level_timestep(scheduler, steps)
        if t0 not in references:
            references[t0] = exact_solution(model, x_T, t0)
        rmse = float((sample.double() - references[t0]).pow(2).mean().sqrt())
        record = dict(sampler=name, budget=nfe, nfe=calls, steps=steps, rmse_vs_gt=rmse,
                      seconds_per_image=seconds / num_samples)
        if spec.fit is not None:
            record["fit_seconds"] = fit_seconds(scheduler)
        records.append(record)
    return records


def testbed_bench_model(model: GaussianMixtureModel, config: dict) -> Any:
    """The testbed as a :class:`~diffsamplers.eval.bench.BenchModel`, for samplers fitted to it (``decode`` is the
    identity: its samples are already in data space)."""
    from .bench import BenchModel

    return BenchModel(name="testbed", denoiser=model, sample_shape=tuple(model.shape), scheduler_config=dict(config),
                      decode=lambda x: x)


def loglog_slope(records: list[dict], sampler: str) -> float:
    """The fitted convergence order: minus the slope of log(error) against log(NFE)."""
    rows = [r for r in records if r["sampler"] == sampler]
    x = torch.tensor([r["nfe"] for r in rows], dtype=torch.float64).log()
    y = torch.tensor([r["rmse_vs_gt"] for r in rows], dtype=torch.float64).log()
    x, y = x - x.mean(), y - y.mean()
    return float(-(x * y).sum() / (x * x).sum())
