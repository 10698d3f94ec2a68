"""DualFastScheduler and LMLScheduler (the schedulers that wrap a diffusers solver): positional step arguments as the
wrapped solver takes them, a config that says what runs, the sample's dtype, LML's freeze boundary, bad input."""

import inspect
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.samplers.dualfast import DualFastScheduler
from diffsamplers.samplers.lml import LMLScheduler
from diffsamplers.samplers.wrapping import BASE_CONFIG_KEYS

CONFIG = DDIMScheduler(**TESTBED_CONFIG).config
FLOW_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config
DDIM, DPM, UNIPC, FLOW = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)
# every (class, base) pair, with settings under which the method changes the base's steps
CASES = [
    (DualFastScheduler, DDIM, {}),
    (DualFastScheduler, DPM, {}),
    (DualFastScheduler, UNIPC, {}),
    (LMLScheduler, DDIM, dict(lm_lambda=10.0, lm_kappa=0.5)),
    (LMLScheduler, DPM, dict(lm_lambda=10.0, lm_kappa=0.5)),
    (LMLScheduler, FLOW, dict(lm_lambda=10.0, lm_kappa=0.5)),
]
IDS = [f"{cls.__name__}-{base}" for cls, base, _ in CASES]


def build(cls, base, **kwargs):
    return cls.from_config(FLOW_CONFIG if base == FLOW else CONFIG, base_scheduler=base, **kwargs)


def toy_output(x, i):
    """A deterministic stand-in for a model output (the tests here are about plumbing, not accuracy)."""
    return 0.8 * x + 0.1 * torch.sin(x + i)


def _explicit(scheduler):
    """A config as loaded from a file: every value explicit (no `_use_default_values`)."""
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


# -- 1. positional step arguments follow the wrapped solver's signature --------------------------------------------


@pytest.mark.parametrize("cls", [DualFastScheduler, LMLScheduler])
def test_ddim_base_takes_ddims_positional_arguments(cls):
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = []
    for positional in (True, False):
        sched = build(cls, DDIM, **({"lm_kappa": 0.5, "lm_lambda": 10.0} if cls is LMLScheduler else {}))
        sched.set_timesteps(4)
        sample = x
        for i, t in enumerate(sched.timesteps):
            out = toy_output(sample, i)
            if positional:  # DDIMScheduler.step(model_output, timestep, sample, eta, use_clipped_model_output, ...)
                result = sched.step(out, t, sample, 0.0, False, None, None, False)
                assert isinstance(result, tuple)
                sample = result[0]
            else:
                sample = sched.step(out, t, sample, eta=0.0).prev_sample
        runs.append(sample)
    assert torch.equal(runs[0], runs[1])
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    assert sched.step(toy_output(x, 0), t, x, 0.0).prev_sample.shape == x.shape  # eta fourth, as DDIM takes it
    # diffusers pipelines pass eta and generator only if step's signature names them
    assert {"eta", "generator"} <= set(inspect.signature(sched.step).parameters)


def test_positional_arguments_of_the_other_bases():
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    # DPMSolverMultistep: (generator, variance_noise, return_dict); UniPC: (return_dict)
    for base, args in ((DPM, (None, None, False)), (UNIPC, (False,))):
        sched = build(DualFastScheduler, base)
        sched.set_timesteps(3)
        t = sched.timesteps[0]
        assert isinstance(sched.step(toy_output(x, 0), t, x, *args), tuple)
        with pytest.raises(TypeError, match="positional"):
            sched.step(toy_output(x, 0), t, x, *args, 0.0)
    # FlowMatchEuler: (s_churn, s_tmin, s_tmax, s_noise, generator, per_token_timesteps, return_dict)
    sched = build(LMLScheduler, FLOW)
    sched.set_timesteps(3)
    t = sched.timesteps[0]
    result = sched.step(toy_output(x, 0), t, x, 0.0, 0.0, float("inf"), 1.0, None, None, False)
    assert isinstance(result, tuple)
    sched = build(DualFastScheduler, DPM)
    sched.set_timesteps(3)
    with pytest.raises(TypeError, match="generator"):  # the same argument by position and by name
        sched.step(toy_output(x, 0), sched.timesteps[0], x, None, generator=torch.Generator())


# -- 2. the config holds what the wrapped solver runs ----------------------------------------------------------------


def _sources():
    return {
        "deis": _explicit(DEISMultistepScheduler(algorithm_type="deis", solver_type="logrho")),
        "unipc": _explicit(UniPCMultistepScheduler(solver_type="bh2")),
        "dpm": _explicit(DPMSolverMultistepScheduler(solver_type="heun", solver_order=3)),
        "ddim": _explicit(DDIMScheduler(**TESTBED_CONFIG)),
    }


@pytest.mark.parametrize("cls", [DualFastScheduler, LMLScheduler])
@pytest.mark.parametrize("source", ["deis", "unipc", "dpm", "ddim"])
def test_config_equals_the_wrapped_solvers_config(cls, source):
    config = _sources()[source]
    bases = (DDIM, DPM, UNIPC) if cls is DualFastScheduler else (DDIM, DPM)
    for base in (None,) + bases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = cls.from_config(config) if base is None else cls.from_config(config, base_scheduler=base)
        for key, value in sched.base.config.items():
            if key.startswith("_") or key == "solver_p":
                continue
            assert key in BASE_CONFIG_KEYS
            assert sched.config[key] == value, (key, base)


def test_deis_and_unipc_values_are_replaced_as_diffusers_does_with_a_warning():
    deis = _sources()["deis"]
    with pytest.warns(UserWarning, match="algorithm_type"):
        sched = DualFastScheduler.from_config(deis)
    assert (sched.config.algorithm_type, sched.config.solver_type) == ("dpmsolver++", "midpoint")
    assert (sched.base.config.algorithm_type, sched.base.config.solver_type) == ("dpmsolver++", "midpoint")
    with pytest.warns(UserWarning, match="solver_type"):
        sched = LMLScheduler.from_config(_sources()["unipc"])
    assert sched.config.solver_type == sched.base.config.solver_type == "midpoint"
    with pytest.warns(UserWarning, match="solver_type"):
        sched = DualFastScheduler.from_config(_sources()["dpm"], base_scheduler=UNIPC)
    assert sched.config.solver_type == "bh2"
    # the saved config round-trips to the same solver, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = DualFastScheduler.from_config(_explicit(sched))
    assert again.base.config.solver_type == "bh2"
    # an algorithm the wrapped solver cannot run is refused, naming the argument
    with pytest.raises(ValueError, match="algorithm_type"):
        DualFastScheduler.from_config(CONFIG, algorithm_type="lms")


# -- 3. the result has the sample's dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls, base, kwargs", CASES, ids=IDS)
def test_half_precision_output_with_a_float32_sample_returns_float32(cls, base, kwargs):
    sched = build(cls, base, **kwargs)
    sched.set_timesteps(4)
    sample = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    for i, t in enumerate(sched.timesteps):
        sample = sched.step(toy_output(sample, i).half(), t, sample).prev_sample
        assert sample.dtype == torch.float32
    assert torch.isfinite(sample).all()


# -- 4. LML's freeze rule is strict, as the official one ------------------------------------------------------------


def test_lml_freeze_rule_is_strict_at_the_boundary():
    sched = LMLScheduler.from_config(CONFIG, lm_lambda=10.0, lm_kappa=0.5, freeze_fraction=0.5)
    ref = DPMSolverMultistepScheduler.from_config(CONFIG)
    timesteps = [999, 700, 500, 300, 100]  # the official rule corrects where t < 1000 (1 - 0.5) = 500
    sched.set_timesteps(timesteps=timesteps)
    ref.set_timesteps(timesteps=timesteps)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        out = toy_output(x, i)
        expected = ref.step(out, t, x).prev_sample  # the base fed the same trajectory
        x = sched.step(out, t, x).prev_sample
        if int(t) >= 500:
            assert torch.equal(x, expected), int(t)
        else:
            assert not torch.allclose(x, expected), int(t)
    # freeze_fraction = 0 corrects everywhere, a flow schedule's t = 1000 included
    flow = LMLScheduler.from_config(FLOW_CONFIG, lm_lambda=10.0, lm_kappa=0.5)
    flow.set_timesteps(4)
    assert float(flow.timesteps[0]) == 1000.0 and flow._apply_at == [True] * 4


# -- 5. bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, base, kwargs", CASES, ids=IDS)
def test_bad_counts_and_timesteps_raise_naming_the_argument(cls, base, kwargs):
    sched = build(cls, base, **kwargs)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(2.0)
    if base != FLOW:
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(1001)
    sched.set_timesteps(4)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):  # a batch-1 output must not broadcast over 4 samples
        sched.step(toy_output(x[:1], 0), t, x)
    with pytest.raises(TypeError, match="model_output"):
        sched.step(toy_output(x, 0).numpy(), t, x)
    off_grid = float(t) - 0.5 if base == FLOW else int(t) - 1
    with pytest.raises(ValueError, match="timestep"):
        sched.step(toy_output(x, 0), off_grid, x)
    # nothing was consumed by the refused calls: the run starts normally
    assert sched.step(toy_output(x, 0), t, x).prev_sample.shape == x.shape


@pytest.mark.parametrize("cls", [DualFastScheduler, LMLScheduler])
@pytest.mark.parametrize(
    "timesteps", [[500, 999, 100], [999, 500, 500, 100], [1000, 500, 100], [999, 500, -1], [999, float("nan"), 100]]
)
def test_bad_custom_timesteps_raise(cls, timesteps):
    sched = cls.from_config(CONFIG, lm_kappa=0.5) if cls is LMLScheduler else cls.from_config(CONFIG)
    with pytest.raises(ValueError, match="timesteps"):
        sched.set_timesteps(timesteps=timesteps)


def test_flow_custom_sigmas_and_timesteps_are_checked():
    sched = LMLScheduler.from_config(FLOW_CONFIG)
    with pytest.raises(ValueError, match="sigmas"):
        sched.set_timesteps(sigmas=[0.5, 0.9, 0.1])
    with pytest.raises(ValueError, match="timesteps"):
        sched.set_timesteps(timesteps=[900.0, 900.0, 100.0])
    sched.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    assert len(sched.timesteps) == 3


@pytest.mark.parametrize("cls", [DualFastScheduler, LMLScheduler])
def test_from_config_of_a_string_and_learned_variance(cls):
    with pytest.raises(TypeError, match="from_pretrained"):
        cls.from_config("some/model")
    with pytest.raises(TypeError, match="config"):
        cls.from_config(3)
    with pytest.raises(ValueError, match="variance_type"):
        cls.from_config(dict(CONFIG, variance_type="learned_range"))
