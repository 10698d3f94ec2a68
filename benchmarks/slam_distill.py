"""The SLAM acceptance figures: FID of the bundled SLAM and LCD students of the digits DDPM against the bench's
ground truth of the teacher, beside the teacher's DDIM and DPM-Solver++(2M).

The same protocol, seeds and ground truth as ``diffsamplers bench`` (256 seeds from 0, the teacher's 200-step
DPM-Solver++(2M), x0 clipping off, the digit classifier's features); it is the bench run

    diffsamplers bench --samplers ddim,dpmpp2m,slam,slam-det,lcd,lcd-det --nfe 1,2,4,10

followed by the two comparisons of the issue: each 2-step student against DDIM and DPM-Solver++(2M) at 2 steps,
each 4-step student against DPM-Solver++(2M) at 10 steps. ``--students DIR ...`` benches other student folders
(``diffsamplers distill --out DIR``) instead of the bundled ones, e.g. the checkpoints of a training curve.

    python benchmarks/slam_distill.py --threads 1 --out bench-slam
"""

from __future__ import annotations

import argparse
import os

import torch

from diffsamplers.eval.bench import bench_model, digits_bench_model
from diffsamplers.eval.samplers import digits_distilled_specs, sampler_registry


def student_specs(folders: list[str]) -> dict:
    """Deterministic-re-noising bench entries for student folders, named by their folder."""
    specs = {}
    for folder in folders:
        spec = digits_distilled_specs(lcd_path=folder)["lcd-det"]  # the path decides the network, not the name
        spec.name = f"{os.path.basename(os.path.normpath(folder))}-det"
        specs[spec.name] = spec
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--out", default="bench-slam")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--students", nargs="*", default=None, metavar="DIR",
                        help="student folders to bench instead of the bundled SLAM and LCD students")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, features = digits_bench_model("cpu")
    baselines = sampler_registry()
    specs = {"ddim": baselines["ddim"], "dpmpp2m": baselines["dpmpp2m"]}
    specs.update(student_specs(args.students) if args.students else digits_distilled_specs())
    records = bench_model(model, specs, [1, 2, 4, 10], num_samples=args.num_samples, feature_net=features,
                          out_dir=args.out)
    fid = {(r["sampler"], r["budget"]): r["fid_vs_gt"] for r in records}
    print(f"{'sampler':<16}" + "".join(f"{f'FID @ {n}':>12}" for n in (1, 2, 4, 10)))
    for name in specs:
        print(f"{name:<16}" + "".join(f"{fid[(name, n)]:>12.4g}" for n in (1, 2, 4, 10)))
    students = [name for name in specs if name not in ("ddim", "dpmpp2m")]
    for name in students:
        two = fid[(name, 2)] < min(fid[("ddim", 2)], fid[("dpmpp2m", 2)])
        four = fid[(name, 4)] <= fid[("dpmpp2m", 10)]
        print(f"{name}: 2 steps {'beats' if two else 'does not beat'} DDIM and DPM-Solver++ at 2 "
              f"({fid[(name, 2)]:.4g} vs {min(fid[('ddim', 2)], fid[('dpmpp2m', 2)]):.4g}); 4 steps "
              f"{'at or below' if four else 'above'} DPM-Solver++ at 10 ({fid[(name, 4)]:.4g} vs "
              f"{fid[('dpmpp2m', 10)]:.4g})")


if __name__ == "__main__":
    main()
