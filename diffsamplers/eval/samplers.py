# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The samplers ``diffsamplers bench`` knows: diffusers' baselines and every diffsamplers scheduler."""

from __future__ import annotations

from .testbed import SamplerSpec, diffusers_baselines


def sampler_registry() -> dict[str, SamplerSpec]:
    """Name -> :class:`SamplerSpec`, baselines first."""
    return dict(diffusers_baselines())
