"""FID of the bundled SLAM and LCD students of the digits DDPM against the bench's ground truth of the teacher.

Same protocol, seeds and ground truth as ``diffsamplers bench`` (256 seeds from 0, 200-step DPM-Solver++(2M) of the
teacher, x0 clipping off, the digit classifier's features): the students replace the teacher's UNet, every other
sampler runs the teacher. Fresh re-noising draws from the global generator, seeded once per entry here.

    python benchmarks/slam_distill.py --threads 1 --out bench-slam
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from diffsamplers.eval.bench import _bench_config, _features, digits_bench_model, ground_truth, sample_with
from diffsamplers.eval.fid import fid_from_stats
from diffsamplers.eval.samplers import digits_distilled_specs
from diffsamplers.eval.testbed import diffusers_baselines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--out", default="bench-slam")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, features = digits_bench_model()
    seeds = list(range(args.num_samples))
    gt = ground_truth(model, seeds, os.path.join(args.out, "ground_truth"))
    gt_stats = _features(model.decode(gt), features, "cpu")
    config = _bench_config(model.scheduler_config)
    baselines = diffusers_baselines()
    rows = []
    entries = [(name, baselines[name], n) for name in ("ddim", "dpmpp2m") for n in (2, 4, 10)]
    entries += [(name, spec, n) for name, spec in digits_distilled_specs().items() for n in (1, 2, 4)]
    for name, spec, steps in entries:
        student = getattr(spec, "denoiser", None)
        run_model = dataclasses.replace(model, denoiser=student("cpu")) if student else model
        torch.manual_seed(0)
        latents, calls = sample_with(run_model, spec.build(config), seeds, steps)
        fid = fid_from_stats(_features(model.decode(latents), features, "cpu"), gt_stats)
        rmse = float((latents - gt).pow(2).flatten(1).mean(1).sqrt().mean())
        rows.append(dict(sampler=name, steps=steps, nfe=calls, fid_vs_gt=round(fid, 3), rmse_vs_gt=round(rmse, 4)))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "slam_results.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
