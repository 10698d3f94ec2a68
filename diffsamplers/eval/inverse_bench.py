# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""The inverse-problem bench: DPS, PSLD and STSL on held-out digits through the bundled latent model.

Protocol (:func:`run_inverse_bench`): the held-out digits of :func:`~diffsamplers.models.digits.digits_split`
(never seen in training), the first ``num_validation`` for tuning and the next ``num_test`` for the reported
figures; three tasks at measurement noise ``sigma_y = 0.05`` in [-1, 1] (:data:`TASKS`: an 8x8 centred box hidden,
x4 super-resolution by average pooling, a 7x7 Gaussian blur of width 1.5); the unconditional model (DiT null class)
of :func:`~diffsamplers.models.digits_latent.load_digits_latent_pipeline`.

Budgets are **model calls per image**: DPS and PSLD make one call per step, STSL (one forward-difference Hutchinson
probe) two, so STSL at a budget of ``B`` calls runs ``B // 2`` steps. Each method's weights are tuned for each task
and budget on the validation images only, by mean PSNR, over :data:`WEIGHT_GRID` (``c``: DPS ``scale`` and PSLD /
STSL ``omega`` are ``c * 50 / steps``, so the total pull is the same at every step count; PSLD's gluing weight is
``gamma = 0.1 omega``) and for STSL also :data:`RHO_GRID` (its second-order weight). Every image has its own start
noise (seed ``1000 +`` its index), shared by all methods, and the measurement noise is fixed per split.

Scores per image, averaged over the test images: PSNR and SSIM against the true image (in [0, 1]; the VAE's own
round trip is the ceiling), the measurement residual ``||A x_hat - y|| / sqrt(m)`` (``sigma_y`` for a sample that
fits as well as the truth), model calls and seconds per image. :func:`claim_table` answers the STSL paper's claim
(PSLD's PSNR with 4x fewer model calls) with paired differences and their standard errors.

This module imports only the standard library at the top.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

NOISE_SIGMA = 0.05
# task name -> (operator builder, description)
TASKS: dict[str, tuple[Callable[[], Any], str]] = {}
METHODS = ("dps", "psld", "stsl")
BUDGETS = (24, 50, 100, 200)  # model calls per image
WEIGHT_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
RHO_GRID = (1e-3, 1e-2, 3e-2)
GAMMA_RATIO = 0.1
NUM_VALIDATION = 8
NUM_TEST = 32
START_SEED = 1000
MATCH_MARGIN_DB = 0.5  # "matches PSLD's PSNR": within this, at ~95% confidence


def _box() -> Any:
    from ..pipelines.operators import BoxInpainting

    return BoxInpainting(16, 8, noise_sigma=NOISE_SIGMA)


def _sr4() -> Any:
    from ..pipelines.operators import SuperResolution

    return SuperResolution(4, noise_sigma=NOISE_SIGMA)


def _blur() -> Any:
    from ..pipelines.operators import GaussianBlur

    return GaussianBlur(7, 1.5, noise_sigma=NOISE_SIGMA)


TASKS.update({
    "box": (_box, "box inpainting, centred 8x8 of 16x16 hidden"),
    "sr4": (_sr4, "super-resolution x4 (average pooling, 4x4 measured)"),
    "blur": (_blur, "Gaussian blur, 7x7 kernel, width 1.5 px"),
})


def steps_for(method: str, calls: int) -> int:
    """Reverse steps that ``method`` runs within ``calls`` model calls per image (STSL: 2 calls a step)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    steps = calls // 2 if method == "stsl" else calls
    if steps < 1:
        raise ValueError(f"calls={calls} is too few for {method}")
    return steps


def split_images(num_validation: int = NUM_VALIDATION, num_test: int = NUM_TEST) -> tuple[Any, Any]:
    """``(validation, test)`` held-out digits, 16x16 in [-1, 1], disjoint."""
    from .invert_bench import heldout_digits

    images, _ = heldout_digits(num_validation + num_test)
    return images[:num_validation], images[num_validation:]


def _generators(first: int, count: int) -> list[Any]:
    import torch

    return [torch.Generator().manual_seed(START_SEED + first + i) for i in range(count)]


def solve(solver: Any, method: str, operator: Any, measurement: Any, calls: int, weight: float,
          rho: float = 0.0, first_index: int = 0) -> Any:
    """One method at a budget of ``calls`` per image with weight scale ``c = weight`` (see the module docstring);
    returns the :class:`~diffsamplers.pipelines.inverse_problems.InverseProblemOutput`."""
    steps = steps_for(method, calls)
    w = weight * 50.0 / steps
    gens = _generators(first_index, measurement.shape[0])
    if method == "dps":
        return solver.dps(operator, measurement, num_inference_steps=steps, scale=w, generator=gens)
    if method == "psld":
        return solver.psld(operator, measurement, num_inference_steps=steps, omega=w, gamma=GAMMA_RATIO * w,
                           generator=gens)
    return solver.stsl(operator, measurement, num_inference_steps=steps, omega=w, gamma=GAMMA_RATIO * w, rho=rho,
                       generator=gens)


def score(images: Any, truth: Any, operator: Any, measurement: Any) -> dict[str, Any]:
    """Per-image ``psnr_db``, ``ssim`` and ``residual`` (``||A x - y|| / sqrt(m)``) as lists."""
    from .invert_bench import _to_unit
    from .metrics import psnr, ssim

    pred, target = _to_unit(images), _to_unit(truth)
    res = (operator(images.float()) - measurement.float()).flatten(1)
    mask = getattr(operator, "mask", None)  # inpainting: only the observed pixels are measured
    measured = res.shape[1] if mask is None else float(mask.expand(images.shape[1:]).sum())
    return {
        "psnr_db": psnr(pred, target).tolist(),
        "ssim": ssim(pred, target).tolist(),
        "residual": (res.norm(dim=1) / math.sqrt(measured)).tolist(),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _configs(method: str, weights: tuple[float, ...], rhos: tuple[float, ...]) -> list[tuple[float, float]]:
    return [(c, r) for c in weights for r in (rhos if method == "stsl" else (0.0,))]


def run_inverse_bench(
    tasks: tuple[str, ...] = tuple(TASKS),
    methods: tuple[str, ...] = METHODS,
    budgets: tuple[int, ...] = BUDGETS,
    weights: tuple[float, ...] = WEIGHT_GRID,
    rhos: tuple[float, ...] = RHO_GRID,
    num_validation: int = NUM_VALIDATION,
    num_test: int = NUM_TEST,
    pipe: Any = None,
    checkpoint: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One record per (task, method, budget): the tuned weights, the validation PSNR of every setting tried, and
    the test scores (means plus the per-image lists). With ``checkpoint`` (a JSON path) finished records are saved
    as they come and skipped on a rerun, so an interrupted run resumes."""
    import torch

    from ..models.digits_latent import load_digits_latent_pipeline
    from ..pipelines.inverse_problems import InverseProblemSolver
    from ..pipelines.inversion import decode_images, encode_images
    from .invert_bench import _to_unit
    from .metrics import psnr

    for name, values, allowed in (("tasks", tasks, TASKS), ("methods", methods, METHODS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise ValueError(f"{name}: unknown {unknown}; choose from {list(allowed)}")
    if not budgets or any(int(b) < 2 for b in budgets):
        raise ValueError(f"budgets must be model-call counts >= 2, got {budgets!r}")
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative and non-empty, got {weights!r}")
    if "stsl" in methods and (not rhos or any(not r > 0 for r in rhos)):
        # rho = 0 is PSLD without the probe call: it would run half the steps the budget allows
        raise ValueError(f"rhos must be positive and non-empty, got {rhos!r}")
    settings = {"weights": list(weights), "rhos": list(rhos), "num_validation": num_validation,
                "num_test": num_test, "gamma_ratio": GAMMA_RATIO, "noise_sigma": NOISE_SIGMA}
    pipe = pipe or load_digits_latent_pipeline()
    solver = InverseProblemSolver.from_pipeline(pipe, progress_bar=False)
    val_x, test_x = split_images(num_validation, num_test)
    with torch.no_grad():
        vae_psnr = float(psnr(_to_unit(decode_images(pipe, encode_images(pipe, test_x))), _to_unit(test_x)).mean())
    done: dict[tuple, dict[str, Any]] = {}
    if checkpoint and os.path.exists(checkpoint):
        with open(checkpoint) as f:
            saved = json.load(f)
        if saved.get("settings") != settings:
            raise ValueError(f"checkpoint {checkpoint!r} was made with other settings ({saved.get('settings')}, "
                             f"now {settings}): pass another path or delete it")
        for r in saved["records"]:
            done[(r["task"], r["method"], r["calls"])] = r
    records = []
    for task in tasks:
        operator = TASKS[task][0]()
        y_val = operator.measure(val_x, torch.Generator().manual_seed(1))
        y_test = operator.measure(test_x, torch.Generator().manual_seed(0))
        for calls in budgets:
            for method in methods:
                key = (task, method, int(calls))
                if key in done:
                    records.append(done[key])
                    continue
                start = time.perf_counter()
                tried = []
                for c, r in _configs(method, weights, rhos):
                    out = solve(solver, method, operator, y_val, calls, c, r)
                    tried.append({"weight": c, "rho": r, "psnr_db": round(_mean(score(out.images, val_x, operator,
                                                                                          y_val)["psnr_db"]), 3)})
                best = max(tried, key=lambda t: t["psnr_db"])
                tune_seconds = time.perf_counter() - start
                out = solve(solver, method, operator, y_test, calls, best["weight"], best["rho"],
                            first_index=num_validation)
                per_image = score(out.images, test_x, operator, y_test)
                steps = steps_for(method, calls)
                record = {
                    "task": task, "method": method, "calls": int(calls), "steps": steps,
                    "model_calls_per_image": out.nfe, "weight": best["weight"], "rho": best["rho"],
                    "omega_or_scale": best["weight"] * 50.0 / steps,
                    "psnr_db": round(_mean(per_image["psnr_db"]), 3),
                    "ssim": round(_mean(per_image["ssim"]), 4),
                    "residual": round(_mean(per_image["residual"]), 4),
                    "seconds_per_image": round(out.seconds / num_test, 4),
                    "validation": tried, "tune_seconds": round(tune_seconds, 1),
                    "per_image": per_image, "vae_psnr_db": round(vae_psnr, 3), "noise_sigma": NOISE_SIGMA,
                    "num_validation": num_validation, "num_test": num_test,
                }
                records.append(record)
                done[key] = record
                if checkpoint:
                    os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
                    tmp = checkpoint + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump({"settings": settings, "records": list(done.values())}, f)
                    os.replace(tmp, checkpoint)
                if progress is not None:
                    progress(record)
    return records


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Test-set means per task, method and budget."""
    lines = ["| task | method | calls / image | steps | weight c (rho) | PSNR dB | SSIM | residual | s / image |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (list(TASKS).index(r["task"]), r["calls"], METHODS.index(r["method"]))):
        rho = f" ({r['rho']:g})" if r["method"] == "stsl" else ""
        lines.append(f"| {r['task']} | {r['method']} | {r['model_calls_per_image']} | {r['steps']} | "
                     f"{r['weight']:g}{rho} | {r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['residual']:.3f} | "
                     f"{r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` and its standard error."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m = _mean(d)
    var = sum((v - m) ** 2 for v in d) / max(len(d) - 1, 1)
    return m, math.sqrt(var / len(d))


def claim_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """STSL at <= B/4 model calls against PSLD at B calls, per task, for each budget pair the records hold; also
    PSLD at the same small budget (does the second-order term buy anything over plain PSLD there?). ``matches``:
    STSL is within :data:`MATCH_MARGIN_DB` of PSLD's mean PSNR with about 95% confidence (difference - 2 standard
    errors >= -margin), so a noisy comparison is not read as a match."""
    index = {(r["task"], r["method"], r["model_calls_per_image"]): r for r in records}
    rows = []
    for (task, method, calls), psld in sorted(index.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        if method != "psld":
            continue
        small = [k for k in index if k[0] == task and k[1] == "stsl" and k[2] <= calls / 4]
        if not small:
            continue
        stsl = index[max(small, key=lambda k: k[2])]
        diff, se = _paired(stsl["per_image"]["psnr_db"], psld["per_image"]["psnr_db"])
        row = {"task": task, "psld_calls": calls, "psld_psnr_db": psld["psnr_db"],
               "stsl_calls": stsl["model_calls_per_image"], "stsl_psnr_db": stsl["psnr_db"],
               "difference_db": round(diff, 3), "standard_error_db": round(se, 3),
               "matches": diff - 2 * se >= -MATCH_MARGIN_DB}
        same = index.get((task, "psld", stsl["model_calls_per_image"]))
        if same is not None:
            gain, gain_se = _paired(stsl["per_image"]["psnr_db"], same["per_image"]["psnr_db"])
            row.update({"psld_at_stsl_calls_psnr_db": same["psnr_db"], "stsl_gain_at_equal_calls_db": round(gain, 3),
                        "stsl_gain_standard_error_db": round(gain_se, 3)})
        rows.append(row)
    return rows


def equal_steps_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """STSL against PSLD at (about) the same number of reverse steps, where STSL makes twice the calls: what the
    second-order term itself buys. Pairs each STSL record with the PSLD record of the nearest step count within
    10%."""
    rows = []
    for stsl in sorted(records, key=lambda r: (r["task"], r["steps"])):
        if stsl["method"] != "stsl":
            continue
        near = [r for r in records if r["task"] == stsl["task"] and r["method"] == "psld"
                and abs(r["steps"] - stsl["steps"]) <= 0.1 * stsl["steps"]]
        if not near:
            continue
        psld = min(near, key=lambda r: abs(r["steps"] - stsl["steps"]))
        gain, se = _paired(stsl["per_image"]["psnr_db"], psld["per_image"]["psnr_db"])
        rows.append({"task": stsl["task"], "stsl_steps": stsl["steps"], "psld_steps": psld["steps"],
                     "stsl_rho": stsl["rho"], "stsl_psnr_db": stsl["psnr_db"], "psld_psnr_db": psld["psnr_db"],
                     "gain_db": round(gain, 3), "standard_error_db": round(se, 3)})
    return rows


def trace_term_ablation(
    records: list[dict[str, Any]],
    task: str = "sr4",
    calls: int = 50,
    rhos: tuple[float, ...] = (1e-3, 1e-2, 3e-2, 1e-1),
    estimators: tuple[tuple[str, int], ...] = (("forward", 1), ("vjp", 4)),
    num_validation: int = NUM_VALIDATION,
    num_test: int = NUM_TEST,
    pipe: Any = None,
) -> list[dict[str, Any]]:
    """Is the second-order term limited by its estimator? STSL at PSLD's tuned weight for ``task`` at ``calls``
    steps, swept over ``rho``, with the one-probe forward difference (a model call per probe) and with ``probes``
    exact ``v^T J v`` products (``"vjp"``: no extra model calls, a double backward instead), on the test digits.
    The first row is PSLD itself (``rho = 0``); each row has the paired PSNR gain over it. The sweep is over the
    test digits, so its best row is optimistic (a selection on the test set): read it as a curve."""
    import torch

    from ..models.digits_latent import load_digits_latent_pipeline
    from ..pipelines.inverse_problems import InverseProblemSolver

    base = [r for r in records if (r["task"], r["method"], r["calls"]) == (task, "psld", calls)]
    if not base:
        raise ValueError(f"records hold no PSLD run for task={task!r} at calls={calls}")
    weight = base[0]["weight"] * 50.0 / base[0]["steps"]
    pipe = pipe or load_digits_latent_pipeline()
    solver = InverseProblemSolver.from_pipeline(pipe, progress_bar=False)
    _, test_x = split_images(num_validation, num_test)
    operator = TASKS[task][0]()
    y = operator.measure(test_x, torch.Generator().manual_seed(0))

    def run(rho: float, scheme: str = "forward", probes: int = 1) -> tuple[Any, list[float]]:
        out = solver.stsl(operator, y, num_inference_steps=calls, omega=weight, gamma=GAMMA_RATIO * weight, rho=rho,
                          probes=probes, scheme=scheme, generator=_generators(num_validation, num_test))
        return out, score(out.images, test_x, operator, y)["psnr_db"]

    def row(out: Any, per_image: list[float], estimator: str, probes: int, rho: float) -> dict[str, Any]:
        gain, se = _paired(per_image, reference)
        return {"task": task, "steps": calls, "estimator": estimator, "probes": probes, "rho": rho,
                "model_calls_per_image": out.nfe, "psnr_db": round(_mean(per_image), 3), "gain_db": round(gain, 3),
                "standard_error_db": round(se, 3), "seconds_per_image": round(out.seconds / num_test, 4)}

    base_out, reference = run(0.0)  # rho = 0: PSLD itself
    rows = [row(base_out, reference, "none (PSLD)", 0, 0.0)]
    for scheme, probes in estimators:
        for rho in rhos:
            if rho > 0:
                rows.append(row(*run(rho, scheme, probes), scheme, probes, rho))
    return rows


def _show_measurement(y: Any, shape: tuple[int, ...]) -> Any:
    """A picture of the measurement at image size (inpainting: hidden pixels grey; low resolution: enlarged)."""
    import torch.nn.functional as F

    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return F.interpolate(y, size=shape[-2:], mode="nearest")


def write_examples(out: str, settings: dict[str, dict[str, tuple[float, float]]] | None = None, calls: int = 100,
                   num_images: int = 4, pipe: Any = None) -> str:
    """A PNG: for each task, ``num_images`` test digits as rows and the columns truth, measurement, DPS, PSLD and
    STSL at ``calls`` model calls per image. ``settings[task][method] = (weight c, rho)`` (e.g. the tuned ones from
    :func:`run_inverse_bench`'s records); default ``c = 4``, ``rho = 0.01``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..models.digits_latent import load_digits_latent_pipeline
    from ..pipelines.inverse_problems import InverseProblemSolver

    pipe = pipe or load_digits_latent_pipeline()
    solver = InverseProblemSolver.from_pipeline(pipe, progress_bar=False)
    _, test_x = split_images(NUM_VALIDATION, num_images)
    columns = ["truth", "measurement", *[m.upper() for m in METHODS]]
    fig, axes = plt.subplots(len(TASKS) * num_images, len(columns),
                             figsize=(1.3 * len(columns), 1.3 * len(TASKS) * num_images), squeeze=False)
    for t, (task, (build, description)) in enumerate(TASKS.items()):
        operator = build()
        y = operator.measure(test_x, torch.Generator().manual_seed(0))
        panels = [test_x, _show_measurement(y, tuple(test_x.shape[1:]))]
        for method in METHODS:
            c, rho = (settings or {}).get(task, {}).get(method, (4.0, 0.01))
            panels.append(solve(solver, method, operator, y, calls, c, rho, first_index=NUM_VALIDATION).images)
        for i in range(num_images):
            for j, panel in enumerate(panels):
                ax = axes[t * num_images + i, j]
                ax.imshow(panel[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if t * num_images + i == 0:
                    ax.set_title(columns[j], fontsize=9)
                if j == 0 and i == 0:
                    ax.set_ylabel(task, fontsize=9)
    fig.suptitle(f"held-out digits, sigma_y = {NOISE_SIGMA}, {calls} model calls per image", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
