# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The GPU check: one short script (under 5 minutes on one H100/H200) whose figures go into benchmarks/RESULTS.md.

1. FID tooling (benchmarks/fid_speed.py): Inception feature throughput of our extractor against a bare forward of
   the same network (ratio; target >= 0.8) and the Frechet distance at d=2048 against scipy's sqrtm (target >= 20x).
2. Scheduler step overhead (benchmarks/step_overhead.py): one ``step()`` of each diffsamplers scheduler against
   diffusers' DPMSolverMultistep on SD-sized latents, float16 and float32 (target <= 1.5x).
3. The fused Triton LML correction against the eager one on CUDA (full runs on three bases), and no host-device
   sync in a fused run.
4. ``diffsamplers bench`` on the bundled digits model on the GPU.

    python benchmarks/gpu_check.py --out DIR [--inception PATH] [--bench-samples N]

Everything is written to DIR/gpu_check.json (and the bench's FID plot to DIR/bench_fid_vs_nfe.png) and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check-out")
    parser.add_argument("--inception", default=None, help="TorchScript Inception file (else the offline lookup)")
    parser.add_argument("--bench-samples", type=int, default=2000)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fid,step,lml,bench")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    print(f"GPU check on {result['device']} (torch {result['torch']})", flush=True)

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2)

    if "fid" not in skip:
        import fid_speed

        start = time.perf_counter()
        result["fid_speed"] = fid_speed.run("cuda", 4096, 256, inception_path=args.inception)
        print(fid_speed.format_table(result["fid_speed"]), f"({time.perf_counter() - start:.0f} s)", flush=True)
        save()
    if "step" not in skip:
        import step_overhead

        start = time.perf_counter()
        result["step_overhead"] = {}
        for dtype in ("float16", "float32"):
            rows = step_overhead.run("cuda", dtype, repeats=10)  # launch-bound steps: noisy, so more repeats
            result["step_overhead"][dtype] = rows
            print(f"step() vs DPMSolverMultistep, cuda {dtype}")
            for r in rows:
                ratio = r["ratio_vs_dpmsolver"]
                print(f"  {r['shape']:>14}  {r['scheduler']:<26} {r['ms_per_step']:8.3f} ms  {ratio:5.2f}x")
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        save()
    if "lml" not in skip:
        start = time.perf_counter()
        result["lml_fused"] = lml_fused_check()
        for r in result["lml_fused"]:
            print(
                f"  LML fused vs eager, {r['base']} ({r['placement']}, {r['dtype']}, {r['shape']}): "
                f"relative difference {r['relative_difference']:.2e}, fused={r['fused']}, "
                f"syncs in the steps: {r['syncs']} (base alone: {r['syncs_base_alone']})"
            )
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        save()
    if "bench" not in skip:
        from diffsamplers.eval.cli import main as cli

        start = time.perf_counter()
        out = tempfile.mkdtemp(prefix="bench-")  # the ground-truth shards and grids stay behind
        cli(["bench", "--device", "cuda", "--num-samples", str(args.bench_samples), "--out", out])
        with open(os.path.join(out, "results.json")) as f:
            result["bench"] = json.load(f)
        shutil.copy(os.path.join(out, "fid_vs_nfe.png"), os.path.join(args.out, "bench_fid_vs_nfe.png"))
        result["bench_seconds"] = time.perf_counter() - start
        print(f"({result['bench_seconds']:.0f} s)", flush=True)
        save()


def lml_fused_check(steps: int = 20, shape: tuple = (2, 4, 64, 64)) -> list[dict]:
    """Whole LML runs with the fused Triton correction and with the eager one, from the same start and model
    outputs, on each base solver's placement; then the steps of a fused run, and of the plain base solver, under
    ``set_sync_debug_mode("error")`` (after ``set_timesteps`` and ``set_begin_index(0)``, which pipelines call
    outside the loop)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from diffsamplers import LMLScheduler

    def run(scheduler, dtype: torch.dtype, debug: bool = False, shape: tuple = shape) -> torch.Tensor | str:
        scheduler.set_timesteps(steps, device="cuda")
        if hasattr(scheduler, "set_begin_index"):  # DDIMScheduler has none
            scheduler.set_begin_index(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to("cuda", dtype)
        noise = [torch.randn(shape, generator=g).to("cuda", dtype) for _ in range(steps)]
        timesteps = list(scheduler.timesteps)
        torch.cuda.synchronize()
        if debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t, n in zip(timesteps, noise):
                x = scheduler.step(0.6 * x + 0.3 * n, t, x).prev_sample
        except RuntimeError as error:
            if not debug:
                raise
            return str(error).splitlines()[0][:100]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "none" if debug else x.float()

    rows = []
    cases = [
        (base, dtype, shape)
        for base in (DPMSolverMultistepScheduler(), DDIMScheduler(), FlowMatchEulerDiscreteScheduler(shift=3.0))
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ]
    # rows longer than _lml_triton._ROW_MAX take the two-launch kernels
    cases.append((DPMSolverMultistepScheduler(), torch.float32, (2, 16, 128, 128)))
    for base, dtype, shape in cases:
        scheduler = LMLScheduler.from_config(
            base.config, base_scheduler=type(base).__name__, lm_lambda=10.0, lm_kappa=0.5
        )
        scheduler.fused_kernels = False
        eager = run(scheduler, dtype, shape=shape)
        scheduler.fused_kernels = True
        fused = run(scheduler, dtype, shape=shape)
        rows.append(
            dict(
                base=type(base).__name__,
                placement=scheduler.lm_placement,
                dtype=str(dtype).split(".")[-1],
                shape="x".join(map(str, shape)),
                fused=scheduler._fused is not None,
                relative_difference=float((fused - eager).abs().max() / eager.abs().max()),
                syncs=run(scheduler, dtype, debug=True, shape=shape),
                syncs_base_alone=run(type(base).from_config(base.config), dtype, debug=True, shape=shape),
            )
        )
    return rows


if __name__ == "__main__":
    main()
