"""The fused Triton LML correction against the eager one, run by Triton's interpreter on the CPU.

The kernels target CUDA; ``TRITON_INTERPRET=1`` executes the same kernel code with NumPy, which checks the indexing,
masking, partial sums and coefficient algebra here. Triton reads that variable when the kernels are defined, so the
checks run in a fresh interpreter. On a GPU, ``benchmarks/gpu_check.py`` repeats the comparison with real kernels.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from diffsamplers import LMLScheduler
    from diffsamplers.samplers import lm_correct
    from diffsamplers.samplers import _lml_triton

    torch.set_num_threads(1)
    _lml_triton._MAX_PARTIALS = 4  # rows of 10000 then need 10 blocks: programs loop and partials are summed

    def close(a, b, name, rel=2e-6):
        err = float((a - b).abs().max())
        scale = float(b.abs().max()) or 1.0
        assert err <= rel * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"

    gen = torch.Generator().manual_seed(0)
    # both layouts: one program per row (rows up to _ROW_MAX elements), and the two-launch partial sums
    for row_max, shape in [(1 << 17, (3, 10000)), (1 << 17, (2, 4, 8, 8)), (0, (3, 10000)), (0, (2, 4, 8, 8))]:
        _lml_triton._ROW_MAX = row_max
        g, g_prev, x = (torch.randn(shape, generator=gen) for _ in range(3))
        g[1] = 0.0  # LM(0) = 0, no division by zero
        for lam, kappa in [(10.0, 0.5), (0.1, 0.9), (1e3, 0.1)]:
            fused = _lml_triton.FusedCorrection(g, lam, kappa)
            assert fused.num_partials == 4 if shape == (3, 10000) else fused.num_partials == 1
            reference = lm_correct(g, g_prev, lam, kappa)
            close(fused(g, None, 1.0, 0.0, g_prev, None, torch.empty_like(g), 1.0), reference, "LM(g)")
            # increment form: g = prev - c x stored, out = prev + w (LM(g) - g) written over prev
            prev, c, w = g + 0.75 * x, 0.75, 0.6
            stored, out = torch.empty_like(g), prev.clone()
            fused(out, x, 1.0, -c, g_prev, out, out, w, g_out=stored)
            close(stored, prev - c * x, "stored g")
            close(out, prev + w * (lm_correct(prev - c * x, g_prev, lam, kappa) - (prev - c * x)), "increment")

    _lml_triton._ROW_MAX = 1 << 17
    LMLScheduler._fused_devices = ("cuda", "cpu")

    def run(scheduler, fused, steps=6, shape=(2, 4, 16, 16), dtype=torch.float32):
        scheduler.fused_kernels = fused
        scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen).to(dtype)
        for t in scheduler.timesteps:
            out = 0.6 * x + 0.3 * torch.randn(shape, generator=gen).to(dtype)
            x = scheduler.step(out, t, x).prev_sample
            assert x.dtype == dtype
        return x.float()

    for base in (DPMSolverMultistepScheduler(), DDIMScheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0)):
        scheduler = LMLScheduler.from_config(
            base.config, base_scheduler=type(base).__name__, lm_lambda=10.0, lm_kappa=0.5
        )
        fused, eager = run(scheduler, True), run(scheduler, False)
        assert scheduler._fused is not None, scheduler.lm_placement
        close(fused, eager, scheduler.lm_placement, rel=1e-5)
        assert not torch.equal(eager, run(LMLScheduler.from_config(base.config, base_scheduler=type(base).__name__),
                                          False)), "the correction must change the run"
    # a half-precision pipeline: the increment kernels read the float16 sample and write the float16 result
    scheduler = LMLScheduler.from_config(DPMSolverMultistepScheduler().config, lm_lambda=10.0, lm_kappa=0.5)
    # (bfloat16 only on the GPU: the interpreter's bfloat16 stores truncate instead of rounding to nearest)
    close(run(scheduler, True, dtype=torch.float16), run(scheduler, False, dtype=torch.float16), "fp16", rel=2e-3)

    # a kernel that fails (as a variant that cannot compile on a machine would): the eager correction takes over
    import warnings

    eager = run(scheduler, False)
    _lml_triton.FusedCorrection.__call__ = lambda self, *args, **kwargs: (_ for _ in ()).throw(RuntimeError("cc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = run(scheduler, True)
    assert torch.equal(fallback, eager), "the fallback must be the eager step"
    assert any("eager correction" in str(w.message) for w in caught) and scheduler._fused is None
    print("ok")
    """
)


def test_fused_correction_matches_eager_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")
