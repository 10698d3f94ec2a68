# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Per-step classifier-free guidance policies shared by the inversion methods (:mod:`.inversion`).

Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): ``out = u + w (c - u)`` with ``u`` and ``c`` the
unconditional and conditional model outputs. An exact inversion needs the regeneration to use the very guided output
the inversion used at every state, so the scale is a function of the timestep that both directions evaluate: a
constant, or a schedule recorded during inversion (POLARIS, :mod:`.polaris`) and replayed by timestep value.
"""

from __future__ import annotations

from typing import Any

import torch


def timestep_key(timestep: Any) -> float:
    """The key a per-step scale is stored under: the timestep's value (never its position in a list, so replaying
    in the opposite direction of the recording cannot misalign it)."""
    return float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)


def combine(uncond: torch.Tensor | None, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``u + scale (c - u)``; ``scale`` is a float or one value per sample (shape ``(B,)``)."""
    if uncond is None:
        return cond
    if isinstance(scale, torch.Tensor):
        scale = scale.to(cond.device, cond.dtype).reshape((-1,) + (1,) * (cond.ndim - 1))
    return uncond + scale * (cond - uncond)


class ConstantGuidance:
    """One scale at every step; ``scale = 1`` is the conditional output alone (and skips the unconditional pass)."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    @property
    def needs_uncond(self) -> bool:
        return self.scale != 1.0

    def __call__(self, timestep: Any, uncond: torch.Tensor | None, cond: torch.Tensor, record: bool = True):
        return combine(uncond, cond, self.scale)

    def scales(self, timesteps: torch.Tensor, batch_size: int) -> dict[float, torch.Tensor]:
        """The schedule in the form an :class:`~diffsamplers.pipelines.inversion.Inversion` records it."""
        return {timestep_key(t): torch.full((batch_size,), self.scale, dtype=torch.float64) for t in timesteps}


class ReplayGuidance:
    """Replays scales recorded by timestep value (one float or one per sample at each timestep).

    ``needs_uncond`` must be what the recording run used: a conditional-only pass (scale 1) and ``u + 1 (c - u)``
    from a batched pass differ in the last bits, which an exact inversion would notice.
    """

    def __init__(self, scales: dict[float, torch.Tensor], needs_uncond: bool = True):
        self.scales = scales
        self.needs_uncond = bool(needs_uncond)

    def __call__(self, timestep: Any, uncond: torch.Tensor | None, cond: torch.Tensor, record: bool = True):
        key = timestep_key(timestep)
        if key not in self.scales:
            raise ValueError(f"no recorded guidance scale for timestep {key:g}: the grid differs from the inversion's")
        return combine(uncond if self.needs_uncond else None, cond, self.scales[key])
