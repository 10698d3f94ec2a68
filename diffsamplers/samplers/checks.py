# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Argument checks shared by every diffsamplers scheduler, so that bad input fails at the call that brought it, with
a message naming the argument, instead of as NaN or a wrong image many steps later."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def check_config_argument(config: Any, cls: type) -> None:
    """``from_config`` takes a scheduler config (``pipe.scheduler.config``, a dict); diffusers' own fallback for a
    string (a deprecated download path) reports a misleading "couldn't connect" error offline."""
    if config is None or isinstance(config, Mapping):
        return
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        raise TypeError(
            f"{cls.__name__}.from_config takes a scheduler config (e.g. `pipe.scheduler.config`), got the path or "
            f"name {config!r}; to load a saved scheduler use {cls.__name__}.from_pretrained({config!r})"
        )
    if not hasattr(config, "keys"):
        raise TypeError(f"config must be a scheduler config (a dict), got {type(config).__name__}")


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int`` >= ``minimum``, else a ``ValueError`` (as diffusers raises for bad counts); ``True``
    and floats are refused too (a bool is an int to Python, and ``True`` steps is almost certainly a mistake)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int | None) -> int:
    """A positive integer, at most ``num_train_timesteps`` for discrete schedules (``None`` = no upper bound, for
    flow-matching grids on continuous time), as ``DDIMScheduler.set_timesteps`` requires."""
    n = check_count(num_inference_steps, "num_inference_steps")
    if num_train_timesteps is not None and n > int(num_train_timesteps):
        raise ValueError(
            f"num_inference_steps ({n}) cannot be larger than num_train_timesteps ({int(num_train_timesteps)}): "
            "a discrete schedule has no more distinct timesteps than that"
        )
    return n


def check_custom_timesteps(timesteps: Any, num_train_timesteps: int | None, name: str = "timesteps") -> torch.Tensor:
    """Custom ``timesteps`` as a 1-D tensor: finite, strictly decreasing (so no duplicates), and inside
    ``[0, num_train_timesteps)`` for discrete schedules (``None`` skips the range check)."""
    try:
        values = torch.as_tensor(np.asarray(timesteps if not isinstance(timesteps, torch.Tensor) else timesteps.cpu()))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D list of numbers, got {timesteps!r}") from err
    if values.dtype == torch.bool or values.dtype.is_complex:
        raise TypeError(f"{name} must be real numbers, got {values.dtype}")
    if values.ndim != 1 or len(values) < 1:
        raise ValueError(f"{name} must be a non-empty 1-D list of numbers, got shape {tuple(values.shape)}")
    as_float = values.double()
    if not bool(torch.isfinite(as_float).all()):
        raise ValueError(f"{name} must be finite, got {values.tolist()}")
    if len(values) > 1 and not bool((as_float[1:] < as_float[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing (no repeats), got {values.tolist()}")
    if num_train_timesteps is not None and (as_float[-1] < 0 or as_float[0] >= int(num_train_timesteps)):
        raise ValueError(
            f"{name} must lie in [0, num_train_timesteps) = [0, {int(num_train_timesteps)}), got {values.tolist()}"
        )
    return values


def check_schedule_arguments(
    num_inference_steps: Any, timesteps: Any, sigmas: Any, num_train_timesteps: int | None
) -> tuple[int | None, torch.Tensor | None]:
    """The ``set_timesteps`` arguments every scheduler checks: the step count and custom ``timesteps`` against a
    discrete schedule of ``num_train_timesteps`` (``None`` for continuous time: flow matching, EDM), custom
    ``sigmas`` strictly decreasing. Returns the count as an ``int`` and the timesteps as a tensor (or ``None``)."""
    if num_inference_steps is not None:
        num_inference_steps = check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if timesteps is not None:
        timesteps = check_custom_timesteps(timesteps, num_train_timesteps)
    if sigmas is not None:
        check_custom_timesteps(sigmas, None, name="sigmas")
    return num_inference_steps, timesteps


def check_model_output(
    model_output: Any, sample: Any, name: str = "model_output", learned_variance: bool = False
) -> None:
    """``model_output`` and ``sample`` are tensors of one shape: a batch-1 output would otherwise broadcast silently
    over a larger batch (or a 2-channel learned-variance output fail deep inside the step). ``learned_variance``
    also admits twice the sample's channels, which a learned-variance ``DDPMScheduler`` splits itself."""
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(model_output).__name__}")
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    doubled = (
        learned_variance
        and model_output.ndim == sample.ndim > 1
        and model_output.shape[0] == sample.shape[0]
        and model_output.shape[1] == 2 * sample.shape[1]
        and model_output.shape[2:] == sample.shape[2:]
    )
    if model_output.shape != sample.shape and not doubled:
        hint = (
            " (a learned-variance model predicts twice the channels: pass the first half)"
            if model_output.ndim == sample.ndim and model_output.ndim > 1
            and model_output.shape[1] == 2 * sample.shape[1]
            else ""
        )
        raise ValueError(
            f"{name} has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}: "
            f"they must match{hint}"
        )


def check_learned_variance(config: Mapping[str, Any], cls: type) -> None:
    """Refuse learned-variance DDPM configs: their models output ``2 * C`` channels (mean and variance), which an
    ODE solver must not read as one prediction."""
    variance_type = config.get("variance_type")
    if variance_type in ("learned", "learned_range"):
        raise ValueError(
            f"{cls.__name__} does not support variance_type={variance_type!r}: learned-variance models output mean "
            "and variance channels; split the output and use a config with variance_type='fixed_small'"
        )


def check_on_grid(timestep: Any, timesteps: Any) -> None:
    """``timestep`` is one entry of the scheduler's ``timesteps`` (``None`` before ``set_timesteps``)."""
    if timesteps is None:
        raise ValueError(f"timestep {timestep!r}: the scheduler has no timesteps yet; call set_timesteps first")
    if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
        raise ValueError(f"timestep must be one entry of timesteps, got a tensor of shape {tuple(timestep.shape)}")
    if not bool((timesteps == torch.as_tensor(timestep).to(timesteps.device)).any()):
        raise ValueError(f"timestep {timestep!r} is not in this scheduler's timesteps (call set_timesteps first)")
