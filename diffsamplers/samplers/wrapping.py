# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Wrap one of diffusers' own solvers and change what it does, keeping the diffusers scheduler contract.

Methods such as DualFast and LML are not new solvers: they alter one term of an existing solver's update. A
:class:`WrappedScheduler` owns a diffusers scheduler (``self.base``), built from the same config, and delegates the
contract to it (``timesteps``, ``sigmas``, ``init_noise_sigma``, ``scale_model_input``, ``add_noise``, indices, ...);
a subclass only implements :meth:`WrappedScheduler._wrapped_step`.

Config handling. The subclass ``__init__`` takes its own arguments, ``base_scheduler`` (the wrapped diffusers class
name) and every configuration argument of the supported diffusers solvers (:data:`BASE_CONFIG_KEYS`), all defaulting
to ``None`` = "the wrapped scheduler's own default". After the base is built, every key it has is written back
into this config with the value the base actually uses, so ``scheduler.config[k] == scheduler.base.config[k]`` and
pipelines that read ``scheduler.config.<name>`` see what runs. Where the base replaces a value it does not implement
(``DPMSolverMultistepScheduler`` runs a DEIS config's ``algorithm_type="deis"`` as ``"dpmsolver++"`` and its
``solver_type="logrho"`` or UniPC's ``"bh1"``/``"bh2"`` as ``"midpoint"``; ``UniPCMultistepScheduler`` runs
``"midpoint"``/``"heun"``/``"logrho"`` as ``"bh2"``), the replacement is what ``<Base>.from_config`` of that config
does in diffusers itself; here it also warns, naming the replaced values. Values the base refuses raise a
``ValueError``. Keys the base does not take (a DPM-Solver ``solver_order`` on a DDIM base) are kept as given and
ignored. ``X.from_config(pipe.scheduler.config)`` therefore carries the model's schedule over, and
``save_pretrained``/``from_pretrained`` round-trip.

``step`` takes the wrapped solver's own positional arguments after ``sample`` (DDIM: ``eta``,
``use_clipped_model_output``, ``generator``, ``variance_noise``, ``return_dict``), so a call written for the base
works unchanged.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS
from .checks import (
    check_config_argument,
    check_learned_variance,
    check_model_output,
    check_on_grid,
    check_schedule_arguments,
)

# the diffusers solvers that can be wrapped, resolved by name on first use: importing UniPC pulls in scipy.stats,
# which would add about a second to `import diffsamplers`
BASE_SCHEDULERS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)

# every JSON-serialisable configuration argument of the solvers above (UniPC's `solver_p` object is left out)
BASE_CONFIG_KEYS: tuple[str, ...] = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "rescale_betas_zero_snr",
    "solver_order",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "lambda_min_clipped",
    "variance_type",
    "predict_x0",
    "disable_corrector",
    "sigma_min",
    "sigma_max",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "invert_sigmas",
    "shift_terminal",
    "time_shift_type",
    "stochastic_sampling",
)

BASE_CONFIG_DOC = """
        The remaining arguments configure the wrapped diffusers scheduler and have its own names and meaning; each
        defaults to `None`, meaning "the wrapped scheduler's own default", and is passed on only if that scheduler
        takes it. After construction the config holds the values the wrapped scheduler actually uses.

        num_train_timesteps (`int`, *optional*): number of training timesteps.
        beta_start, beta_end (`float`, *optional*): first and last beta of a VP schedule.
        beta_schedule (`str`, *optional*): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        trained_betas (`list[float]`, *optional*): explicit betas.
        prediction_type (`str`, *optional*): `"epsilon"`, `"sample"`, `"v_prediction"` or (DPMSolver/UniPC)
            `"flow_prediction"`; FlowMatchEuler always predicts a velocity.
        clip_sample, clip_sample_range, set_alpha_to_one (*optional*): DDIM only.
        steps_offset (`int`, *optional*): offset of `"leading"` timesteps.
        thresholding, dynamic_thresholding_ratio, sample_max_value (*optional*): dynamic thresholding of x0.
        timestep_spacing (`str`, *optional*): `"leading"`, `"trailing"` or `"linspace"`.
        rescale_betas_zero_snr (`bool`, *optional*): rescale betas to zero terminal SNR.
        solver_order (`int`, *optional*): DPMSolverMultistep / UniPC order.
        algorithm_type (`str`, *optional*): DPMSolverMultistep's `"dpmsolver"` or `"dpmsolver++"`; with
            `"dpmsolver"`, `final_sigmas_type` defaults to `"sigma_min"` (DPMSolver refuses `"zero"` there).
        solver_type (`str`, *optional*): `"midpoint"`/`"heun"` (DPMSolver) or `"bh1"`/`"bh2"` (UniPC).
        lower_order_final, euler_at_final (`bool`, *optional*): lower-order final steps.
        use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas (`bool`, *optional*): sigma
            grids.
        use_flow_sigmas, flow_shift (*optional*): DPMSolver/UniPC flow-matching mode.
        final_sigmas_type (`str`, *optional*): `"zero"` or `"sigma_min"`.
        lambda_min_clipped (`float`, *optional*): DPMSolver's log-SNR clip.
        variance_type (`str`, *optional*): `"learned"`/`"learned_range"` (learned-variance outputs) are refused;
            DDPM's `"fixed_small"`/`"fixed_large"` only describe ancestral noise and are ignored.
        predict_x0, disable_corrector, sigma_min, sigma_max (*optional*): UniPC only.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len, invert_sigmas,
            shift_terminal, time_shift_type, stochastic_sampling (*optional*): FlowMatchEuler (and the shift keys
            that SD3/Flux pipelines read).
"""

# the defaults of WrappedScheduler.step's own keyword arguments (a positional argument may replace only these)
_STEP_DEFAULTS: dict[str, Any] = dict(
    eta=0.0, use_clipped_model_output=False, generator=None, variance_noise=None, return_dict=True
)

_VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_PREDICTIONS = {
    "DDIMScheduler": _VP_PREDICTIONS,
    "DPMSolverMultistepScheduler": _VP_PREDICTIONS + ("flow_prediction",),
    "UniPCMultistepScheduler": _VP_PREDICTIONS + ("flow_prediction",),
    "FlowMatchEulerDiscreteScheduler": ("flow_prediction",),
}


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) in (bool, int, float) and value == default)


def _freeze(value: Any) -> Any:
    """A comparable form of a config value (arrays and lists become tuples)."""
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _source_kind(source: dict) -> str:
    """``"flow"``, ``"ve"``, ``"vp"`` or ``"unknown"``: the noise schedule a diffusers config describes."""
    class_name = str(source.get("_class_name", ""))
    if class_name.startswith("FlowMatch") or (source.get("shift") is not None and source.get("beta_start") is None):
        return "flow"
    if class_name.startswith("EDM") or (source.get("sigma_max") is not None and source.get("beta_start") is None):
        return "ve"
    if source.get("beta_start") is not None or source.get("trained_betas") is not None:
        return "vp"
    return "unknown"


class WrappedScheduler(SchedulerMixin, ConfigMixin):
    """Shared base of the schedulers that wrap a diffusers solver (see the module docstring).

    Subclasses set ``_supported_bases`` and ``_default_base``, declare ``__init__`` with ``@register_to_config``
    (their own arguments, ``base_scheduler`` and every name in :data:`BASE_CONFIG_KEYS`), call
    :meth:`_init_wrapper` at its end, and implement :meth:`_wrapped_step`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    _supported_bases: tuple[str, ...] = ()
    _default_base: str = "DPMSolverMultistepScheduler"

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """As diffusers' ``from_config``. Without an explicit ``base_scheduler`` the base is
        ``FlowMatchEulerDiscreteScheduler`` for a flow-matching config (where this method supports it) and
        ``_default_base`` otherwise. A config whose noise schedule the chosen base cannot run (flow matching into a
        VP solver, a VP schedule into FlowMatchEuler, EDM/VE) or a learned-variance DDPM config raises a
        ``ValueError``; a string (a path or Hub id: use ``from_pretrained``) a ``TypeError``."""
        check_config_argument(config, cls)
        if config is not None:
            source = dict(config)
            check_learned_variance(source, cls)
            used_defaults = set(source.get("_use_default_values", []))
            base = kwargs.get("base_scheduler")
            if base is None and source.get("base_scheduler") is not None and "base_scheduler" not in used_defaults:
                base = source["base_scheduler"]
            if base is None:
                flow = _source_kind(source) == "flow" and "FlowMatchEulerDiscreteScheduler" in cls._supported_bases
                base = kwargs["base_scheduler"] = "FlowMatchEulerDiscreteScheduler" if flow else cls._default_base
            cls._check_source(source, base)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _check_source(cls, source: dict, base: str) -> None:
        kind = _source_kind(source)
        name = source.get("_class_name", "this config")
        if kind == "ve":
            raise ValueError(f"{cls.__name__} does not support EDM/VE configs ({name}); use a VP or FlowMatch config")
        if kind == "flow" and base != "FlowMatchEulerDiscreteScheduler":
            flow_ok = "FlowMatchEulerDiscreteScheduler" in cls._supported_bases
            hint = "" if flow_ok else f"; {cls.__name__} supports {', '.join(cls._supported_bases)} only"
            raise ValueError(
                f"base_scheduler={base!r} cannot run the flow-matching schedule of {name}{hint} "
                "(a DPMSolverMultistep/UniPC config with use_flow_sigmas=True works)"
            )
        if kind == "vp" and base == "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"base_scheduler={base!r} cannot run the VP (beta) schedule of {name}")

    def _init_wrapper(self) -> None:
        """Validate the shared arguments, build ``self.base`` and fill the config with its effective values."""
        name = self.config.base_scheduler or self._default_base
        if name not in self._supported_bases:
            raise ValueError(
                f"base_scheduler must be one of {self._supported_bases} for {type(self).__name__}, got {name!r}"
            )
        self.register_to_config(base_scheduler=name)
        c = self.config
        if c.prediction_type is not None and c.prediction_type not in _PREDICTIONS[name]:
            allowed = _PREDICTIONS[name]
            raise ValueError(f"prediction_type must be one of {allowed} for {name}, got {c.prediction_type!r}")
        if c.beta_schedule is not None and c.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {c.beta_schedule!r}")
        if c.timestep_spacing is not None and c.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {c.timestep_spacing!r}")
        if c.num_train_timesteps is not None and (
            not isinstance(c.num_train_timesteps, (int, np.integer)) or c.num_train_timesteps < 2
        ):
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {c.num_train_timesteps!r}")
        # a DDPM config's "fixed_small"/"fixed_large" only describe ancestral noise: the ODE solvers ignore them
        check_learned_variance(c, type(self))
        self._build_base()
        self._adopt_base_config()
        self._base_snapshot = self._frozen_base_kwargs()
        self._check_base()
        self._levels: list[tuple[float, float, float, float]] | None = None
        self._timesteps_cpu: list[float] | None = None
        self._reset_wrapper_state()
        self._reset_state()

    def _adopt_base_config(self) -> None:
        """Write the base's values of every key it has into this config (see the module docstring), warning about
        the values it replaced."""
        base_config = self.base.config
        adopted = {k: base_config[k] for k in BASE_CONFIG_KEYS if k in base_config}
        replaced = [
            k for k, v in adopted.items() if self.config.get(k) is not None and _freeze(self.config[k]) != _freeze(v)
        ]
        if replaced:
            given = ", ".join(f"{k}={self.config[k]!r}" for k in replaced)
            used = ", ".join(f"{k}={adopted[k]!r}" for k in replaced)
            warnings.warn(
                f"{type(self).__name__}: {self.config.base_scheduler} does not implement {given}; it runs {used} "
                "instead (as its own from_config of this config does), and the config now says so",
                stacklevel=4,
            )
        self.register_to_config(**adopted)

    def _base_class(self, name: str) -> type:
        """The class to instantiate for ``name`` (a subclass may return a thin subclass of it)."""
        return getattr(diffusers, name)

    def _base_kwargs(self) -> dict[str, Any]:
        """The non-``None`` config values the wrapped class takes."""
        cls = getattr(diffusers, self.config.base_scheduler)
        keys = cls._get_init_keys(cls)
        kwargs = {k: self.config[k] for k in BASE_CONFIG_KEYS if k in keys and self.config.get(k) is not None}
        if self.config.base_scheduler == "DPMSolverMultistepScheduler" and kwargs.get("algorithm_type") == "deis":
            # DPMSolverMultistepScheduler runs "deis" as "dpmsolver++" itself, but checks final_sigmas_type against
            # the unmapped name first and refuses its own default "zero": map it before, as it would after
            kwargs["algorithm_type"] = "dpmsolver++"
        if kwargs.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver") and "final_sigmas_type" not in kwargs:
            kwargs["final_sigmas_type"] = "sigma_min"  # DPMSolver refuses "zero" with noise prediction
        return kwargs

    def _frozen_base_kwargs(self) -> dict[str, Any]:
        return {k: _freeze(v) for k, v in self._base_kwargs().items()}

    def _build_base(self) -> None:
        name = self.config.base_scheduler
        kwargs = self._base_kwargs()
        try:
            self.base = self._base_class(name)(**kwargs)
        except (NotImplementedError, AssertionError, TypeError) as err:
            # diffusers' messages name the value ("lms is not implemented"), not the argument: name it here
            named = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if isinstance(v, str) and v in str(err))
            raise ValueError(f"{name} rejected its configuration{f' ({named})' if named else ''}: {err}") from err
        self._set_timesteps_params = set(inspect.signature(self.base.set_timesteps).parameters)
        step_parameters = list(inspect.signature(self.base.step).parameters.values())[3:]  # after sample
        self._step_params = {p.name for p in step_parameters}
        # the names of the base's positional arguments after `sample`, in order (step maps *args onto them)
        self._step_positional = tuple(
            p.name for p in step_parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )

    def _check_base(self) -> None:
        """Method-specific checks of the built base (raise ``ValueError``)."""

    @property
    def is_flow(self) -> bool:
        """Whether the wrapped solver runs a flow-matching (rectified-flow) schedule."""
        return self.config.base_scheduler == "FlowMatchEulerDiscreteScheduler" or bool(
            self.base.config.get("use_flow_sigmas", False)
        )

    @property
    def prediction_type(self) -> str:
        """What the model predicts, as the wrapped solver reads it."""
        return self.base.config.get("prediction_type", "flow_prediction")

    # -- delegation ---------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if base is not None and not name.startswith("__") and hasattr(base, name):
            return getattr(base, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        return self.base.config.num_train_timesteps

    @property
    def timesteps(self) -> torch.Tensor:
        return self.base.timesteps

    @timesteps.setter
    def timesteps(self, value: torch.Tensor) -> None:
        self.base.timesteps = value

    @property
    def num_inference_steps(self) -> int | None:
        return self.base.num_inference_steps

    @property
    def init_noise_sigma(self) -> float:
        return getattr(self.base, "init_noise_sigma", 1.0)

    @property
    def sigmas(self) -> torch.Tensor:
        """The wrapped solver's ``sigmas``; for DDIM (which has none) ``sqrt((1 - a) / a)`` at its timesteps and its
        final level."""
        if hasattr(self.base, "sigmas"):
            return self.base.sigmas
        if self._levels is None:
            raise AttributeError("sigmas is defined after set_timesteps")
        levels = [s / a for a, s, _, _ in self._levels] + [self._levels[-1][3] / self._levels[-1][2]]
        return torch.tensor(levels, dtype=torch.float32)

    @property
    def step_index(self) -> int | None:
        if hasattr(self.base, "step_index"):
            return self.base.step_index
        return self._own_step_index

    @property
    def begin_index(self) -> int | None:
        if hasattr(self.base, "begin_index"):
            return self.base.begin_index
        return self._own_begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``begin_index`` (pipelines call this before their loop)."""
        if hasattr(self.base, "set_begin_index"):
            self.base.set_begin_index(begin_index)
        else:
            self._own_begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        if hasattr(self.base, "index_for_timestep"):
            return self.base.index_for_timestep(timestep, schedule_timesteps)
        schedule_timesteps = self.base.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == torch.as_tensor(timestep).to(schedule_timesteps.device)).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
        return int(indices[0])

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        if hasattr(self.base, "scale_model_input"):
            return self.base.scale_model_input(sample, timestep)
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        """The wrapped solver's forward noising (FlowMatchEuler: its ``scale_noise``)."""
        if hasattr(self.base, "add_noise"):
            return self.base.add_noise(original_samples, noise, timesteps)
        return self.base.scale_noise(original_samples, timesteps, noise)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor) -> torch.Tensor:
        """Flow pipelines' img2img noising (SD3/Flux); VP bases use ``add_noise``."""
        if hasattr(self.base, "scale_noise"):
            return self.base.scale_noise(sample, timestep, noise)
        return self.base.add_noise(sample, noise, torch.as_tensor(timestep).reshape(-1))

    # -- timesteps ----------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Set the wrapped solver's timesteps and reset all per-run state.

        Args:
            num_inference_steps (`int`, *optional*): number of steps (one model call each).
            device (`str` or `torch.device`, *optional*): where ``timesteps`` live.
            timesteps (`list`, *optional*): custom timesteps, if the wrapped solver takes them.
            sigmas (`list[float]`, *optional*): custom sigmas, if the wrapped solver takes them.
            mu (`float`, *optional*): dynamic-shifting parameter, if the wrapped solver takes it.
        """
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("give num_inference_steps, timesteps or sigmas")
        if self._frozen_base_kwargs() != self._base_snapshot:
            # the config was edited after construction (StableDiffusionPipeline rewrites steps_offset): rebuild
            self._build_base()
            self._adopt_base_config()
            self._check_base()
            self._base_snapshot = self._frozen_base_kwargs()
        name = self.config.base_scheduler
        # flow grids live on continuous time: any number of steps is distinct there
        train_steps = None if self.is_flow else self.base.config.num_train_timesteps
        num_inference_steps, _ = check_schedule_arguments(num_inference_steps, timesteps, sigmas, train_steps)
        call: dict[str, Any] = {"device": device}
        if num_inference_steps is not None:
            call["num_inference_steps"] = num_inference_steps
        for key, value in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)):
            if value is None:
                continue
            if key not in self._set_timesteps_params:
                raise ValueError(f"{name} does not take custom `{key}` in set_timesteps")
            call[key] = value
        self.base.set_timesteps(**call)
        self._build_levels()
        self._reset_wrapper_state()
        self._reset_state()

    def _build_levels(self) -> None:
        """Per step index ``(alpha, sigma, alpha_next, sigma_next)`` as Python floats (CPU, float64 maths), so the
        step itself needs no host-device transfer."""
        base = self.base
        n = len(base.timesteps)
        if isinstance(base, diffusers.DDIMScheduler):
            ts = base.timesteps.detach().cpu().long()
            ac = base.alphas_cumprod.double()
            prev = ts - base.config.num_train_timesteps // base.num_inference_steps
            final = torch.as_tensor(base.final_alpha_cumprod, dtype=torch.float64)
            ac_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
            alpha, sigma = ac[ts].sqrt(), (1 - ac[ts]).sqrt()
            alpha_n, sigma_n = ac_prev.sqrt(), (1 - ac_prev).sqrt()
        else:
            s = base.sigmas.detach().cpu().double()
            if self.is_flow:
                a_all, s_all = 1 - s, s
            else:
                a_all = 1 / torch.sqrt(1 + s**2)
                s_all = s * a_all
            alpha, sigma, alpha_n, sigma_n = a_all[:n], s_all[:n], a_all[1 : n + 1], s_all[1 : n + 1]
        self._levels = list(zip(alpha.tolist(), sigma.tolist(), alpha_n.tolist(), sigma_n.tolist()))
        self._timesteps_cpu = base.timesteps.detach().cpu().double().tolist()

    def _ddim_noise_std(self, index: int, eta: float) -> float:
        """DDIM's ``std_dev_t`` (Song et al. 2021, eq. 16) at step ``index``."""
        if not eta:
            return 0.0
        a, s, a_n, s_n = self._levels[index]
        variance = (s_n**2 / s**2) * (1 - (a / a_n) ** 2)
        return float(eta) * math.sqrt(max(variance, 0.0))

    def _reset_wrapper_state(self) -> None:
        self._own_step_index: int | None = None
        self._own_begin_index: int | None = None

    def _reset_state(self) -> None:
        """Clear method-specific per-run state (called by ``set_timesteps``)."""

    # -- stepping -----------------------------------------------------------------------------------------------

    def _begin_step(self, timestep: Any) -> int:
        """This call's step index (initialised on the first call of a run, as diffusers does)."""
        # FlowMatchEuler has no num_inference_steps attribute at all until set_timesteps
        if getattr(self.base, "num_inference_steps", None) is None or self._levels is None:
            raise ValueError("call set_timesteps before step")
        if hasattr(self.base, "step_index"):
            if self.base.step_index is None:
                if self.base.begin_index is None:
                    # diffusers' DPMSolver/UniPC silently start at the last index for a timestep not in the grid
                    self._check_on_grid(timestep)
                self.base._init_step_index(timestep)
            index = self.base.step_index
        else:
            if self._own_step_index is None:
                begin = self._own_begin_index
                self._own_step_index = begin if begin is not None else self.index_for_timestep(timestep)
            index = self._own_step_index
        if index >= len(self._levels):
            raise ValueError("step called more times than there are timesteps; call set_timesteps again")
        return index

    def _check_on_grid(self, timestep: Any) -> None:
        check_on_grid(timestep, self.base.timesteps)

    def _positional_step_arguments(self, args: tuple, named: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Map ``step``'s positional arguments after ``sample`` onto the wrapped solver's own parameter names
        (``named``: this class's keyword arguments with their defaults; others go into ``kwargs``), in place."""
        names = self._step_positional
        if len(args) > len(names):
            listed = ", ".join(("model_output", "timestep", "sample") + names)
            raise TypeError(
                f"step takes at most {3 + len(names)} positional arguments with base {self.config.base_scheduler} "
                f"({listed}), got {3 + len(args)}"
            )
        for key, value in zip(names, args):
            if key in kwargs or (key in named and not _is_default(named[key], _STEP_DEFAULTS[key])):
                raise TypeError(f"step got multiple values for argument {key!r}")
            if key in named:
                named[key] = value
            else:
                kwargs[key] = value

    def _step_kwargs(
        self,
        eta: float | None,
        use_clipped_model_output: bool | None,
        generator: torch.Generator | None,
        variance_noise: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """The keyword arguments of ``step`` that the wrapped solver takes; others must be at their defaults."""
        params, name = self._step_params, self.config.base_scheduler
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = 0.0 if eta is None else eta
        elif eta:
            raise ValueError(f"eta={eta} needs a stochastic DDIM base; {name} is deterministic")
        if "use_clipped_model_output" in params:
            kwargs["use_clipped_model_output"] = bool(use_clipped_model_output)
        elif use_clipped_model_output:
            raise ValueError(f"use_clipped_model_output is a DDIMScheduler option; the base is {name}")
        if "generator" in params:
            kwargs["generator"] = generator
        if variance_noise is not None:
            if "variance_noise" not in params:
                raise ValueError(f"{name}.step does not take variance_noise")
            kwargs["variance_noise"] = variance_noise
        for key, value in extra.items():
            if key not in params or key in ("model_output", "timestep", "sample", "return_dict"):
                raise ValueError(f"{name}.step does not take `{key}`")
            kwargs[key] = value
        return kwargs

    def _call_base(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, step_kwargs: dict[str, Any]
    ) -> BaseOutput:
        return self.base.step(model_output, timestep, sample, return_dict=True, **step_kwargs)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        *args: Any,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> BaseOutput | tuple:
        """One step of the wrapped solver with this method's change.

        Args:
            model_output (`torch.Tensor`): the (guided) model output at ``sample``, of ``sample``'s shape.
            timestep (`int`, `float` or `torch.Tensor`): the current entry of ``timesteps``.
            sample (`torch.Tensor`): the current sample.
            *args: the wrapped solver's own positional arguments after ``sample``, in its order (DDIM: ``eta,
                use_clipped_model_output, generator, variance_noise, return_dict``; DPMSolverMultistep:
                ``generator, variance_noise, return_dict``; UniPC: ``return_dict``; FlowMatchEuler: ``s_churn,
                s_tmin, s_tmax, s_noise, generator, per_token_timesteps, return_dict``).
            eta (`float`, defaults to 0.0): DDIM's noise weight (DDIM base only; must be 0 otherwise).
            use_clipped_model_output (`bool`, defaults to `False`): DDIM base only.
            generator (`torch.Generator`, *optional*): passed on where the wrapped solver takes it.
            variance_noise (`torch.Tensor`, *optional*): passed on where the wrapped solver takes it.
            return_dict (`bool`, defaults to `True`): return the wrapped solver's output class, else a tuple.
            **kwargs: further keyword arguments of the wrapped solver's ``step`` (e.g. FlowMatchEuler's ``s_churn``).

        Returns:
            The wrapped solver's output (``prev_sample`` first, in ``sample``'s dtype), or a tuple.
        """
        named = dict(
            eta=eta,
            use_clipped_model_output=use_clipped_model_output,
            generator=generator,
            variance_noise=variance_noise,
            return_dict=return_dict,
        )
        if args:
            self._positional_step_arguments(args, named, kwargs)
        return_dict = named.pop("return_dict")
        step_kwargs = self._step_kwargs(**named, extra=kwargs)
        check_model_output(model_output, sample)
        index = self._begin_step(timestep)
        output = self._wrapped_step(model_output, timestep, sample, index, step_kwargs)
        if output.prev_sample.dtype != sample.dtype:
            # a half-precision model output with a float32 sample: the sample's precision is the one to keep
            output.prev_sample = output.prev_sample.to(sample.dtype)
        if not hasattr(self.base, "step_index"):
            self._own_step_index = index + 1
        return output if return_dict else output.to_tuple()

    def _wrapped_step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        index: int,
        step_kwargs: dict[str, Any],
    ) -> BaseOutput:
        """The method: the wrapped solver's output for step ``index``, with ``prev_sample`` changed. DualFast and
        LML override it; here it is the wrapped solver's own step."""
        return self._call_base(model_output, timestep, sample, step_kwargs)
