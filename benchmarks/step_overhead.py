# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Time of one ``step()`` of each diffsamplers scheduler against diffusers' DPMSolverMultistep on the same latent.

Prints ratios measured in one run (target: <= 1.5x the DPMSolverMultistep step). Every scheduler walks a full
50-step run with a fixed model output, so multistep history and per-step bookkeeping are included; the median
over repeats of the mean per-step time is reported.

    python benchmarks/step_overhead.py [--device cpu|cuda] [--dtype float32|float16] [--repeats 5] [--threads N]
        [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch
from diffusers import DPMSolverMultistepScheduler

SD_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1, timestep_spacing="leading",
)


def candidates() -> dict[str, Callable[[dict], Any]]:
    """The schedulers to time, by name (DPMSolverMultistep first: the yardstick)."""
    from diffsamplers import BDIAEDMScheduler, BDIAScheduler, DualFastScheduler, LMLScheduler

    return {
        "dpmsolver++2M (diffusers)": lambda c: DPMSolverMultistepScheduler.from_config(c),
        "BDIA": lambda c: BDIAScheduler.from_config(c, gamma=0.5),
        # EDM models have EDM configs: the default one (EDMEulerScheduler's) on the same latent
        "BDIA-EDM (Euler)": lambda c: BDIAEDMScheduler(gamma=0.5),
        "BDIA-EDM (Heun)": lambda c: BDIAEDMScheduler(gamma=0.5, solver="heun"),  # per call, 2 calls per level
        "DualFast (DPM++2M)": lambda c: DualFastScheduler.from_config(c),
        "LML (DPM++2M, kappa 0.5)": lambda c: LMLScheduler.from_config(c, lm_lambda=10.0, lm_kappa=0.5),
        # the same without the fused Triton correction (they differ on CUDA only)
        "LML eager": lambda c: _eager(LMLScheduler.from_config(c, lm_lambda=10.0, lm_kappa=0.5)),
    }


def _eager(scheduler: Any) -> Any:
    scheduler.fused_kernels = False
    return scheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "cpu" counts this process's CPU time only: with --threads 1 on a machine shared with other jobs it is not inflated
# by the time slices the process waits for (wall time is what matters on an accelerator)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_run(build: Callable[[dict], Any], sample0: torch.Tensor, output: torch.Tensor, device: torch.device,
             steps: int = 50, clock: str = "wall") -> float:
    """Mean seconds per ``step()`` call over one full run of a freshly built scheduler (``steps`` levels; a Heun
    scheduler makes about two calls per level)."""
    now = CLOCKS[clock]
    scheduler = build(SD_CONFIG)
    scheduler.set_timesteps(steps, device=device)
    sample = sample0
    _sync(device)
    start = now()
    for t in scheduler.timesteps:
        sample = scheduler.step(output, t, sample).prev_sample
    _sync(device)
    return (now() - start) / len(scheduler.timesteps)


def time_steps(builds: dict[str, Callable[[dict], Any]], shape: tuple, device: torch.device, dtype: torch.dtype,
               steps: int = 50, repeats: int = 5, clock: str = "wall") -> dict[str, float]:
    """Median over ``repeats`` runs of the mean seconds per ``step()`` call, per scheduler.

    The schedulers take turns within each repeat, so a burst of load from other processes on a shared machine
    lands on all of them alike instead of on whichever one happens to be timed at that moment.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    sample0 = torch.randn(shape, generator=g).to(device, dtype)
    output = torch.randn(shape, generator=g).to(device, dtype)
    times: dict[str, list[float]] = {name: [] for name in builds}
    for rep in range(repeats + 1):  # the first round warms up caches and kernels
        for name, build in builds.items():
            seconds = time_run(build, sample0, output, device, steps, clock)
            if rep:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def run(device: str = "cpu", dtype: str = "float32", repeats: int = 5,
        shapes: tuple = ((2, 4, 64, 64), (8, 4, 64, 64), (2, 4, 128, 128), (8, 4, 128, 128)),
        clock: str = "wall") -> list[dict]:
    dev, dt = torch.device(device), getattr(torch, dtype)
    rows = []
    for shape in shapes:
        timings = time_steps(candidates(), shape, dev, dt, repeats=repeats, clock=clock)
        base = timings["dpmsolver++2M (diffusers)"]
        for name, seconds in timings.items():
            rows.append(dict(shape="x".join(map(str, shape)), scheduler=name, ms_per_step=seconds * 1e3,
                             ratio_vs_dpmsolver=seconds / base))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall time, or this process's CPU time (steadier with --threads 1 on a shared machine)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.dtype, args.repeats, clock=args.clock)
    print(f"step() time vs diffusers DPMSolverMultistep, device={args.device}, dtype={args.dtype}, "
          f"threads={torch.get_num_threads()}, clock={args.clock}")
    print(f"{'latent':>14}  {'scheduler':<26} {'ms/step':>9} {'ratio':>7}")
    for r in rows:
        flag = "" if r["ratio_vs_dpmsolver"] <= 1.5 else "  (> 1.5x target)"
        print(f"{r['shape']:>14}  {r['scheduler']:<26} {r['ms_per_step']:9.3f} {r['ratio_vs_dpmsolver']:7.2f}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
