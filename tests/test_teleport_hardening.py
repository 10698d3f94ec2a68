# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""TeleportScheduler and GaussianStats hardening: public names as users import them, pass-through over any base,
no error growth with the step count over every base accepted (PNDM refused), the diffusers construction contract,
bad arguments named before the base runs, stats files read and written safely, and the samplers/pipelines layering.
"""

import inspect
import os
import pickle
import stat
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import diffsamplers
from diffsamplers import GaussianStats, TeleportScheduler
from diffsamplers.eval.testbed import TESTBED_CONFIG, run_scheduler
from diffsamplers.models import GaussianMixtureModel, exact_solution

CFG = dict(TESTBED_CONFIG)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def single_gaussian():
    """The digits data as one Gaussian (D = 64) with its exact statistics: teleporting it makes no approximation."""
    digits = GaussianMixtureModel.digits(scheduler_config=CFG)
    data = digits.sample_data(2000, generator=torch.Generator().manual_seed(0))
    model = GaussianMixtureModel.from_data(data, torch.zeros(len(data)), rank=8, scheduler_config=CFG)
    stats = GaussianStats.from_moments(model.means[0].reshape(model.shape), model.covariances()[0])
    return model, stats


@pytest.fixture
def stats():
    return GaussianStats.from_samples(torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(3)), rank=4)


# ----------------------------------------------------------------------------------------------------------------
# 1. Public names: `teleport` is the function wherever a user reaches it
# ----------------------------------------------------------------------------------------------------------------

_IMPORTS = """
import importlib, pkgutil, types
import torch
import diffsamplers
import diffsamplers.pipelines
from diffsamplers.pipelines import *
from diffsamplers.samplers import *
for pkg in ("diffsamplers.pipelines", "diffsamplers.samplers"):
    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
        importlib.import_module(f"{pkg}.{info.name}")
import diffsamplers.pipelines as pipelines, diffsamplers.samplers as samplers
for owner in (diffsamplers, pipelines, samplers):
    for name in owner.__all__:
        assert not isinstance(getattr(owner, name), types.ModuleType), f"{owner.__name__}.{name} is a module"
stats = diffsamplers.GaussianStats.from_samples(torch.randn(10, 1, 2, 2, dtype=torch.float64))
x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
for fn in (diffsamplers.teleport, pipelines.teleport, samplers.teleport, teleport):
    y = fn(x, stats, (0.1, 0.99), (0.9, 0.4))
    assert y.shape == x.shape and not torch.equal(y, x)
assert callable(diffsamplers.teleport_pipeline) and callable(pipelines.teleport_pipeline)
from diffsamplers import GaussianStats, TeleportScheduler, teleport, teleport_pipeline
print("ok")
"""


def test_public_names_are_not_shadowed_by_submodules():
    """`diffsamplers.teleport` and `diffsamplers.pipelines.teleport` stay the function after every submodule is
    imported (a fresh interpreter: the import order matters)."""
    result = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------------
# 2. skip 0 is a pass-through over any base
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: EulerDiscreteScheduler.from_config(CFG, interpolation_type="log_linear"),
        lambda: KDPM2DiscreteScheduler.from_config(CFG),
        lambda: PNDMScheduler.from_config(CFG),
        lambda: PNDMScheduler.from_config(CFG, skip_prk_steps=True),
    ],
    ids=["euler-log-linear", "kdpm2", "pndm", "pndm-plms"],
)
def test_skip_zero_accepts_any_base(build, single_gaussian):
    model, stats = single_gaussian
    x_T = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(1))
    plain, calls = run_scheduler(build(), model, x_T, 8)
    for how in ({"skip_steps": 0}, {"skip_fraction": 0}):
        wrapped = TeleportScheduler(build(), stats, **how)
        out, wrapped_calls = run_scheduler(wrapped, model, x_T, 8)
        assert wrapped_calls == calls and torch.equal(out, plain)


# ----------------------------------------------------------------------------------------------------------------
# 3. The error does not grow with the step count, for every base accepted
# ----------------------------------------------------------------------------------------------------------------

ACCEPTED = {
    "ddim": lambda: DDIMScheduler.from_config(CFG),
    "dpmpp2m": lambda: DPMSolverMultistepScheduler.from_config(CFG),
    "unipc": lambda: UniPCMultistepScheduler.from_config(CFG),
    "deis": lambda: DEISMultistepScheduler.from_config(CFG),
    "euler": lambda: EulerDiscreteScheduler.from_config(CFG),
    "heun": lambda: HeunDiscreteScheduler.from_config(CFG),
    "lms": lambda: LMSDiscreteScheduler.from_config(CFG),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_teleported_error_shrinks_with_steps(name, single_gaussian):
    """Exact testbed: skipping 20% of the grid keeps the error of the plain run (the skipped part is exact) and
    the error falls as N grows. Before the fix, LMS (order keyed by the step index) was 0.019 at N = 80 against
    6e-5 plain."""
    model, stats = single_gaussian
    x_T = torch.randn(4, *model.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    errors = []
    for n in (10, 20, 40):
        probe = ACCEPTED[name]()
        probe.set_timesteps(n)
        reference = exact_solution(model, x_T, float(probe.timesteps[0]), method="closed_form")
        rmse = lambda s: float((s.double() - reference).pow(2).mean().sqrt())
        plain, _ = run_scheduler(ACCEPTED[name](), model, x_T.float(), n)
        wrapped = TeleportScheduler(ACCEPTED[name](), stats, skip_fraction=0.2)
        teleported, _ = run_scheduler(wrapped, model, x_T.float(), n)
        assert wrapped.skip == n // 5
        assert rmse(teleported) <= 1.1 * rmse(plain) + 1e-6, (n, rmse(teleported), rmse(plain))
        errors.append(rmse(teleported))
    assert errors[2] < errors[1] < errors[0]


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_is_refused_when_it_would_skip(skip_prk_steps, stats):
    base = PNDMScheduler.from_config(CFG, skip_prk_steps=skip_prk_steps)
    for kwargs in ({}, {"skip_fraction": 0.2}, {"skip_steps": 2}, {"sigma_skip": 5.0}):
        with pytest.raises(ValueError, match="PNDMScheduler.*(warm-up|grid)"):
            TeleportScheduler(base, stats, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# 4. The diffusers construction contract and argument checks
# ----------------------------------------------------------------------------------------------------------------


def test_from_config_and_from_pretrained(tmp_path, single_gaussian):
    model, stats = single_gaussian
    source = DPMSolverMultistepScheduler.from_config(CFG, algorithm_type="dpmsolver++")
    built_in_code = dict(source.config)
    source.save_pretrained(tmp_path)
    saved = DPMSolverMultistepScheduler.load_config(tmp_path)  # what pipe.scheduler.config holds after loading
    wrapped = TeleportScheduler.from_config(saved, stats=stats, skip_steps=2)
    assert type(wrapped.base) is DPMSolverMultistepScheduler and wrapped.skip_steps == 2
    assert wrapped.config.algorithm_type == "dpmsolver++"
    # configs built in code carry no _class_name: name the class; overrides reach the base
    again = TeleportScheduler.from_config(
        built_in_code, stats, base_class=DPMSolverMultistepScheduler, skip_fraction=0.3, solver_order=3
    )
    assert type(again.base) is DPMSolverMultistepScheduler and again.config.solver_order == 3
    out = tmp_path / "saved"
    wrapped.save_pretrained(out)  # saves the base
    loaded = TeleportScheduler.from_pretrained(out, stats=stats, skip_steps=2)
    assert type(loaded.base) is DPMSolverMultistepScheduler
    x_T = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run_scheduler(loaded, model, x_T, 8)[0], run_scheduler(wrapped, model, x_T, 8)[0])
    # diffsamplers schedulers are found by name too
    lml = TeleportScheduler.from_config(CFG, stats, base_class="LMLScheduler")
    assert type(lml.base) is diffsamplers.LMLScheduler
    with pytest.raises(ValueError, match="base_class"):
        TeleportScheduler.from_config(built_in_code, stats)
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        TeleportScheduler.from_config(CFG, stats, base_class="NoSuchScheduler")
    with pytest.raises(TypeError, match="from_pretrained"):
        TeleportScheduler.from_config(str(tmp_path), stats)
    with pytest.raises(TypeError, match="from_config"):
        TeleportScheduler(dict(source.config), stats)


def _dpm(stats):
    return TeleportScheduler(DPMSolverMultistepScheduler.from_config(CFG), stats, skip_steps=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_inference_steps": 1001}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": True}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": 10.0}, ValueError, "num_inference_steps"),
        ({"timesteps": [999, 500, 700, 100]}, ValueError, "timesteps"),
        ({"timesteps": [999, 500, 500, 100]}, ValueError, "timesteps"),
        ({"timesteps": [1200, 500, 100]}, ValueError, "timesteps"),
        ({"timesteps": [999, 500, -3]}, ValueError, "timesteps"),
    ],
)
def test_bad_schedule_arguments_fail_before_the_base_runs(kwargs, error, match, stats):
    wrapped = _dpm(stats)
    with pytest.raises(error, match=match):
        wrapped.set_timesteps(**kwargs)
    assert wrapped.base.num_inference_steps is None  # the base was never called


def test_bad_custom_sigmas(stats):
    wrapped = TeleportScheduler(EulerDiscreteScheduler.from_config(CFG), stats, skip_steps=1)
    with pytest.raises(ValueError, match="sigmas"):
        wrapped.set_timesteps(sigmas=[5.0, 7.0, 1.0])
    assert wrapped.base.num_inference_steps is None


def test_bad_step_arguments(single_gaussian):
    model, stats = single_gaussian
    wrapped = TeleportScheduler(DPMSolverMultistepScheduler.from_config(CFG), stats, skip_steps=2)
    wrapped.set_timesteps(10)
    sample = torch.randn(2, *model.shape)
    t = wrapped.timesteps[0]
    wrapped.scale_model_input(sample, t)
    with pytest.raises(ValueError, match="model_output"):
        wrapped.step(torch.randn(1, *model.shape), t, sample)
    with pytest.raises(ValueError, match="timestep 555"):
        wrapped.step(torch.randn_like(sample), 555, sample)
    with pytest.raises(ValueError, match="teleported to"):
        wrapped.step(torch.randn_like(sample), wrapped.timesteps[1], sample)
    assert wrapped.base.step_index is None  # nothing reached the base
    out = wrapped.step(model(wrapped.scale_model_input(sample, t), t).sample, t, sample).prev_sample
    assert out.shape == sample.shape and torch.isfinite(out).all()
    # a pass-through checks the first timestep against the grid too
    plain = TeleportScheduler(DDIMScheduler.from_config(CFG), stats, skip_steps=0)
    plain.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this run's timesteps"):
        plain.step(torch.randn_like(sample), 3, sample)


# ----------------------------------------------------------------------------------------------------------------
# 5. Stats files
# ----------------------------------------------------------------------------------------------------------------


def test_load_names_the_file_for_broken_or_foreign_files(tmp_path, stats):
    from safetensors.torch import save_file

    good = tmp_path / "stats.safetensors"
    stats.save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"mean": np.zeros(3)}))
    weights = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3)}, str(weights))
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"mean": torch.zeros(3)}, str(incomplete), metadata={"format": "diffsamplers.GaussianStats",
                                                                  "format_version": "1", "shape": "[3]"})
    for path in (truncated, tiny, pickled, weights, incomplete):
        with pytest.raises(ValueError, match=path.name):
            GaussianStats.load(path)
    with pytest.raises(FileNotFoundError):
        GaussianStats.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_save_is_atomic_and_follows_the_umask(tmp_path, stats, umask, monkeypatch):
    previous = os.umask(umask)
    try:
        path = tmp_path / "stats.safetensors"
        stats.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]
        before = path.read_bytes()

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            stats.affine(2.0).save(path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # no orphan temporary file
        assert path.read_bytes() == before
    finally:
        os.umask(previous)
    torch.testing.assert_close(GaussianStats.load(path).covariance(), stats.covariance(), rtol=0, atol=0)


def test_image_folder_names_a_truncated_image(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    data = (tmp_path / "img1.png").read_bytes()
    (tmp_path / "img1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="img1.png"):
        GaussianStats.from_image_folder(tmp_path)
    (tmp_path / "img1.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="img1.png"):
        GaussianStats.from_image_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# 6. Layout: statistics in pipelines/, the scheduler needs only their attributes
# ----------------------------------------------------------------------------------------------------------------


def test_scheduler_does_not_import_pipelines():
    code = (
        "import sys, torch, types\n"
        "from diffusers import DDIMScheduler\n"
        "from diffsamplers.samplers import TeleportScheduler\n"
        "assert not any(m.startswith('diffsamplers.pipelines') for m in sys.modules), 'pipelines imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    assert GaussianStats.__module__ == "diffsamplers.pipelines.gaussian_stats"


def test_scheduler_accepts_any_object_with_the_statistics(single_gaussian):
    model, stats = single_gaussian
    duck = types.SimpleNamespace(
        mean=stats.mean.float(), eigvecs=stats.eigvecs, eigvals=stats.eigvals,
        residual_variance=stats.residual_variance, shape=stats.shape,
    )
    x_T = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(4))
    build = lambda s: TeleportScheduler(UniPCMultistepScheduler.from_config(CFG), s, skip_steps=2)
    out, _ = run_scheduler(build(duck), model, x_T, 10)
    torch.testing.assert_close(out, run_scheduler(build(stats), model, x_T, 10)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="stats.*missing eigvecs"):
        build(types.SimpleNamespace(mean=stats.mean, eigvals=stats.eigvals, residual_variance=0.0, shape=(64,)))
    with pytest.raises(ValueError, match="stats is inconsistent"):
        build(types.SimpleNamespace(mean=stats.mean[:10], eigvecs=stats.eigvecs, eigvals=stats.eigvals,
                                    residual_variance=0.0, shape=(10,)))


# ----------------------------------------------------------------------------------------------------------------
# 7. Docstrings cite the paper, not an internal document
# ----------------------------------------------------------------------------------------------------------------


def test_docstrings_cite_the_paper():
    import diffsamplers.pipelines.gaussian_stats as stats_module
    import diffsamplers.pipelines.teleported_start as start_module
    import diffsamplers.samplers.gaussian_teleport as maths_module
    import diffsamplers.samplers.teleport_scheduler as scheduler_module

    for module in (stats_module, start_module, maths_module, scheduler_module):
        source = inspect.getsource(module)
        assert "2412.09726" in module.__doc__
        for internal in ("research spec", "spec 3", "spec section", "adaptive_dualfast_teleport", "/work/"):
            assert internal not in source, (module.__name__, internal)


def test_learned_variance_base_passes_through(stats):
    """A learned-variance DDPM base (DeepFloyd IF, Kandinsky) takes 2C-channel outputs and splits them itself: the
    pass-through must hand them on unchanged, and still refuse any other shape."""
    from diffusers import DDPMScheduler

    base, plain = (DDPMScheduler(variance_type="learned_range") for _ in range(2))
    wrapped = TeleportScheduler(base, stats, skip_steps=0)
    wrapped.set_timesteps(5)
    plain.set_timesteps(5)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    t = wrapped.timesteps[0]
    got = wrapped.step(out, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    expected = plain.step(out, t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="shape"):
        wrapped.step(out[:1], wrapped.timesteps[1], x)
