# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""``TeleportScheduler``: start any diffusers scheduler k grid steps late, from the closed-form Gaussian solution.

Analytical teleportation (Wang & Vastola, arXiv 2412.09726): the high-noise part of the probability-flow trajectory
is close to the exact solution for Gaussian data (research spec ``adaptive_dualfast_teleport.md``, eq. 3.2), so the
first 15-30% of a sampler's steps can be replaced by one closed-form map x_T -> x_k (spec 3.3). The wrapper

* calls ``base.set_timesteps(...)`` and then ``base.set_begin_index(k * base.order)``: the base keeps its full arrays,
  because multistep solvers test ``step_index == len(timesteps) - 1`` for their final-step logic
  (``lower_order_final``, ``euler_at_final``) and ``index_for_timestep`` picks the second match of repeated
  timesteps (spec 3.8);
* shows the pipeline ``timesteps[k * order:]``, so the pipeline makes exactly the remaining model calls;
* teleports the pipeline's initial latents (the index-0 state) on the first ``scale_model_input`` and on the first
  ``step`` of a run, then passes everything straight through.

The scheduler alone therefore needs a pipeline that calls ``scale_model_input`` before its first model call (the
Stable Diffusion family, most UNet pipelines, hand-written loops). For pipelines that never call it (SD3, Flux,
``DDIMPipeline``) use :func:`diffsamplers.pipelines.teleport.teleport_pipeline`; used alone there, the scheduler
raises on the first step instead of producing a wrong image.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .gaussian_stats import GaussianStats, _is_teleport_scheduler, frame_coeffs, latent_frame, teleport


class TeleportScheduler:
    """Wrap a diffusers scheduler so that sampling starts at grid point ``k`` from the teleported state.

    Use it as ``pipe.scheduler = TeleportScheduler(pipe.scheduler, stats, skip_fraction=0.2)``. Every attribute it
    does not define (``config``, ``order``, ``add_noise``, ``scale_noise``, ``save_pretrained``, ...) is read from
    ``base``; ``step`` and ``set_timesteps`` advertise the base's signatures, so pipelines that inspect them (for
    ``eta``, ``generator``, custom ``timesteps``/``sigmas``) treat the wrapper like the base. With ``k = 0`` the
    wrapper is a pure pass-through and the output is bit-identical to the base scheduler's.

    The view the pipeline gets is truncated: ``timesteps``, ``sigmas``, ``step_index`` and ``begin_index`` count from
    grid point ``k``, and ``set_begin_index(i)`` sets the base's begin index to ``k * order + i``. ``base`` holds
    the full arrays.

    Args:
        base (`SchedulerMixin`): the solver to run after the teleport (DDIM, DPM-Solver, UniPC, Euler, Heun,
            FlowMatchEuler, a diffsamplers scheduler, ...).
        stats (`GaussianStats`): data statistics in the space of the pipeline's latents.
        skip_fraction (`float`, *optional*): fraction in [0, 1) of the ``N`` grid steps to skip: ``k =
            floor(skip_fraction * N)``. Defaults to 0.2 when no skip argument is given (the paper's useful range is
            15-30%).
        sigma_skip (`float`, *optional*): skip to the first grid point whose noise level ``sigma / alpha`` (the EDM
            sigma; for flow schedulers ``sigma / (1 - sigma)``) is at most this value.
        skip_steps (`int`, *optional*): skip exactly this many grid steps.
        frame (`str`, *optional*): ``"vp"``, ``"ve"`` or ``"flow"``, the frame of the latents; inferred from the base
            scheduler's family when omitted (DDIM/DPM/UniPC: VP; Euler/Heun/EDM: VE with ``init_noise_sigma``;
            FlowMatch: flow).
        teleport_latents (`bool`, defaults to `True`): teleport the pipeline's latents; ``False`` when the caller
            passes latents that are already teleported (what ``teleport_pipeline`` does).
    """

    def __init__(
        self,
        base: Any,
        stats: GaussianStats,
        skip_fraction: float | None = None,
        sigma_skip: float | None = None,
        skip_steps: int | None = None,
        frame: str | None = None,
        teleport_latents: bool = True,
    ):
        if _is_teleport_scheduler(base):
            raise TypeError("base is already a TeleportScheduler; wrap its .base instead")
        for name in ("set_timesteps", "step", "config"):
            if not hasattr(base, name):
                raise TypeError(f"base must be a diffusers scheduler (missing {name}), got {type(base).__name__}")
        if not isinstance(stats, GaussianStats):
            raise TypeError(f"stats must be a GaussianStats, got {type(stats).__name__}")
        given = [
            n
            for n, v in (("skip_fraction", skip_fraction), ("sigma_skip", sigma_skip), ("skip_steps", skip_steps))
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give only one of skip_fraction, sigma_skip and skip_steps, got {', '.join(given)}")
        if not given:
            skip_fraction = 0.2
        if skip_fraction is not None and not (
            isinstance(skip_fraction, (int, float)) and not isinstance(skip_fraction, bool) and 0 <= skip_fraction < 1
        ):
            raise ValueError(f"skip_fraction must be a number in [0, 1), got {skip_fraction!r}")
        if sigma_skip is not None and not (
            isinstance(sigma_skip, (int, float)) and math.isfinite(sigma_skip) and sigma_skip > 0
        ):
            raise ValueError(f"sigma_skip must be a positive number, got {sigma_skip!r}")
        if skip_steps is not None and (
            not isinstance(skip_steps, int) or isinstance(skip_steps, bool) or skip_steps < 0
        ):
            raise ValueError(f"skip_steps must be a non-negative int, got {skip_steps!r}")
        if frame is not None and frame not in ("vp", "ve", "flow"):
            raise ValueError(f"frame must be 'vp', 've' or 'flow', got {frame!r}")
        # plain attribute writes: __getattr__ only sees names missing from __dict__
        self.base = base
        self.stats = stats
        self.skip_fraction = skip_fraction
        self.sigma_skip = sigma_skip
        self.skip_steps = skip_steps
        self.frame = frame or latent_frame(base)
        self.teleport_latents = bool(teleport_latents)
        self.skip = 0  # grid steps skipped in the current run (set by set_timesteps)
        self._offset = 0  # skip * order: the base's array index where the run starts
        self.from_level: tuple[float, float] | None = None
        self.to_level: tuple[float, float] | None = None
        self._expected: tuple[float, ...] | None = None
        self._reset_run()
        # pipelines inspect these signatures (prepare_extra_step_kwargs, retrieve_timesteps): show the base's
        self.step = functools.update_wrapper(functools.partial(TeleportScheduler.step, self), base.step)
        self.set_timesteps = functools.update_wrapper(
            functools.partial(TeleportScheduler.set_timesteps, self), base.set_timesteps
        )

    def _reset_run(self) -> None:
        self._stepped = False
        self._input_teleported = False

    # -- delegation ---------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # only called for names not found normally; guard against recursion before __init__ sets base
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name) if "base" in self.__dict__ else super().__getattribute__(name)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        how = (
            f"skip_steps={self.skip_steps}"
            if self.skip_steps is not None
            else f"sigma_skip={self.sigma_skip}"
            if self.sigma_skip is not None
            else f"skip_fraction={self.skip_fraction}"
        )
        return f"TeleportScheduler({type(self.base).__name__}, {how}, frame={self.frame!r}, rank={self.stats.rank})"

    @property
    def config(self) -> Any:
        """The base scheduler's config (so ``pipe.scheduler.config`` reads and ``from_config`` work)."""
        return self.base.config

    @property
    def order(self) -> int:
        return getattr(self.base, "order", 1)

    @property
    def init_noise_sigma(self) -> Any:
        """The base's ``init_noise_sigma``; 1.0 when the caller passes already-teleported latents."""
        return getattr(self.base, "init_noise_sigma", 1.0) if self.teleport_latents else 1.0

    @property
    def timesteps(self) -> torch.Tensor | None:
        """The timesteps the pipeline runs: the base's from grid point ``k`` on."""
        ts = self.base.timesteps
        return ts if ts is None or self._offset == 0 else ts[self._offset :]

    @property
    def sigmas(self) -> Any:
        sigmas = self.base.sigmas
        return sigmas if self._offset == 0 else sigmas[self._offset :]

    @property
    def step_index(self) -> int | None:
        index = getattr(self.base, "step_index", None)
        return None if index is None else index - self._offset

    @property
    def begin_index(self) -> int | None:
        index = getattr(self.base, "begin_index", None)
        return None if index is None else index - self._offset

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``begin_index`` of the truncated timesteps (Flux and img2img pipelines call this).

        Args:
            begin_index (`int`, defaults to 0): index into ``self.timesteps``.
        """
        if not hasattr(self.base, "set_begin_index"):
            raise AttributeError(f"{type(self.base).__name__} has no set_begin_index")
        self.base.set_begin_index(self._offset + begin_index)

    # -- the run ------------------------------------------------------------------------------------------------

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        """Call ``base.set_timesteps`` with the same arguments, choose ``k`` and start the base at grid point ``k``.

        Args:
            *args, **kwargs: exactly what the base scheduler's ``set_timesteps`` takes (``num_inference_steps``,
                ``device``, ``timesteps``, ``sigmas``, ``mu``, ...).
        """
        self.base.set_timesteps(*args, **kwargs)
        self._reset_run()
        timesteps = self.base.timesteps
        order = self.order
        num_points = (len(timesteps) + order - 1) // order  # grid points; Heun lists each inner one twice
        if self.skip_steps is not None:
            skip = self.skip_steps
        elif self.sigma_skip is not None:
            skip = next(
                (i for i in range(num_points) if self._noise_level(i * order) <= self.sigma_skip * (1 + 1e-12)), None
            )
            if skip is None:
                lowest = self._noise_level((num_points - 1) * order)
                raise ValueError(f"sigma_skip={self.sigma_skip} is below the last model level ({lowest:.4g})")
        else:
            skip = math.floor(self.skip_fraction * num_points + 1e-9)
        if skip >= num_points:
            raise ValueError(f"cannot skip {skip} of {num_points} grid steps: at least one must remain")
        self.skip, self._offset = skip, skip * order
        self.from_level = frame_coeffs(self.base, 0, self.frame)
        self.to_level = frame_coeffs(self.base, self._offset, self.frame)
        if skip > 0:
            if not hasattr(self.base, "set_begin_index"):
                # DDIM-style schedulers derive everything from the timestep itself and need no begin index
                if hasattr(self.base, "_step_index") or hasattr(self.base, "_begin_index"):
                    raise TypeError(f"{type(self.base).__name__} tracks a step index but has no set_begin_index")
            else:
                self.base.set_begin_index(self._offset)
        if self._expected is not None:
            self._check_expected()

    def _noise_level(self, index: int) -> float:
        alpha, sigma = frame_coeffs(self.base, index, self.frame)
        return math.inf if alpha == 0 else sigma / alpha

    def _expect_levels(self) -> None:
        """Remember this run's levels: a later ``set_timesteps`` (by the pipeline) must reproduce them."""
        self._expected = (self.skip, *self.from_level, *self.to_level)

    def _check_expected(self) -> None:
        got = (self.skip, *self.from_level, *self.to_level)
        if got[0] != self._expected[0] or any(
            not math.isclose(g, e, rel_tol=1e-6, abs_tol=1e-9) for g, e in zip(got[1:], self._expected[1:])
        ):
            raise ValueError(
                "the pipeline set a different schedule from the one the latents were teleported for "
                f"(skip, alpha_0, sigma_0, alpha_k, sigma_k) = {got} vs {self._expected}; "
                "pass the pipeline's sigmas=, timesteps= or mu= to teleport_pipeline"
            )

    def _teleport(self, sample: torch.Tensor) -> torch.Tensor:
        return teleport(sample, self.stats, self.from_level, self.to_level)

    @property
    def _active(self) -> bool:
        """Whether this run still has to teleport (skip > 0, latents not pre-teleported, before the first step)."""
        return self._offset > 0 and self.teleport_latents and not self._stepped

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Before the first step: teleport ``sample`` (the pipeline's index-0 latents) to grid point ``k``; then
        the base's ``scale_model_input`` (the identity for schedulers without one, e.g. FlowMatch).

        Args:
            sample (`torch.Tensor`): the model input latents.
            *args, **kwargs: the base's arguments (``timestep``).
        """
        if self._active:
            sample = self._teleport(sample)
            self._input_teleported = True
        if hasattr(self.base, "scale_model_input"):
            return self.base.scale_model_input(sample, *args, **kwargs)
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The base's ``step``; on the first step of a run the pipeline's latents are replaced by their teleported
        state (the model already saw it through ``scale_model_input``).

        Args:
            model_output (`torch.Tensor`): the model output at ``timestep``.
            timestep: the current timestep (an entry of ``self.timesteps``).
            sample (`torch.Tensor`): the current latents.
            *args, **kwargs: the base's other arguments (``generator``, ``eta``, ``return_dict``, ...).
        """
        if self._active:
            if not self._input_teleported:
                raise RuntimeError(
                    "the pipeline called step without scale_model_input, so the model saw un-teleported latents; "
                    "use diffsamplers.teleport_pipeline(pipe, stats, ...) for this pipeline"
                )
            sample = self._teleport(sample)
        self._stepped = True
        return self.base.step(model_output, timestep, sample, *args, **kwargs)


__all__ = ["TeleportScheduler"]
