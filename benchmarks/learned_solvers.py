"""The learned-solver acceptance figures: every fitted solver (OLSS, Bespoke, BNS, learned DPM-Solver++ / DDIM grids)
beside diffusers' DDIM, UniPC and DPM-Solver++(2M), on the exact testbed and on the bundled digits DDPM.

1. Exact testbed (the digits Gaussian mixture, 64 held-out noises from seed 0): RMSE against the exact ODE solution
   at NFE 5, 8 and 10, and the ratio of the best fitted solver to DPM-Solver++(2M) at 10 (target <= 0.5).
2. Bundled digits DDPM (the bench's 256 seeds, ground truth and digit-classifier features): FID against the ground
   truth of every fitted solver at NFE 5, beside the baselines at 5 and 10 (target: a fitted solver at 5 at or below
   DPM-Solver++(2M) at 10), with each fit's cost.

Fits use the bench's settings (128 training and 64 validation seeds disjoint from the bench's, references
DPM-Solver++(2M) at 200 steps; exact on the testbed) and are cached under ``$DIFFSAMPLERS_CACHE/fits``, so a second
run only samples; delete that folder to re-measure fit times. Equivalent to

    diffsamplers bench --model testbed --samplers ddim,unipc,dpmpp2m,olss,bespoke,bns,dpmpp2m-learned --nfe 5,8,10
    diffsamplers bench --samplers olss,bespoke,bns,dpmpp2m-learned --nfe 5

    python benchmarks/learned_solvers.py --threads 2 --out bench-learned
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from diffsamplers.eval.bench import bench_model, digits_bench_model
from diffsamplers.eval.samplers import bench_registry
from diffsamplers.eval.testbed import exact_testbed_errors

BASELINES = ("ddim", "unipc", "dpmpp2m")
FITTED = ("olss", "bespoke", "bns", "dpmpp2m-learned", "ddim-learned")


def _table(records: list[dict], metric: str, names: list[str], budgets: list[int]) -> str:
    value = {(r["sampler"], r["budget"]): r for r in records}
    head = "| solver | " + " | ".join(f"NFE {n}" for n in budgets) + " | fit s |"
    lines = [head, "|" + "---|" * (len(budgets) + 2)]
    for name in names:
        cells = [f"{value[(name, n)][metric]:.4g}" if (name, n) in value else "-" for n in budgets]
        fits = [value[(name, n)].get("fit_seconds") for n in budgets if (name, n) in value]
        fit = " / ".join(f"{s:.0f}" for s in fits if s is not None) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-learned")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=256, help="bench seeds on the digits DDPM")
    parser.add_argument("--skip-digits", action="store_true", help="the testbed part only")
    parser.add_argument("--fitted", default=",".join(FITTED), help="fitted solvers to bench (comma separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fitted = [name for name in args.fitted.split(",") if name]

    start = time.perf_counter()
    registry = bench_registry("testbed")
    names = list(BASELINES) + fitted
    records = exact_testbed_errors({n: registry[n] for n in names}, [5, 8, 10], num_samples=64, progress=True)
    print("\nExact testbed: RMSE vs the exact solution (64 held-out noises)\n")
    print(_table(records, "rmse_vs_gt", names, [5, 8, 10]))
    rmse = {(r["sampler"], r["budget"]): r["rmse_vs_gt"] for r in records}
    best = min(fitted, key=lambda n: rmse[(n, 10)])
    ratio = rmse[(best, 10)] / rmse[("dpmpp2m", 10)]
    print(f"\nbest fitted at NFE 10: {best}, {ratio:.3g}x DPM-Solver++(2M) (target <= 0.5: "
          f"{'met' if ratio <= 0.5 else 'missed'}); {time.perf_counter() - start:.0f} s")
    if args.skip_digits:
        return

    start = time.perf_counter()
    model, features = digits_bench_model("cpu")
    registry = bench_registry("digits")
    out = os.path.join(args.out, "digits")
    base_records = bench_model(model, {n: registry[n] for n in BASELINES}, [5, 10], num_samples=args.num_samples,
                               feature_net=features, out_dir=os.path.join(out, "baselines"))
    fit_records = bench_model(model, {n: registry[n] for n in fitted}, [5], num_samples=args.num_samples,
                              feature_net=features, out_dir=os.path.join(out, "fitted"))
    records = base_records + fit_records
    print(f"\nBundled digits DDPM: FID vs ground truth ({args.num_samples} seeds)\n")
    print(_table(records, "fid_vs_gt", list(BASELINES) + fitted, [5, 10]))
    fid = {(r["sampler"], r["budget"]): r["fid_vs_gt"] for r in records}
    best = min(fitted, key=lambda n: fid[(n, 5)])
    target = fid[("dpmpp2m", 10)]
    print(f"\nbest fitted at NFE 5: {best} FID {fid[(best, 5)]:.4g} vs DPM-Solver++(2M) at NFE 10 {target:.4g}: "
          f"{'met' if fid[(best, 5)] <= target else 'missed'}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
