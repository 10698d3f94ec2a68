# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Teleported sampling for pipelines that never call ``scale_model_input`` (SD3 / Flux flow pipelines).

:func:`teleport_pipeline` draws the pipeline's own initial noise, teleports it along the closed-form Gaussian
probability flow (Wang & Vastola, arXiv 2412.09726) and runs the pipeline from there with ``latents=`` and the
truncated schedule. Pipelines that do call ``scale_model_input`` can simply use
:class:`~diffsamplers.TeleportScheduler` as their scheduler.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..samplers.gaussian_teleport import GaussianStatsLike, check_stats, teleport
from ..samplers.teleport_scheduler import TeleportScheduler

# ----------------------------------------------------------------------------------------------------------------
# Pipeline helper
# ----------------------------------------------------------------------------------------------------------------


def teleport_pipeline(
    pipe: Any,
    stats: GaussianStatsLike,
    *,
    skip_fraction: float | None = None,
    sigma_skip: float | None = None,
    skip_steps: int | None = None,
    num_inference_steps: int = 50,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    batch_size: int | None = None,
    frame: str | None = None,
    **call_kwargs: Any,
) -> Any:
    """Run ``pipe`` from the teleported start: compute ``x_k`` in closed form and call the pipeline with
    ``latents=x_k`` and a :class:`~diffsamplers.TeleportScheduler` that hands it the truncated
    timesteps (the base scheduler keeps its full arrays and starts at ``set_begin_index(k * order)``).

    This is the way to teleport in pipelines that never call ``scale_model_input`` (SD3, Flux and other flow
    pipelines), where the scheduler alone cannot change what the model sees first. It needs a pipeline whose
    ``__call__`` accepts ``latents``. The schedule is computed here with ``num_inference_steps`` and any ``sigmas``,
    ``timesteps`` or ``mu`` in ``call_kwargs`` (``mu`` is derived like SD3 does when the scheduler uses dynamic
    shifting; Flux-style pipelines get their default ``linspace(1, 1/N, N)`` sigmas); if the pipeline then sets a
    different schedule, the call stops with a ``ValueError`` before any model evaluation instead of producing a
    wrong image. ``pipe.scheduler`` is restored afterwards.

    Args:
        pipe (`DiffusionPipeline`): the pipeline; ``pipe.scheduler`` is the base solver (an existing
            ``TeleportScheduler`` is unwrapped).
        stats (`GaussianStats`): statistics in the pipeline's latent space (scaled VAE latents for latent models;
            Flux's packed latents need statistics of the packed layout).
        skip_fraction (`float`, *optional*): fraction of the grid steps to skip; defaults to 0.2 when no skip
            argument is given.
        sigma_skip (`float`, *optional*): skip to the first grid level whose noise level ``sigma / alpha`` is at most
            this value.
        skip_steps (`int`, *optional*): number of grid steps to skip.
        num_inference_steps (`int`, defaults to 50): the full grid's step count (the pipeline makes about
            ``(num_inference_steps - k) * order`` model calls).
        latents (`torch.Tensor`, *optional*): the initial noise ``(B, ...)`` as the pipeline would draw it (before
            ``init_noise_sigma``); drawn with ``generator`` in the pipeline's way (``randn_tensor``) when omitted.
        generator (`torch.Generator` or list, *optional*): passed to the pipeline as well.
        batch_size (`int`, *optional*): samples to draw when ``latents`` is omitted; defaults to the number of prompts
            (or ``prompt_embeds`` rows) times ``num_images_per_prompt``.
        frame (`str`, *optional*): override the latent frame inferred from the scheduler.
        **call_kwargs: everything else for ``pipe(...)`` (prompt, guidance_scale, output_type, ...).

    Returns:
        Whatever ``pipe(...)`` returns.
    """
    if not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline, got {type(pipe).__name__}")
    check_stats(stats)
    if "latents" not in inspect.signature(pipe.__call__).parameters:
        raise TypeError(
            f"pipe ({type(pipe).__name__}) does not accept latents=; for pipelines that call scale_model_input use "
            "pipe.scheduler = TeleportScheduler(pipe.scheduler, stats, ...) instead"
        )
    original = pipe.scheduler
    base = original.base if isinstance(original, TeleportScheduler) else original
    wrapper = TeleportScheduler(
        base,
        stats,
        skip_fraction=skip_fraction,
        sigma_skip=sigma_skip,
        skip_steps=skip_steps,
        frame=frame,
        teleport_latents=False,
    )
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    schedule_kwargs = {k: call_kwargs[k] for k in ("timesteps", "sigmas", "mu") if call_kwargs.get(k) is not None}
    config = base.config
    call_params = inspect.signature(pipe.__call__).parameters
    flux_default = type(pipe).__name__.startswith("Flux") and not config.get("use_flow_sigmas", False)
    if flux_default and "sigmas" in call_params and not {"sigmas", "timesteps"} & set(schedule_kwargs):
        # FluxPipeline always builds these itself (diffusers anchors 1.4)
        import numpy as np

        schedule_kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if config.get("use_dynamic_shifting", False) and "mu" not in schedule_kwargs:
        schedule_kwargs["mu"] = _dynamic_shift_mu(pipe, stats, config)

    # the pipeline takes user latents as given, so catch statistics of the wrong resolution here
    scale = getattr(pipe, "vae_scale_factor", None)
    height, width = call_kwargs.get("height"), call_kwargs.get("width")
    if len(stats.shape) == 3 and scale and height and width and (height // scale, width // scale) != stats.shape[1:]:
        raise ValueError(
            f"stats describe latents of shape {stats.shape}, but height={height}, width={width} give the latent shape "
            f"(..., {height // scale}, {width // scale}) for this pipeline"
        )
    wrapper.set_timesteps(num_inference_steps, device=device, **schedule_kwargs)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    dtype = getattr(denoiser, "dtype", torch.float32)
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        batch = batch_size or _infer_batch_size(call_kwargs)
        latents = randn_tensor((batch,) + tuple(stats.shape), generator=generator, device=device, dtype=dtype)
    elif not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    # the index-0 state the pipeline would have started from (SD-style pipelines scale by init_noise_sigma)
    start = latents * getattr(base, "init_noise_sigma", 1.0)
    teleported = start if wrapper.skip == 0 else teleport(start, stats, wrapper.from_level, wrapper.to_level)
    wrapper._expect_levels()
    pipe.scheduler = wrapper
    try:
        return pipe(num_inference_steps=num_inference_steps, latents=teleported, generator=generator, **call_kwargs)
    finally:
        pipe.scheduler = original


def _infer_batch_size(call_kwargs: dict) -> int:
    prompt = call_kwargs.get("prompt")
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, (list, tuple)):
        batch = len(prompt)
    elif call_kwargs.get("prompt_embeds") is not None:
        batch = call_kwargs["prompt_embeds"].shape[0]
    else:
        batch = 1
    return batch * int(call_kwargs.get("num_images_per_prompt") or 1)


def _dynamic_shift_mu(pipe: Any, stats: GaussianStatsLike, config: Any) -> float:
    """``mu`` as SD3/Flux compute it (``calculate_shift``) from the image sequence length of ``stats.shape``."""
    if len(stats.shape) == 2:  # Flux-style packed latents (sequence, channels)
        seq_len = stats.shape[0]
    elif len(stats.shape) == 3:
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", 1) or 1
        seq_len = (stats.shape[1] // patch) * (stats.shape[2] // patch)
    else:
        raise ValueError("pass mu= for a dynamically shifted schedule with statistics of this shape")
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * slope + base_shift - slope * base_len


__all__ = ["teleport_pipeline"]
