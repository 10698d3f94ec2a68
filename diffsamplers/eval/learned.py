# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Bench entries of fitted solvers: ``olss``, ``bespoke``, ``bns``, ``dpmpp2m-learned`` and ``ddim-learned``.

Each is fitted, per budget, to the bench's model on seeds disjoint from the bench's (the fitting splits of
:func:`~diffsamplers.train.bank.split_seeds`), and cached on disk under ``$DIFFSAMPLERS_CACHE/fits`` (default
``~/.cache/diffsamplers/fits``), keyed by the model's weights, its sampling config, the method and its settings, so a
second bench run loads instead of refitting. The bench reports what the fit cost (``fit_seconds``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .testbed import SamplerSpec

# what a bench fit uses: the command line's defaults (diffsamplers fit --help)
FIT_SETTINGS = dict(num_train=128, num_val=64, reference_steps=200, iterations=150)


def fits_cache_dir() -> Path:
    """Where fitted bench solvers and their reference banks are kept."""
    root = os.environ.get("DIFFSAMPLERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffsamplers")
    return Path(root) / "fits"


def learned_sampler_specs() -> dict[str, SamplerSpec]:
    """Name -> :class:`SamplerSpec` of the fitted solvers (all on request: fitting costs seconds to minutes)."""
    return {
        "olss": SamplerSpec("olss", None, default=False, fit=_fitter("olss"),
                            description="OLSS fitted to the model per budget (least squares on its trajectories)"),
        "bespoke": SamplerSpec("bespoke", None, steps_for_nfe=lambda nfe: nfe // 2 if nfe % 2 == 0 else nfe,
                               default=False, fit=_fitter("bespoke"),
                               description="Bespoke RK2 (RK1 at odd budgets) fitted to the model per budget"),
        "bns": SamplerSpec("bns", None, default=False, fit=_fitter("bns"),
                           description="Bespoke non-stationary solver fitted to the model per budget"),
        "dpmpp2m-learned": SamplerSpec(
            "dpmpp2m-learned", None, default=False, fit=_fitter("timesteps", "dpmpp2m"),
            description="diffusers' DPM-Solver++(2M) on a time grid learned for the model per budget",
        ),
        "ddim-learned": SamplerSpec("ddim-learned", None, default=False, fit=_fitter("timesteps", "ddim"),
                                    description="DDIM on a time grid learned for the model per budget"),
    }


def fit_model_from_bench(model: Any) -> Any:
    """A bench model (:class:`~diffsamplers.eval.bench.BenchModel`) as the fitting core's
    :class:`~diffsamplers.train.bank.FitModel`, on the bench's sampling config."""
    import torch

    from ..models import GaussianMixtureModel
    from ..train.bank import FitModel
    from .bench import _bench_config

    if model.labels is not None or model.call_kwargs is not None:
        raise ValueError(f"{model.name}: fitted bench entries need an unconditional model (fit a conditional one "
                         "from Python with the condition in FitModel.call_kwargs)")
    exact = isinstance(model.denoiser, GaussianMixtureModel)
    config = dict(model.scheduler_config) if exact else _bench_config(model.scheduler_config)
    return FitModel(model.denoiser, config, tuple(model.sample_shape), model.name, exact=model.denoiser if exact
                    else None, device=model.device, dtype=torch.float64 if exact else None)


def _fitter(method: str, base: str = "dpmpp2m"):
    def fit(model: Any, nfe: int, bench_seeds: list[int]) -> Any:
        from .. import samplers
        from ..train.fit_cli import FIT_CLASSES, fit_solver

        fit_model = fit_model_from_bench(model)
        extra = dict(solver_type="rk2" if nfe % 2 == 0 else "rk1") if method == "bespoke" else {}
        key = dict(model=fit_model.name, model_hash=fit_model.model_hash, config=fit_model.scheduler_config,
                   method=method, base=base if method == "timesteps" else None, nfe=nfe, **FIT_SETTINGS, **extra)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = fits_cache_dir() / f"{method}-{nfe}-{digest}"
        cls = getattr(samplers, FIT_CLASSES[method])
        if (folder / "scheduler_config.json").exists():
            return cls.from_pretrained(folder)
        scheduler = fit_solver(method, fit_model, nfe, base=base, avoid_seeds=bench_seeds,
                               cache_dir=fits_cache_dir() / "banks", progress=False, **FIT_SETTINGS, **extra)
        scheduler.save_pretrained(folder)
        return scheduler

    return fit
