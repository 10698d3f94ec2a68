# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The GPU check: one short script (under 5 minutes on one H100/H200) whose figures go into benchmarks/RESULTS.md.

1. FID tooling (benchmarks/fid_speed.py): Inception feature throughput of our extractor against a bare forward of
   the same network (ratio; target >= 0.8) and the Frechet distance at d=2048 against scipy's sqrtm (target >= 20x).
2. Scheduler step overhead (benchmarks/step_overhead.py): one ``step()`` of each diffsamplers scheduler against
   diffusers' DPMSolverMultistep on SD-sized latents, float16 and float32 (target <= 1.5x).
3. ``diffsamplers bench`` on the bundled digits model on the GPU.

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
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fid,step,bench")
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
            rows = step_overhead.run("cuda", dtype, repeats=5)
            result["step_overhead"][dtype] = rows
            print(f"step() vs DPMSolverMultistep, cuda {dtype}")
            for r in rows:
                ratio = r["ratio_vs_dpmsolver"]
                print(f"  {r['shape']:>14}  {r['scheduler']:<26} {r['ms_per_step']:8.3f} ms  {ratio:5.2f}x")
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


if __name__ == "__main__":
    main()
