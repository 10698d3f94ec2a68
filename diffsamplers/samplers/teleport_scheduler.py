# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""``TeleportScheduler``: start any diffusers scheduler k grid steps late, from the closed-form Gaussian solution.

Analytical teleportation (Wang & Vastola, arXiv 2412.09726): the high-noise part of the probability-flow trajectory
is close to the exact solution for Gaussian data, so the paper replaces the first 15-30% of a sampler's steps by one
closed-form map ``x_T -> x_k`` (:func:`~diffsamplers.teleport`) and hands ``x_k`` to the numerical solver, as its
official code does for the DDIM and EDM samplers (``Animadversio/GaussianTeleportationDiffusion``). The wrapper

* calls ``base.set_timesteps(...)`` and then ``base.set_begin_index(k * base.order)``: the base keeps its full arrays,
  because multistep solvers test ``step_index == len(timesteps) - 1`` for their final-step logic
  (``lower_order_final``, ``euler_at_final``) and ``index_for_timestep`` picks the second match of repeated
  timesteps;
* shows the pipeline ``timesteps[k * order:]``, so the pipeline makes exactly the remaining model calls;
* teleports the pipeline's initial latents (the index-0 state) on the first ``scale_model_input`` and on the first
  ``step`` of a run, then passes everything straight through (``LMSDiscreteScheduler`` gets the order of its
  multistep formula capped by the steps taken since the teleport, as on a fresh start).

The scheduler alone therefore needs a pipeline that calls ``scale_model_input`` before its first model call (the
Stable Diffusion family, most UNet pipelines, hand-written loops). For pipelines that never call it (SD3, Flux,
``DDIMPipeline``) use :func:`diffsamplers.teleport_pipeline`; used alone there, the scheduler raises on the first
step instead of producing a wrong image.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch

from .checks import check_config_argument, check_model_output, check_schedule_arguments
from .gaussian_teleport import (
    GaussianStatsLike,
    _is_teleport_scheduler,
    check_stats,
    frame_coeffs,
    latent_frame,
    teleport,
)

# bases whose start cannot be moved to a later grid point by a begin index. PNDM's timestep list is not a grid:
# with the Runge-Kutta warm-up it interleaves half-step sub-stages for the first three grid steps, and with
# skip_prk_steps it lists the second timestep twice (a Heun-like correction); its `counter` and `ets` history pick
# the formula from the number of calls made. A run from grid point k needs a different list (the warm-up over the
# k-th to (k+3)-th grid points), not the tail of the full one, and PNDM has no set_begin_index to say where it is.
_UNSKIPPABLE = {
    "PNDMScheduler": (
        "its timestep list interleaves the Runge-Kutta warm-up sub-steps (or, with skip_prk_steps, repeats the second "
        "timestep) and its `counter`/`ets` state assumes the run starts at the first grid point"
    ),
}


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

    ``TeleportScheduler.from_config(pipe.scheduler.config, stats=...)`` and ``from_pretrained(path, stats=...)`` build
    the base named by the config's ``_class_name``; ``save_pretrained`` saves the base's config (the statistics are
    saved with ``stats.save``).

    Args:
        base (`SchedulerMixin`): the solver to run after the teleport (DDIM, DPM-Solver, UniPC, DEIS, Euler, Heun,
            LMS, FlowMatchEuler, a diffsamplers scheduler, ...). ``PNDMScheduler`` is refused unless the wrapper is a
            pass-through (``skip_steps=0``): its timestep list is not a grid that a begin index can enter part-way.
        stats (`GaussianStats`): data statistics in the space of the pipeline's latents (any object with the
            attributes of :class:`~diffsamplers.samplers.gaussian_teleport.GaussianStatsLike`).
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
        stats: GaussianStatsLike,
        skip_fraction: float | None = None,
        sigma_skip: float | None = None,
        skip_steps: int | None = None,
        frame: str | None = None,
        teleport_latents: bool = True,
    ):
        if isinstance(base, (Mapping, str)) or hasattr(base, "__fspath__"):
            raise TypeError(
                f"base must be a scheduler instance, got {type(base).__name__}; build the base from a config with "
                "TeleportScheduler.from_config(config, stats=...), from a saved folder with from_pretrained"
            )
        if _is_teleport_scheduler(base):
            raise TypeError("base is already a TeleportScheduler; wrap its .base instead")
        for name in ("set_timesteps", "step", "config"):
            if not hasattr(base, name):
                raise TypeError(f"base must be a diffusers scheduler (missing {name}), got {type(base).__name__}")
        check_stats(stats)
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
        passthrough = skip_steps == 0 or skip_fraction == 0
        unskippable = next((n for n in (c.__name__ for c in type(base).__mro__) if n in _UNSKIPPABLE), None)
        if unskippable is not None and not passthrough:
            raise ValueError(
                f"TeleportScheduler cannot start {type(base).__name__} at a later grid point: "
                f"{_UNSKIPPABLE[unskippable]}. Use DDIM, DPM-Solver, UniPC, DEIS, Euler, Heun or LMS as the base "
                "(skip_steps=0 wraps any scheduler as a pass-through)"
            )
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
        self._base_step_signature = _signature(base.step)
        self._base_set_timesteps_signature = _signature(base.set_timesteps)
        # LMS keys the order of its multistep formula on the step index, which starts at k after a teleport
        self._caps_order = self._base_step_signature is not None and "order" in self._base_step_signature.parameters
        self._caps_order = self._caps_order and hasattr(base, "derivatives")
        # pipelines inspect these signatures (prepare_extra_step_kwargs, retrieve_timesteps): show the base's
        self.step = functools.update_wrapper(functools.partial(TeleportScheduler.step, self), base.step)
        self.set_timesteps = functools.update_wrapper(
            functools.partial(TeleportScheduler.set_timesteps, self), base.set_timesteps
        )

    def _reset_run(self) -> None:
        self._stepped = False
        self._input_teleported = False
        self._steps_done = 0  # steps since the teleport (set_timesteps), for LMS's order

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
        rank = self.stats.eigvecs.shape[1]
        return f"TeleportScheduler({type(self.base).__name__}, {how}, frame={self.frame!r}, rank={rank})"

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

        The step count and any custom ``timesteps``/``sigmas`` are checked here first, so that a bad value fails
        with a message naming it instead of as NaN inside the base.

        Args:
            *args, **kwargs: exactly what the base scheduler's ``set_timesteps`` takes (``num_inference_steps``,
                ``device``, ``timesteps``, ``sigmas``, ``mu``, ...).
        """
        self._check_schedule_arguments(args, kwargs)
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
        if skip == 0:
            # a pass-through: nothing is teleported, so the levels are never read (any base works, also those whose
            # noise levels cannot be read, such as Euler's interpolation_type="log_linear" or KDPM2)
            self.from_level = self.to_level = None
        else:
            self.from_level = frame_coeffs(self.base, 0, self.frame)
            self.to_level = frame_coeffs(self.base, self._offset, self.frame)
            if not hasattr(self.base, "set_begin_index"):
                # DDIM-style schedulers derive everything from the timestep itself and need no begin index
                if hasattr(self.base, "_step_index") or hasattr(self.base, "_begin_index"):
                    raise TypeError(f"{type(self.base).__name__} tracks a step index but has no set_begin_index")
            else:
                self.base.set_begin_index(self._offset)
        if self._expected is not None:
            self._check_expected()

    def _check_schedule_arguments(self, args: tuple, kwargs: dict) -> None:
        """Check ``set_timesteps``'s step count and custom grids as diffsamplers' own schedulers do."""
        signature = self._base_set_timesteps_signature
        if signature is None:
            return
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError as err:
            raise TypeError(f"{type(self.base).__name__}.set_timesteps: {err}") from None
        # discrete training schedules have at most num_train_timesteps distinct timesteps; flow and EDM-style
        # schedules live on continuous time
        discrete = self.frame != "flow" and getattr(self.base, "alphas_cumprod", None) is not None
        train_steps = self.base.config.get("num_train_timesteps") if discrete else None
        check_schedule_arguments(
            bound.get("num_inference_steps"), bound.get("timesteps"), bound.get("sigmas"), train_steps
        )

    def _noise_level(self, index: int) -> float:
        alpha, sigma = frame_coeffs(self.base, index, self.frame)
        return math.inf if alpha == 0 else sigma / alpha

    def _levels(self) -> tuple:
        return (self.skip, *(self.from_level or ()), *(self.to_level or ()))

    def _expect_levels(self) -> None:
        """Remember this run's levels: a later ``set_timesteps`` (by the pipeline) must reproduce them."""
        self._expected = self._levels()

    def _check_expected(self) -> None:
        got = self._levels()
        if len(got) != len(self._expected) or any(
            not math.isclose(g, e, rel_tol=1e-6, abs_tol=1e-9) for g, e in zip(got, self._expected)
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
            model_output (`torch.Tensor`): the model output at ``timestep``, of the shape of ``sample``.
            timestep: the current timestep (an entry of ``self.timesteps``; the first step of a teleported run is at
                ``self.timesteps[0]``, the level the latents were teleported to).
            sample (`torch.Tensor`): the current latents.
            *args, **kwargs: the base's other arguments (``generator``, ``eta``, ``return_dict``, ...).
        """
        # a learned-variance DDPM base (DeepFloyd IF, Kandinsky) takes mean and variance channels and splits them
        learned = self.base.config.get("variance_type") in ("learned", "learned_range")
        check_model_output(model_output, sample, learned_variance=learned)
        if not self._stepped:
            self._check_first_timestep(timestep)
        if self._active:
            if not self._input_teleported:
                raise RuntimeError(
                    "the pipeline called step without scale_model_input, so the model saw un-teleported latents; "
                    "use diffsamplers.teleport_pipeline(pipe, stats, ...) for this pipeline"
                )
            sample = self._teleport(sample)
        self._stepped = True
        if self._caps_order and self._offset > 0:
            args, kwargs = self._cap_order(model_output, timestep, sample, args, kwargs)
        self._steps_done += 1
        return self.base.step(model_output, timestep, sample, *args, **kwargs)

    def _cap_order(self, model_output: Any, timestep: Any, sample: Any, args: tuple, kwargs: dict) -> tuple:
        """LMS: ``order = min(order, steps since the teleport + 1)``, the warm-up of a fresh start at grid point k.

        ``LMSDiscreteScheduler.step`` caps its order by ``step_index + 1``; after ``set_begin_index(k)`` that is
        already ``k + 1`` on the first step, while its derivative history holds one entry, so it would combine the
        one derivative with a high-order coefficient (the error then grows with the number of steps). The Adams
        coefficients it integrates over ``sigmas[step_index - j]`` are right once the order is capped.
        """
        bound = self._base_step_signature.bind(model_output, timestep, sample, *args, **kwargs)
        bound.apply_defaults()
        requested = bound.arguments["order"]
        bound.arguments["order"] = min(int(requested), self._steps_done + 1)
        return bound.args[3:], bound.kwargs

    def _check_first_timestep(self, timestep: Any) -> None:
        timesteps = self.timesteps
        if timesteps is None:
            raise ValueError(f"call set_timesteps before step ({type(self.base).__name__} has no timesteps yet)")
        value = torch.as_tensor(timestep)
        if value.numel() != 1 or len(timesteps) == 0:
            return
        grid = timesteps.detach().to("cpu", torch.float64)
        t = float(value.detach().to("cpu", torch.float64).reshape(()))
        matches = torch.isclose(grid, torch.tensor(t, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        if self._active:
            begin = self.begin_index or 0
            if not bool(matches[begin]):
                raise ValueError(
                    f"timestep {t:g} of the first step is not the level the latents were teleported to: the run "
                    f"starts at self.timesteps[{begin}] = {float(grid[begin]):g} (grid point k = {self.skip})"
                )
        elif not bool(matches.any()):
            raise ValueError(
                f"timestep {t:g} of the first step is not in this run's timesteps "
                f"({float(grid[0]):g} ... {float(grid[-1]):g}, {len(grid)} entries)"
            )

    # -- the diffusers construction contract ---------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Any,
        stats: GaussianStatsLike,
        *,
        base_class: type | str | None = None,
        skip_fraction: float | None = None,
        sigma_skip: float | None = None,
        skip_steps: int | None = None,
        frame: str | None = None,
        teleport_latents: bool = True,
        **kwargs: Any,
    ) -> TeleportScheduler:
        """Build the base from a scheduler config and wrap it: ``TeleportScheduler.from_config(pipe.scheduler.config,
        stats=stats, skip_fraction=0.2)`` runs the pipeline's own solver after the teleport.

        The base class is ``base_class`` or else the config's ``_class_name`` (a diffusers or diffsamplers
        scheduler; configs loaded from files carry it, configs of schedulers built in code do not). The teleport
        settings are not part of any config: the wrapper is ``TeleportScheduler(base, stats, ...)``, and
        ``save_pretrained`` saves the base.

        Args:
            config (`dict`): a scheduler config (``pipe.scheduler.config``).
            stats (`GaussianStats`): the data statistics.
            base_class (`type` or `str`, *optional*): the scheduler class to build (or its name); defaults to the
                config's ``_class_name``.
            skip_fraction, sigma_skip, skip_steps, frame, teleport_latents: as in :class:`TeleportScheduler`.
            **kwargs: config overrides for the base (``prediction_type``, ``timestep_spacing``, ...).
        """
        check_config_argument(config, cls)
        if config is None:
            raise TypeError("config must be a scheduler config (e.g. `pipe.scheduler.config`), got None")
        base = _scheduler_class(config, base_class).from_config(config, **kwargs)
        return cls(
            base,
            stats,
            skip_fraction=skip_fraction,
            sigma_skip=sigma_skip,
            skip_steps=skip_steps,
            frame=frame,
            teleport_latents=teleport_latents,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Any,
        stats: GaussianStatsLike,
        *,
        subfolder: str | None = None,
        base_class: type | str | None = None,
        skip_fraction: float | None = None,
        sigma_skip: float | None = None,
        skip_steps: int | None = None,
        frame: str | None = None,
        teleport_latents: bool = True,
        **kwargs: Any,
    ) -> TeleportScheduler:
        """Load a saved scheduler config (``scheduler_config.json``, e.g. a pipeline's ``subfolder="scheduler"``)
        and wrap the scheduler it names, as :meth:`from_config` does.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder (or a Hub id, loaded by diffusers).
            stats (`GaussianStats`): the data statistics (saved separately, with ``stats.save``).
            subfolder (`str`, *optional*): e.g. ``"scheduler"``.
            base_class (`type` or `str`, *optional*): the scheduler class to build; defaults to the saved one.
            skip_fraction, sigma_skip, skip_steps, frame, teleport_latents: as in :class:`TeleportScheduler`.
            **kwargs: passed to diffusers' ``load_config`` (``cache_dir``, ``local_files_only``, ``revision``, ...).
        """
        from diffusers import DDIMScheduler

        # any scheduler class reads the file: load_config only needs the config file name they all share
        config = DDIMScheduler.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return cls.from_config(
            config,
            stats,
            base_class=base_class,
            skip_fraction=skip_fraction,
            sigma_skip=sigma_skip,
            skip_steps=skip_steps,
            frame=frame,
            teleport_latents=teleport_latents,
        )


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an odd callable: skip the argument checks
        return None


def _scheduler_class(config: Mapping[str, Any], base_class: type | str | None) -> type:
    """The scheduler class to build: ``base_class``, else the config's ``_class_name`` (diffusers' or ours)."""
    if isinstance(base_class, type):
        if not hasattr(base_class, "from_config") or base_class.__name__ == "TeleportScheduler":
            raise TypeError(f"base_class must be a scheduler class, got {base_class.__name__}")
        return base_class
    if base_class is not None and not isinstance(base_class, str):
        raise TypeError(f"base_class must be a scheduler class or its name, got {type(base_class).__name__}")
    name = base_class or config.get("_class_name")
    if not name:
        raise ValueError(
            "config has no _class_name (configs of schedulers built in code have none), so the base scheduler is "
            "unknown: pass base_class=, e.g. TeleportScheduler.from_config(config, stats, "
            "base_class=DPMSolverMultistepScheduler), or wrap a scheduler: TeleportScheduler(base, stats, ...)"
        )
    import diffusers

    from .. import samplers

    for namespace in (samplers, diffusers):
        found = getattr(namespace, str(name), None)
        if isinstance(found, type) and hasattr(found, "from_config") and found.__name__ != "TeleportScheduler":
            return found
    raise ValueError(f"{name!r} (the base_class or the config's _class_name) is not a diffusers or diffsamplers "
                     "scheduler")


__all__ = ["TeleportScheduler"]
