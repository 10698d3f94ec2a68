# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""What BDIA-DDIM (:mod:`.bdia`) and BDIA-EDM (:mod:`.bdia_edm`) share: the float64 state of the BDIA recursion and
the argument checks of both classes.

BDIA (Zhang, Lewis & Kleijn, arXiv 2307.10829; official code https://github.com/guoqiang-zhang-x/BDIA) carries two
states, ``z_{i+1}`` and ``z_i``, from step to step. Its recursion has a parasitic mode (root ``-gamma`` on a
zero-velocity model, and larger than 1 in magnitude on uneven Karras grids at ``gamma = 1``), so any rounding of the
carried states grows from step to step. The states are therefore kept here in float64; the half-precision tensor a
pipeline holds is only its view of the state.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput


@dataclass
class BDIAInverseOutput(BaseOutput):
    """Output of :meth:`BDIAScheduler.inverse_step` and :meth:`BDIAEDMScheduler.inverse_step`.

    Args:
        upper_sample (`torch.Tensor`): the state one level noisier than the step's input, in the input's dtype.
        pred_original_sample (`torch.Tensor`): the x0 prediction made at the step's input.
    """

    upper_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class StateView:
    """A float64 state and the cast of it that a step handed to the pipeline.

    The pipeline hands that very tensor back as the next step's ``sample`` (``latents = step(...).prev_sample``), so
    :meth:`resolve` recognises it by identity and by its in-place version counter: no comparison of values, hence no
    host-device sync in the step. A new tensor, or the handed-out one edited in place (a ``callback_on_step_end``),
    is used as given.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.state: torch.Tensor | None = None
        self._view: torch.Tensor | None = None
        self._version = -1

    def hand_out(self, state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keep ``state`` and return a fresh cast of it to ``dtype`` (the pipeline's view)."""
        view = state.to(dtype, copy=True)
        self.state, self._view, self._version = state, view, view._version
        return view

    def resolve(self, sample: torch.Tensor) -> torch.Tensor:
        """The kept state if ``sample`` is the untouched view of it, else ``sample``."""
        if self._view is not None and sample is self._view and sample._version == self._version:
            return self.state
        return sample


class LinearWorkspace:
    """The float64 state of a BDIA run: two latents, reused across steps (and runs) of one latent shape, in which a
    step forms ``gamma * upper + c_keep * keep + sum_j c_j * term_j`` without allocating a latent per step.

    After :meth:`combine`, one buffer holds ``keep`` (the next step's ``upper``) and the other the float64 result,
    of which the step hands out a cast; :meth:`current` gives that float64 result back when the pipeline returns the
    cast unchanged (:class:`StateView`), so that neither carried state is ever rounded to the pipeline's dtype.
    """

    def __init__(self) -> None:
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.carried = StateView()  # the float64 state whose cast the last step handed out

    def current(self, sample: torch.Tensor) -> torch.Tensor:
        """``z_i`` for a step given ``sample``: the float64 state the last step returned if ``sample`` is its view,
        else ``sample`` itself (a run's first step, or latents the pipeline edited)."""
        return self.carried.resolve(sample)

    def combine(
        self,
        upper: torch.Tensor | None,
        gamma: float,
        terms: Sequence[tuple[torch.Tensor, float]],
        keep: torch.Tensor,
        c_keep: float,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The combination in float64, cast to ``dtype`` (a fresh tensor), and ``keep`` in float64 (one of the
        buffers: the next step's ``upper``, valid until the step after it). ``upper=None`` drops that term."""
        buffers = self.buffers
        if buffers is None or buffers[0].shape != keep.shape or buffers[0].device != keep.device:
            buffers = tuple(torch.empty(keep.shape, dtype=torch.float64, device=keep.device) for _ in range(2))
        acc, spare = buffers
        # the usual case: upper is acc (the previous keep) and keep is spare (the previous result, from `current`)
        if keep is acc:
            keep = keep.clone()
        if upper is spare:
            upper = upper.clone()
        if keep is not spare:
            spare.copy_(keep)
        if upper is None:
            acc.copy_(spare).mul_(c_keep)
        else:
            if upper is not acc:  # upper not yet held in our buffer (a run's second step, an injected pair)
                acc.copy_(upper)
            acc.mul_(gamma).add_(spare, alpha=c_keep)
        for term, coefficient in terms:  # mixed-dtype in-place adds accumulate in float64
            acc.add_(term, alpha=coefficient)
        self.buffers = (spare, acc)
        return self.carried.hand_out(acc, dtype), spare  # a copy even for float64: acc is overwritten next step


def output_dtypes(sample: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``(prev_sample, pred_original_sample)`` dtypes: the sample's, and the promotion of the two inputs' (which is
    what ``DDIMScheduler`` returns for ``pred_original_sample``)."""
    return sample.dtype, torch.promote_types(sample.dtype, model_output.dtype)


def checked_gamma(gamma: float) -> float:
    """``gamma`` as a float, or a ``ValueError`` unless it is a number in ``[0, 1]`` (BDIA's weight)."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    return float(gamma)


def checked_pair(upper_sample: torch.Tensor, lower_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(upper, lower)`` pair of ``set_inversion_pair``, checked to be two tensors of one shape."""
    if not isinstance(upper_sample, torch.Tensor) or not isinstance(lower_sample, torch.Tensor):
        raise TypeError("set_inversion_pair takes two tensors (the upper and the lower state)")
    if upper_sample.shape != lower_sample.shape:
        raise ValueError(
            f"the pair must have one shape, got {tuple(upper_sample.shape)} and {tuple(lower_sample.shape)}"
        )
    return upper_sample, lower_sample


def same_sample(sample: torch.Tensor, stored: torch.Tensor) -> bool:
    """Whether ``sample`` is ``stored`` as the pipeline would hold it (same shape, equal after a cast)."""
    if sample is stored:
        return True
    if sample.shape != stored.shape:
        return False
    return bool(torch.equal(sample, stored.to(sample.device, sample.dtype)))
