# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""AdaptiveDiffusion (Ye et al., NeurIPS 2024, arXiv 2410.09873) for any diffusers pipeline, unchanged.

A diffusers scheduler cannot skip the network: the pipeline calls the model before ``scheduler.step``. The official
code therefore copies whole pipeline classes. Here three cooperating pieces share one
:class:`AdaptiveSkipController` instead:

* the **model** (``pipe.unet`` or ``pipe.transformer``) gets an instance-level ``forward`` that returns the cached
  raw output (before guidance) on a skipped step, one cache per call slot within a step;
* the **scheduler** gets instance-level ``step`` and ``set_timesteps`` that call the base methods unchanged and
  carry their signatures (``functools.wraps``), so pipelines still find ``eta``/``generator``/``timesteps``/
  ``sigmas`` with ``inspect.signature``. ``set_timesteps`` resets the state (no ``reset_cache()`` to forget);
  ``step`` measures the latent difference and decides whether the next step may reuse the model output.

The components are patched in place rather than replaced by proxy objects: ``pipe.unet`` stays the same object, so
``isinstance`` checks, ``.config``, ``.dtype``, ``.device``, ``save_pretrained`` and the pipeline's registered
config are untouched, and :meth:`AdaptiveDiffusionHandle.disable` restores exactly the original objects and
methods.

The skip rule, as the official code (github.com/UniModal4Reasoning/AdaptiveDiffusion,
``examples/AdaptiveDiffusion/acceleration/sparse_pipeline.py``) runs it, with ``x^(i)`` the latent entering step ``i``:

    Delta_j = mean |x^(j) - x^(j-1)|                                        (first-order difference magnitude)
    skip step i+1  <=>  |Delta_{i+1} - 2 Delta_i + Delta_{i-1}| <= 2 delta Delta_i      (third-order criterion)

after ``warmup`` steps that always call the model, and with at most ``max_skips`` consecutive reuses. ``Delta`` is
measured between the input and the output of each ``scheduler.step``, so latents edited by a
``callback_on_step_end`` between steps do not distort it. The paper's own equation numbers could not be checked
when this was written (unverified), so the comments describe the official code rather than cite the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "AdaptiveDiffusionHandle",
    "AdaptiveSkipController",
    "AdaptiveStepRecord",
    "enable_adaptive_diffusion",
]

# Base schedulers that evaluate the model more than once per step, or at intermediate states between the grid
# points: their latent differences alternate, which makes the criterion meaningless.
MULTI_CALL_SCHEDULERS = frozenset(
    {
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSinglestepScheduler",
        "DPMSolverSDEScheduler",
        "PNDMScheduler",
        "FlowMatchHeunDiscreteScheduler",
    }
)

# The official code applies its max-consecutive-skip guard only once more than this many decisions were recorded
# (as its sparse pipeline is written); that is why its first run of reuses is 5 long whatever C_max is.
_OFFICIAL_GUARD_MIN_DECISIONS = 4

_MODEL_NAMES = ("unet", "transformer")


@dataclass(frozen=True)
class AdaptiveStepRecord:
    """What happened at one denoising step of the last run.

    Args:
        step (`int`): index of the step in the run (0 is the first call of ``scheduler.step``).
        computed (`tuple[bool, ...]`): whether the step used a fresh model output; one entry in ``"batch"`` mode,
            one per sample in ``"per_sample"`` mode.
        reason (`tuple[str, ...]`): why, per entry: ``"warmup"``, ``"criterion"`` (the criterion said compute),
            ``"cap"`` (``max_skips`` reuses in a row), ``"fallback"`` (a reuse was planned but the pipeline called
            the model with inputs of another shape, or in a call slot with no cached output), ``"disabled"`` or
            ``"skip"``.
        score (`tuple[float, ...]` or `None`): the criterion value that decided this step,
            ``|Delta_{i+1} - 2 Delta_i + Delta_{i-1}| / (2 Delta_i)``: the step is a reuse candidate when
            ``score <= delta``. `None` during warm-up.
    """

    step: int
    computed: tuple[bool, ...]
    reason: tuple[str, ...]
    score: tuple[float, ...] | None


class AdaptiveSkipController:
    """The state shared by the model and scheduler wrappers of :func:`enable_adaptive_diffusion`.

    It keeps only what the criterion needs: the last three difference magnitudes (float32, on the latents' device),
    the consecutive-reuse counters, the cached raw model outputs of the last computed step (one per call slot), the
    model-call counter and the decision log. All of it is reset by :meth:`reset`, which the scheduler wrapper calls
    from ``set_timesteps``, i.e. once at the start of every pipeline call.

    Args:
        delta (`float`, defaults to 0.01): the threshold delta of the criterion. ``0`` never skips (the output is then
            bit-identical to the plain pipeline); ``math.inf`` reuses whenever the warm-up and ``max_skips`` allow.
        max_skips (`int`, defaults to 4): C_max, the most consecutive steps that may reuse a cached output.
        warmup (`int`, defaults to 4): the first ``warmup`` steps always call the model (at least 3: the criterion
            needs three differences).
        decision (`str`, defaults to `"batch"`): ``"batch"`` takes one mean over the whole latent batch, as the
            official code does, so every sample shares one skip path. ``"per_sample"`` keeps the statistics and
            decisions per sample, so a sample's image does not depend on the other samples in its batch; the model
            is then called on the whole batch whenever any sample needs a fresh output (the other samples keep
            their cached rows), so compute is saved only on steps that every sample reuses.
        official_compat (`bool`, defaults to `False`): reproduce the official bookkeeping of the ``max_skips`` guard,
            under which the first run of reuses is 5 long for any ``max_skips``. With `False`, every run of reuses
            is capped at ``max_skips``.
        enabled (`bool`, defaults to `True`): `False` makes every step call the model (like ``delta=0``).
    """

    def __init__(
        self,
        delta: float = 0.01,
        max_skips: int = 4,
        warmup: int = 4,
        decision: Literal["batch", "per_sample"] = "batch",
        official_compat: bool = False,
        enabled: bool = True,
    ):
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or math.isnan(delta) or delta < 0:
            raise ValueError(f"delta must be a number >= 0 (math.inf allowed), got {delta!r}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise ValueError(f"max_skips must be an integer >= 1, got {max_skips!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 3:
            raise ValueError(f"warmup must be an integer >= 3 (the criterion needs three differences), got {warmup!r}")
        if decision not in ("batch", "per_sample"):
            raise ValueError(f"decision must be 'batch' or 'per_sample', got {decision!r}")
        if not isinstance(official_compat, bool):
            raise ValueError(f"official_compat must be a bool, got {official_compat!r}")  # noqa: TRY004 (project rule)
        self.delta = float(delta)
        self.max_skips = max_skips
        self.warmup = warmup
        self.decision = decision
        self.official_compat = official_compat
        self.enabled = bool(enabled)
        self.reset()
        self.active = False  # becomes True at the first set_timesteps; until then the model runs untouched

    # -- run state ----------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new run: forget differences, decisions, caches and counters."""
        self.active = True
        self.nfe = 0  # real model forward calls in this run
        self.log: list[AdaptiveStepRecord] = []
        self._step = 0
        self._slot = 0  # model calls since the last scheduler step
        self._cache: dict[int, tuple[Any, Any]] = {}  # slot -> (input shape, detached raw output)
        self._groups: int | None = None  # 1 in batch mode, the latent batch size in per-sample mode
        self._deltas: list[torch.Tensor] = []  # Delta_{i-1}, Delta_i, Delta_{i+1}, float32 (groups,)
        self._consecutive: list[int] = []  # reuses in a row, per group
        self._recorded: list[int] = []  # outcomes recorded since the warm-up, per group (official guard)
        self._sample_nfe: list[int] = []
        self._skip: list[bool] | None = None  # plan for the current step; None: every group computes
        self._reason: list[str] | None = None
        self._score: tuple[float, ...] | None = None
        self._fresh: list[bool] | None = None  # groups that got a fresh output in the current step

    @property
    def sample_nfe(self) -> list[int]:
        """Steps of the last run at which each decision group (one in batch mode, each sample in per-sample mode)
        used a fresh model output."""
        return list(self._sample_nfe)

    # -- model side ---------------------------------------------------------------------------------------------

    def model_call(self, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run (or skip) one model call of the current step.

        Args:
            forward (`Callable`): the model's original forward.
            args (`tuple`), kwargs (`dict`): the call's arguments, passed through unchanged.

        Returns:
            The real output on a computed step, or a fresh copy of the cached one (same structure) on a reuse.
        """
        if not self.active:
            return forward(*args, **kwargs)
        slot = self._slot
        self._slot += 1
        x = _model_input(args, kwargs)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        entry = self._cache.get(slot)
        if self._skip is not None and any(self._skip):
            rows = self._row_skip(shape, x)
            if entry is None or entry[0] != shape or rows is None:
                pass  # the pipeline's calls changed shape or number: compute (logged as "fallback"), never guess
            elif all(self._skip):
                # Every group reuses: return a copy, so in-place edits by the pipeline cannot reach the cache.
                return _tree_map(lambda t: t.clone(), entry[1])
            else:
                # Per-sample mode, mixed step: the model runs on the whole batch, but the reusing samples keep
                # their cached rows, so each sample's trajectory depends only on its own decisions.
                out = forward(*args, **kwargs)
                self.nfe += 1
                merged = _tree_map(lambda new, old: _merge_rows(new, old, rows), out, entry[1])
                self._cache[slot] = (shape, _tree_map(lambda t: t.detach().clone(), merged))
                self._mark_fresh([not s for s in self._skip])
                return merged
        out = forward(*args, **kwargs)
        self.nfe += 1
        # A detached copy: the pipeline may edit its output in place, and autograd must not keep the step alive.
        self._cache[slot] = (shape, _tree_map(lambda t: t.detach().clone(), out))
        self._mark_fresh(None)
        return out

    def _row_skip(self, shape: tuple | None, x: Any) -> torch.Tensor | None:
        """Per-row reuse mask of a model call (rows map to sample ``row % batch``: CFG stacks copies of the
        latents), or `None` if the rows cannot be mapped to the decision groups."""
        if self._groups == 1:
            return torch.ones((), dtype=torch.bool)
        if shape is None or len(shape) == 0 or shape[0] % self._groups:
            return None
        skip = torch.tensor(self._skip, dtype=torch.bool, device=x.device)
        return skip.repeat(shape[0] // self._groups)

    def _mark_fresh(self, groups: list[bool] | None) -> None:
        """Note which groups got a fresh output in this step (`None`: all of them); slots accumulate."""
        new = [True] * (self._groups or 1) if groups is None else list(groups)
        self._fresh = new if self._fresh is None else [a or b for a, b in zip(self._fresh, new)]

    # -- scheduler side -----------------------------------------------------------------------------------------

    def after_step(self, sample: torch.Tensor, prev_sample: torch.Tensor) -> None:
        """Record the step that just ran and decide whether the next one may reuse the model output.

        Args:
            sample (`torch.Tensor`): the latent x^(i) the scheduler stepped from.
            prev_sample (`torch.Tensor`): the latent x^(i+1) it returned.
        """
        if not self.active:
            return
        # Delta_{i+1} = mean |x^(i+1) - x^(i)|, in float32 whatever the latent dtype (fp16 means lose digits).
        diff = (prev_sample.detach().float() - sample.detach().float()).abs()
        if self.decision == "per_sample":
            delta_next = diff.reshape(diff.shape[0], -1).mean(1)
        else:
            delta_next = diff.mean().reshape(1)
        groups = delta_next.numel()
        if groups != self._groups:
            # First step, or the batch changed size mid-run: restart the statistics of every group.
            self._groups = groups
            self._deltas = []
            self._consecutive = [0] * groups
            self._recorded = [0] * groups
            self._sample_nfe = [0] * groups
            if self._skip is not None and len(self._skip) != groups:
                self._skip, self._reason, self._score = None, None, None
            if self._fresh is not None and len(self._fresh) != groups:
                self._fresh = [any(self._fresh)] * groups
        self._record_step(groups)
        self._deltas = (self._deltas + [delta_next])[-3:]
        self._step += 1
        self._slot = 0
        self._fresh = None
        self._plan_next(groups)

    def _record_step(self, groups: int) -> None:
        fresh = self._fresh if self._fresh is not None else [False] * groups
        reasons = []
        for g in range(groups):
            planned = self._reason[g] if self._reason is not None else "warmup"
            if fresh[g]:
                reasons.append("fallback" if planned == "skip" else planned)
                self._consecutive[g] = 0
                self._sample_nfe[g] += 1
            else:
                reasons.append("skip")
                self._consecutive[g] += 1
            if self._step >= self.warmup:
                self._recorded[g] += 1
        self.log.append(AdaptiveStepRecord(self._step, tuple(bool(f) for f in fresh), tuple(reasons), self._score))

    def _plan_next(self, groups: int) -> None:
        if self._step < self.warmup or len(self._deltas) < 3:
            self._skip, self._reason, self._score = None, ["warmup"] * groups, None
            return
        d_prev, d_cur, d_next = self._deltas  # Delta_{i-1}, Delta_i, Delta_{i+1}
        # Third-order criterion of the official code: |Delta_{i+1} - 2 Delta_i + Delta_{i-1}| <= 2 delta Delta_i.
        # Both sides are computed on the device and fetched together: one host sync per step.
        lhs_rhs = torch.stack([(d_next - 2 * d_cur + d_prev).abs(), 2 * d_cur]).tolist()
        scores, skip, reasons = [], [], []
        for g in range(groups):
            lhs, rhs = lhs_rhs[0][g], lhs_rhs[1][g]
            scores.append(lhs / rhs if rhs > 0 else (0.0 if lhs == 0 else math.inf))
            if not self.enabled or self.delta == 0:
                # Strict off switch: the official `<=` would skip at delta = 0 whenever the second difference is
                # exactly zero (e.g. latents that stopped changing).
                ok, why = False, "disabled"
            else:
                ok = math.isinf(self.delta) or lhs <= self.delta * rhs
                why = "criterion"
            if ok and self._capped(g):
                ok, why = False, "cap"
            skip.append(ok)
            reasons.append("skip" if ok else why)
        self._skip, self._reason, self._score = skip, reasons, tuple(scores)

    def _capped(self, g: int) -> bool:
        if self.official_compat:
            # The official guard: compute if more than 4 decisions were recorded and the last C_max were all
            # reuses (Python's mask[-C:] takes all of them when fewer than C_max were recorded).
            recorded = self._recorded[g]
            return recorded > _OFFICIAL_GUARD_MIN_DECISIONS and self._consecutive[g] >= min(self.max_skips, recorded)
        return self._consecutive[g] >= self.max_skips


class AdaptiveDiffusionHandle:
    """Returned by :func:`enable_adaptive_diffusion`: statistics of the last run, and :meth:`disable`.

    Usable as a context manager: ``with enable_adaptive_diffusion(pipe) as handle: ...`` disables on exit.

    Args:
        controller (`AdaptiveSkipController`): the shared state.
        pipe (`DiffusionPipeline`): the patched pipeline.
        model_name (`str`): the attribute of ``pipe`` holding the patched model (``"unet"`` or ``"transformer"``).
    """

    def __init__(self, controller: AdaptiveSkipController, pipe: Any, model_name: str):
        self.controller = controller
        self.model_name = model_name
        self._pipe_ref = weakref.ref(pipe)
        self.model = getattr(pipe, model_name)
        self.scheduler = pipe.scheduler
        self._restore: list[tuple[Any, str, bool, Any, Any]] = []  # (obj, name, had, old value, our value)
        self.active = False

    @property
    def nfe(self) -> int:
        """Real model forward calls in the last run (a pipeline with true CFG makes two per computed step)."""
        return self.controller.nfe

    @property
    def sample_nfe(self) -> list[int]:
        """Steps of the last run that used a fresh model output, per decision group (see
        :attr:`AdaptiveSkipController.sample_nfe`)."""
        return self.controller.sample_nfe

    @property
    def log(self) -> list[AdaptiveStepRecord]:
        """One :class:`AdaptiveStepRecord` per step of the last run."""
        return list(self.controller.log)

    @property
    def pattern(self) -> str:
        """The last run as a string, ``"C"`` for a step that called the model and ``"."`` for a reuse (a step is
        ``"C"`` if any sample computed)."""
        return "".join("C" if any(r.computed) else "." for r in self.controller.log)

    @property
    def patterns(self) -> list[str]:
        """:attr:`pattern` per decision group (per sample in ``"per_sample"`` mode)."""
        groups = self.controller._groups or 0
        return ["".join("C" if r.computed[g] else "." for r in self.controller.log) for g in range(groups)]

    def disable(self) -> None:
        """Restore the model's and the scheduler's original methods. Idempotent."""
        if not self.active:
            return
        for obj, name, _, _, ours in self._restore:
            if obj.__dict__.get(name) is not ours:
                raise RuntimeError(
                    f"{type(obj).__name__}.{name} was wrapped again after enable_adaptive_diffusion (for example by an"
                    " offload hook); remove that wrapper first, then call disable()"
                )
        for obj, name, had, old, _ in reversed(self._restore):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._restore.clear()
        self.controller.active = False
        self.active = False

    def __enter__(self) -> AdaptiveDiffusionHandle:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.disable()

    def __repr__(self) -> str:
        c = self.controller
        return (
            f"AdaptiveDiffusionHandle(delta={c.delta}, max_skips={c.max_skips}, warmup={c.warmup}, "
            f"decision={c.decision!r}, active={self.active}, nfe={c.nfe}, pattern={self.pattern!r})"
        )

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        self._restore.append((obj, name, had, obj.__dict__.get(name), value))
        setattr(obj, name, value)


def enable_adaptive_diffusion(
    pipe: Any,
    delta: float = 0.01,
    max_skips: int = 4,
    warmup: int = 4,
    decision: Literal["batch", "per_sample"] = "batch",
    official_compat: bool = False,
    model_name: str | None = None,
) -> AdaptiveDiffusionHandle:
    """Make a diffusers pipeline reuse the model output on steps where the latents move predictably.

    AdaptiveDiffusion (Ye et al., NeurIPS 2024): after each step the third-order latent difference is compared with
    the first-order one, and the next step reuses the previous raw model output when they agree within ``delta``
    (see the module docstring). The pipeline itself is not changed: its model's ``forward`` and its scheduler's
    ``step`` / ``set_timesteps`` are wrapped in place, so every pipeline that calls the model once per entry of
    ``scheduler.timesteps`` works. Guidance (CFG, ``guidance_rescale``) is recomputed from the cached raw output.

    Args:
        pipe (`DiffusionPipeline`): any pipeline with a ``scheduler`` and a ``unet`` or ``transformer``.
        delta (`float`, defaults to 0.01): the threshold; ``0`` disables skipping (bit-identical output),
            ``math.inf`` skips as often as ``warmup`` and ``max_skips`` allow. 0.01 is the official default.
        max_skips (`int`, defaults to 4): the most consecutive reused steps (C_max).
        warmup (`int`, defaults to 4): steps at the start that always call the model (at least 3).
        decision (`str`, defaults to `"batch"`): ``"batch"`` (one decision for the batch, as the official code) or
            ``"per_sample"`` (each sample's decisions depend only on that sample).
        official_compat (`bool`, defaults to `False`): reproduce the official guard, under which the first run of
            reuses is 5 long for any ``max_skips``.
        model_name (`str`, *optional*): the pipeline attribute holding the denoiser; default: ``"unet"``, else
            ``"transformer"``.

    Returns:
        `AdaptiveDiffusionHandle`: ``.nfe`` (model calls of the last run), ``.log``/``.pattern`` (the decisions),
        ``.disable()``.

    Raises:
        ValueError: on a bad argument, a pipeline without a denoiser or scheduler, a scheduler that calls the model
            more than once per step (Heun, KDPM2, singlestep DPM-Solver, PNDM, ...), or a pipeline that already has
            adaptive diffusion enabled.

    Example:

    ```py
    >>> handle = enable_adaptive_diffusion(pipe, delta=0.01, max_skips=4)
    >>> image = pipe(prompt, num_inference_steps=50).images[0]
    >>> handle.nfe, handle.pattern  # e.g. (21, 'CCCC....C.C...')
    >>> handle.disable()
    ```
    """
    controller = AdaptiveSkipController(delta, max_skips, warmup, decision, official_compat)
    if model_name is None:
        model_name = next((n for n in _MODEL_NAMES if getattr(pipe, n, None) is not None), None)
        if model_name is None:
            raise ValueError("pipe has neither a `unet` nor a `transformer`; pass model_name= to name its denoiser")
    elif not isinstance(model_name, str) or getattr(pipe, model_name, None) is None:
        raise ValueError(f"model_name={model_name!r} is not a component of pipe")
    model = getattr(pipe, model_name)
    if not isinstance(model, nn.Module):
        raise ValueError(f"pipe.{model_name} must be a torch.nn.Module, got {type(model).__name__}")  # noqa: TRY004
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "step", None)):
        raise ValueError("pipe.scheduler must be a diffusers scheduler with `step` and `set_timesteps`")
    _check_scheduler(scheduler)
    for obj, name in ((model, "forward"), (scheduler, "step"), (scheduler, "set_timesteps")):
        if getattr(obj.__dict__.get(name), "_adaptive_diffusion", False):
            raise ValueError(
                f"pipe.{model_name if obj is model else 'scheduler'} is already wrapped by "
                "enable_adaptive_diffusion; call handle.disable() first"
            )

    handle = AdaptiveDiffusionHandle(controller, pipe, model_name)
    pipe_ref = weakref.ref(pipe)

    base_forward = model.forward

    @functools.wraps(base_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        owner = pipe_ref()
        if controller.active and owner is not None and getattr(owner, "scheduler", scheduler) is not scheduler:
            # A replaced scheduler never resets the state nor decides: reusing would follow a stale plan.
            raise RuntimeError(
                "pipe.scheduler was replaced after enable_adaptive_diffusion; call handle.disable() and enable it "
                "again for the new scheduler"
            )
        return controller.model_call(base_forward, args, kwargs)

    base_step = scheduler.step
    step_signature = inspect.signature(base_step)

    # functools.wraps sets __wrapped__, so inspect.signature (used by pipelines to look for `eta`, `generator`)
    # reports the base signature, and every argument reaches the base unchanged.
    @functools.wraps(base_step)
    def step(*args: Any, **kwargs: Any) -> Any:
        out = base_step(*args, **kwargs)
        if controller.active:
            if "sample" in kwargs:
                sample = kwargs["sample"]
            elif len(args) > 2:
                sample = args[2]
            else:
                sample = step_signature.bind_partial(*args, **kwargs).arguments.get("sample")
            prev_sample = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            if isinstance(sample, torch.Tensor) and isinstance(prev_sample, torch.Tensor):
                controller.after_step(sample, prev_sample)
        return out

    base_set_timesteps = scheduler.set_timesteps

    # Keeps the named `timesteps` / `sigmas` / `mu` parameters visible to `retrieve_timesteps`.
    @functools.wraps(base_set_timesteps)
    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        controller.reset()  # every pipeline call starts here: no stale state from the previous image
        return base_set_timesteps(*args, **kwargs)

    for fn in (forward, step, set_timesteps):
        fn._adaptive_diffusion = True
    handle._patch(model, "forward", forward)
    handle._patch(scheduler, "step", step)
    handle._patch(scheduler, "set_timesteps", set_timesteps)
    handle.active = True
    return handle


# -- helpers ------------------------------------------------------------------------------------------------------


def _check_scheduler(scheduler: Any) -> None:
    names = {c.__name__ for c in type(scheduler).__mro__}
    multi = sorted(names & MULTI_CALL_SCHEDULERS)
    order = getattr(scheduler, "order", 1)
    if multi or order != 1:
        raise ValueError(
            f"pipe.scheduler is a {type(scheduler).__name__}, which evaluates the model more than once per step or "
            "at intermediate states; the AdaptiveDiffusion criterion needs one model call per step on the main "
            "grid. Use e.g. DDIM, Euler, EulerAncestral, DPMSolverMultistep, UniPCMultistep, DEIS, LMS or "
            "FlowMatchEuler."
        )


def _model_input(args: tuple, kwargs: dict) -> Any:
    """The latent input of a diffusers model call (``sample`` for UNets, ``hidden_states`` for transformers)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("sample", "hidden_states", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def _merge_rows(new: torch.Tensor, old: torch.Tensor, row_skip: torch.Tensor) -> torch.Tensor:
    """Rows of ``old`` where ``row_skip``, else rows of ``new`` (tensors that are not per-row come from ``new``)."""
    if new.shape != old.shape or new.ndim == 0 or new.shape[0] != row_skip.shape[0]:
        return new
    mask = row_skip.to(new.device).reshape(-1, *([1] * (new.ndim - 1)))
    return torch.where(mask, old.to(new.device), new)


def _tree_map(fn: Callable[..., torch.Tensor], tree: Any, *others: Any) -> Any:
    """Apply ``fn`` to the tensors of a model output (tensor, tuple/list, dict, diffusers ``BaseOutput`` or other
    dataclass, ``SimpleNamespace``), keeping its structure; ``others`` are walked in parallel."""
    if isinstance(tree, torch.Tensor):
        return fn(tree, *others)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {
            f.name: _tree_map(fn, getattr(tree, f.name), *(getattr(o, f.name) for o in others))
            for f in dataclasses.fields(tree)
            if f.init
        }
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, SimpleNamespace):
        return SimpleNamespace(**{k: _tree_map(fn, v, *(vars(o)[k] for o in others)) for k, v in vars(tree).items()})
    if isinstance(tree, dict):
        return type(tree)((k, _tree_map(fn, v, *(o[k] for o in others))) for k, v in tree.items())
    if isinstance(tree, (tuple, list)):
        items = [_tree_map(fn, v, *(o[i] for o in others)) for i, v in enumerate(tree)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree
