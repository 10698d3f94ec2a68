# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The LML correction fused into one Triton kernel (two for long rows), for CUDA tensors.

On a GPU the eager correction of :class:`~diffsamplers.samplers.lml.LMLScheduler` is launch-bound: the direction,
its float64 copy, the Gram product, two dozen scalar operations on ``(B,)`` tensors for the coefficients and the
update are about thirty kernels, each far shorter than its launch. Here the same arithmetic takes one launch for
rows (samples) of up to ``_ROW_MAX`` elements, an SD/SDXL latent: ``_row_kernel``, one program per row, reads the
row once for the three dot products and once more for the update. One SM per sample is slow in bandwidth terms,
but at these sizes the step is bound by host-side launch costs (benchmarks/RESULTS.md), so one launch fewer is what
counts. Longer rows take two launches over the whole GPU:

1. ``_gram_kernel``: forms ``g = p * u + q * v`` (the increment ``prev - c * x``; or ``g = u`` when the direction is
   already a tensor), stores it if asked, and accumulates ``<g, g>``, ``<g, g_prev>`` and ``<g_prev, g_prev>`` in
   float64 from the float32 values (whose products are exact in float64), one partial sum per program;
2. ``_update_kernel``: every program sums its row's partials in a fixed order (so results are deterministic),
   evaluates the coefficients of :func:`~diffsamplers.samplers.lml._lm_coefficients` in float64 and writes
   ``out = base + weight * ((A - 1) g + B (g_prev - g))`` elementwise.

``<g_prev, g_prev>`` is recomputed each step rather than carried over: it rides on the same pass for free, and no
state between steps means nothing to invalidate. Importing this module needs Triton; :mod:`lml` imports it only
when a CUDA step needs it. With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests use that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements per program and loop iteration; partial sums per row at most (larger rows loop inside a program)
_BLOCK = 1024
_MAX_PARTIALS = 256
# rows up to this many elements take the single-launch kernel
_ROW_MAX = 1 << 17
_ROW_BLOCK = 2048


@triton.jit
def _coefficients(gg, gp, pp, lam, kappa):
    """``(A - 1, B)`` of ``LM(g) = A g + B (g_prev - g)`` in float64: lml._lm_coefficients, term for term."""
    g_delta = gp - gg  # delta = g_prev - g, u = g + kappa delta, r = kappa delta
    delta_delta = (pp - gp) - g_delta
    u_g = gg + kappa * g_delta
    u_r = kappa * (g_delta + kappa * delta_delta)
    det = tl.maximum(gg * pp - gp * gp, 0.0)
    d_sq = lam * lam * gg + (kappa * kappa) * det * (u_g + u_r + 2.0 * lam)
    scale = tl.sqrt(gg / tl.maximum(d_sq, 2.2250738585072014e-308))  # |g| / |d|; LM(0) = 0
    return scale * (u_r + lam) - 1.0, -kappa * scale * u_g


@triton.jit
def _row_kernel(
    u_ptr,
    v_ptr,
    g_prev_ptr,
    g_ptr,
    base_ptr,
    out_ptr,
    parameter_ptr,
    p,
    q,
    weight,
    n,
    BLOCK: tl.constexpr,
    STORE_G: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * n
    acc_gg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_gp = tl.zeros([BLOCK], dtype=tl.float64)
    acc_pp = tl.zeros([BLOCK], dtype=tl.float64)
    # first pass, read only: the three dot products of the row
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        u = tl.load(u_ptr + row_start + offsets, mask=mask, other=0.0).to(g_prev_ptr.dtype.element_ty)
        v = tl.load(v_ptr + row_start + offsets, mask=mask, other=0.0).to(g_prev_ptr.dtype.element_ty)
        g64 = (u * p + v * q).to(tl.float64)
        g_prev64 = tl.load(g_prev_ptr + row_start + offsets, mask=mask, other=0.0).to(tl.float64)
        acc_gg += g64 * g64
        acc_gp += g64 * g_prev64
        acc_pp += g_prev64 * g_prev64
    a_minus_1, b = _coefficients(
        tl.sum(acc_gg, axis=0),
        tl.sum(acc_gp, axis=0),
        tl.sum(acc_pp, axis=0),
        tl.load(parameter_ptr),
        tl.load(parameter_ptr + 1),
    )
    # second pass: every element is read and written by the same thread within one iteration, so out may be u
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        u = tl.load(u_ptr + row_start + offsets, mask=mask).to(g_prev_ptr.dtype.element_ty)
        v = tl.load(v_ptr + row_start + offsets, mask=mask).to(g_prev_ptr.dtype.element_ty)
        g_prev = tl.load(g_prev_ptr + row_start + offsets, mask=mask)
        base = tl.load(base_ptr + row_start + offsets, mask=mask).to(g_prev_ptr.dtype.element_ty)
        g = u * p + v * q
        if STORE_G:
            tl.store(g_ptr + row_start + offsets, g, mask=mask)
        out = base + weight * (a_minus_1.to(g.dtype) * g + b.to(g.dtype) * (g_prev - g))
        tl.store(out_ptr + row_start + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gram_kernel(
    u_ptr,
    v_ptr,
    g_prev_ptr,
    g_ptr,
    partial_ptr,
    p,
    q,
    n,
    num_partials,
    BLOCK: tl.constexpr,
    STORE_G: tl.constexpr,
):
    part = tl.program_id(0)
    row = tl.program_id(1)
    row_start = row.to(tl.int64) * n
    acc_gg = tl.zeros([BLOCK], dtype=tl.float64)
    acc_gp = tl.zeros([BLOCK], dtype=tl.float64)
    acc_pp = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(part * BLOCK, n, num_partials * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        # u and v may be half precision (a pipeline's sample); g is formed in the directions' dtype
        u = tl.load(u_ptr + row_start + offsets, mask=mask, other=0.0).to(g_prev_ptr.dtype.element_ty)
        v = tl.load(v_ptr + row_start + offsets, mask=mask, other=0.0).to(g_prev_ptr.dtype.element_ty)
        g_prev = tl.load(g_prev_ptr + row_start + offsets, mask=mask, other=0.0)
        g = u * p + v * q
        if STORE_G:
            tl.store(g_ptr + row_start + offsets, g, mask=mask)
        g64 = g.to(tl.float64)
        g_prev64 = g_prev.to(tl.float64)
        acc_gg += g64 * g64
        acc_gp += g64 * g_prev64
        acc_pp += g_prev64 * g_prev64
    out = partial_ptr + (row * num_partials + part) * 3
    tl.store(out, tl.sum(acc_gg, axis=0))
    tl.store(out + 1, tl.sum(acc_gp, axis=0))
    tl.store(out + 2, tl.sum(acc_pp, axis=0))


@triton.jit
def _update_kernel(
    base_ptr,
    g_ptr,
    g_prev_ptr,
    out_ptr,
    partial_ptr,
    parameter_ptr,
    weight,
    n,
    num_partials,
    BLOCK: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    block = tl.program_id(0)
    row = tl.program_id(1)
    k = tl.arange(0, PARTIALS)
    in_row = k < num_partials
    partials = partial_ptr + (row * num_partials + k) * 3
    gg = tl.sum(tl.load(partials, mask=in_row, other=0.0), axis=0)
    gp = tl.sum(tl.load(partials + 1, mask=in_row, other=0.0), axis=0)
    pp = tl.sum(tl.load(partials + 2, mask=in_row, other=0.0), axis=0)
    a_minus_1, b = _coefficients(gg, gp, pp, tl.load(parameter_ptr), tl.load(parameter_ptr + 1))
    row_start = row.to(tl.int64) * n
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    g = tl.load(g_ptr + row_start + offsets, mask=mask)
    g_prev = tl.load(g_prev_ptr + row_start + offsets, mask=mask)
    base = tl.load(base_ptr + row_start + offsets, mask=mask)
    # the coefficients in the data's dtype, as the eager path applies them
    out = base + weight * (a_minus_1.to(g.dtype) * g + b.to(g.dtype) * (g_prev - g))
    tl.store(out_ptr + row_start + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


class FusedCorrection:
    """Reused work buffers for the fused correction of one latent shape, dtype and device."""

    def __init__(self, like: torch.Tensor, lm_lambda: float, lm_kappa: float) -> None:
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.batch = like.shape[0]
        self.n = like.numel() // self.batch
        self.single_launch = self.n <= _ROW_MAX  # one program per row; else partial sums over the whole GPU
        self.num_partials = min(triton.cdiv(self.n, _BLOCK), _MAX_PARTIALS)
        self.partials = None
        if not self.single_launch:
            self.partials = torch.empty((self.batch, self.num_partials, 3), dtype=torch.float64, device=like.device)
        # float64 on the device: Triton would pass Python floats as float32
        self.parameters = torch.tensor([lm_lambda, lm_kappa], dtype=torch.float64).to(like.device)
        self.lm_parameters = (lm_lambda, lm_kappa)

    def matches(self, like: torch.Tensor, lm_lambda: float, lm_kappa: float) -> bool:
        return (
            like.shape == self.shape
            and like.dtype == self.dtype
            and like.device == self.device
            and (lm_lambda, lm_kappa) == self.lm_parameters
        )

    def __call__(
        self,
        u: torch.Tensor,
        v: torch.Tensor | None,
        p: float,
        q: float,
        g_prev: torch.Tensor,
        base: torch.Tensor | None,
        out: torch.Tensor,
        weight: float,
        g_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out = base + weight * (LM(g) - g)`` with ``g = p * u + q * v`` (stored in ``g_out`` if given, else
        ``g`` must be ``u`` with ``p = 1``, ``v = None``); ``base=None`` means ``base = g``. All tensors contiguous
        and of this object's shape; ``g_prev``, ``base`` and ``g_out`` of its dtype, while ``u``, ``v`` and ``out``
        may be half precision (converted on load and store). ``out`` may be ``base``."""
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):  # Triton launches on the current device, not the tensors'
                return self(u, v, p, q, g_prev, base, out, weight, g_out)
        if g_out is None:
            if p != 1.0 or v is not None:
                raise ValueError("without g_out the direction is u itself: p must be 1 and v None")
            g = u
            v, q = u, 0.0
        else:
            g = g_out
        if self.single_launch:
            _row_kernel[(self.batch,)](
                u,
                v,
                g_prev,
                g,
                u if base is None else base,  # base = None only with g = u
                out,
                self.parameters,
                p,
                q,
                weight,
                self.n,
                BLOCK=_ROW_BLOCK,
                STORE_G=g_out is not None,
                num_warps=8,
            )
            return out
        grid = (self.num_partials, self.batch)
        _gram_kernel[grid](
            u, v, g_prev, g, self.partials, p, q, self.n, self.num_partials, BLOCK=_BLOCK, STORE_G=g_out is not None
        )
        _update_kernel[(triton.cdiv(self.n, _BLOCK), self.batch)](
            g if base is None else base,
            g,
            g_prev,
            out,
            self.partials,
            self.parameters,
            weight,
            self.n,
            self.num_partials,
            BLOCK=_BLOCK,
            PARTIALS=triton.next_power_of_2(self.num_partials),
        )
        return out
