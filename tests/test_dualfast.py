"""DualFastScheduler: exact reduction to the wrapped solvers, the rule's algebra, and the diffusers contract."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffsamplers.eval.testbed import TESTBED_CONFIG, run_scheduler
from diffsamplers.models import GaussianMixtureModel
from diffsamplers.samplers.dualfast import DualFastScheduler
from diffsamplers.schedule import to_x0_eps
from diffsamplers.testing import run_tiny_stable_diffusion, tiny_stable_diffusion_pipeline, tiny_unet_pipeline

CONFIG = DDIMScheduler(**TESTBED_CONFIG).config
CLASSES = {c.__name__: c for c in (DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler)}
BASES = {
    "ddim": ("DDIMScheduler", {}),
    "dpm1": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", solver_order=1)),
    "dpm2": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", solver_order=2)),
    "dpm3": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", solver_order=3)),
    "dpmpp1": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=1)),
    "dpmpp2": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp3": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3)),
    # diffusers' UniPC bh1 returns NaN at a zero final sigma (h = inf), with or without DualFast
    "unipc_bh1": ("UniPCMultistepScheduler", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    "unipc_bh2": ("UniPCMultistepScheduler", dict(solver_type="bh2")),
    "unipc3": ("UniPCMultistepScheduler", dict(solver_order=3)),
}


def plain(name, extra):
    """The diffusers scheduler DualFast wraps (DPM-Solver in noise mode needs a sigma_min final level)."""
    if extra.get("algorithm_type") == "dpmsolver":
        extra = dict(extra, final_sigmas_type="sigma_min")
    return CLASSES[name].from_config(CONFIG, **extra)


@pytest.mark.parametrize("key", list(BASES))
def test_c_max_zero_is_the_base_scheduler_exactly(model, x_T, key):
    name, extra = BASES[key]
    steps = 6 if key != "dpmpp2" else 10
    expected, _ = run_scheduler(plain(name, extra), model, x_T, steps)
    sched = DualFastScheduler.from_config(CONFIG, base_scheduler=name, c_max=0.0, **extra)
    got, calls = run_scheduler(sched, model, x_T, steps)
    assert torch.equal(got, expected)
    assert calls == steps


@pytest.mark.parametrize("key", ["ddim", "dpm2", "dpmpp3", "unipc_bh2"])
@pytest.mark.parametrize("placement", ["model_output", "leading_term", "noise_term"])
def test_no_extra_model_calls_and_a_real_change(model, x_T, key, placement):
    name, extra = BASES[key]
    expected, _ = run_scheduler(plain(name, extra), model, x_T, 6)
    sched = DualFastScheduler.from_config(CONFIG, base_scheduler=name, mix_placement=placement, **extra)
    before = model.num_calls
    got, calls = run_scheduler(sched, model, x_T, 6)
    assert calls == 6 and model.num_calls - before == 6
    assert torch.isfinite(got).all() and not torch.allclose(got, expected)


def test_coefficient_ramp_and_untouched_first_step(model, x_T):
    sched = DualFastScheduler.from_config(CONFIG)
    sched.set_timesteps(5)
    assert [sched.mixing_coefficient(i) for i in range(5)] == pytest.approx([0, 0.0375, 0.075, 0.1125, 0.15])
    ref = plain("DPMSolverMultistepScheduler", {})
    ref.set_timesteps(5)
    t = sched.timesteps[0]
    out = model(x_T, t).sample
    assert torch.equal(sched.step(out, t, x_T).prev_sample, ref.step(out, t, x_T).prev_sample)
    one = DualFastScheduler.from_config(CONFIG)
    one.set_timesteps(1)
    assert one.mixing_coefficient(0) == 0.0


@pytest.mark.parametrize("tau", ["first", "previous"])
@pytest.mark.parametrize("space", ["eps", "x0"])
def test_cached_prediction_is_the_one_from_tau_and_the_rule_holds(model, x_T, tau, space):
    """DDIM + mixed model output is DDIM run on (1 + c) p - c p_tau (eq. 12), with p_tau from step tau."""
    sched = DualFastScheduler.from_config(CONFIG, base_scheduler="DDIMScheduler", tau=tau, mix_space=space, c_max=0.3)
    ref = DDIMScheduler.from_config(CONFIG)
    sched.set_timesteps(6)
    ref.set_timesteps(6)
    schedule = model.schedule
    x, predictions = x_T, []
    for i, t in enumerate(sched.timesteps):
        out = model(x, t).sample
        a, s = schedule.alpha_sigma(t)
        x0, eps = to_x0_eps(out, x, a, s, "epsilon")
        predictions.append(eps if space == "eps" else x0)
        tau_index = 0 if tau == "first" else max(i - 1, 0)
        c = 0.3 * i / 5
        mixed_pred = (1 + c) * predictions[-1] - c * predictions[tau_index]
        mixed_eps = mixed_pred if space == "eps" else (x - a * mixed_pred) / s
        expected = ref.step(mixed_eps, t, x).prev_sample
        x = sched.step(out, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)
        cached = 0 if tau == "first" else i
        assert sched.tau_index == cached
        torch.testing.assert_close(sched.tau_prediction, predictions[cached], rtol=1e-12, atol=1e-12)


def test_leading_term_equals_model_output_for_first_order_dpm_and_noise_term_is_variant_a(model, x_T):
    extra = dict(algorithm_type="dpmsolver++", solver_order=1)
    results = {}
    for placement in ("model_output", "leading_term"):
        sched = DualFastScheduler.from_config(CONFIG, mix_placement=placement, **extra)
        results[placement] = run_scheduler(sched, model, x_T, 6)[0]
    # equal up to the float32 sigma table DPMSolver computes its coefficients from
    torch.testing.assert_close(results["leading_term"], results["model_output"], rtol=1e-6, atol=1e-7)
    # "explicit epsilon only" on DDIM: x_next = a_next * x0(eps) + s_next * eps_tilde
    sched = DualFastScheduler.from_config(
        CONFIG, base_scheduler="DDIMScheduler", mix_placement="noise_term", tau="first"
    )
    sched.set_timesteps(4)
    x, eps0 = x_T, None
    for i, t in enumerate(sched.timesteps):
        eps = model(x, t).sample
        eps0 = eps if eps0 is None else eps0
        a, s, a_n, s_n = sched._levels[i]
        c = 0.15 * i / 3
        expected = a_n * (x - s * eps) / a + s_n * ((1 + c) * eps - c * eps0)
        x = sched.step(eps, t, x).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)  # DDIM's float32 alphas_cumprod


def test_state_is_reset_by_set_timesteps(model, x_T):
    sched = DualFastScheduler.from_config(
        CONFIG, base_scheduler="UniPCMultistepScheduler", mix_placement="leading_term"
    )
    first, _ = run_scheduler(sched, model, x_T, 6)
    second, _ = run_scheduler(sched, model, x_T, 6)
    assert torch.equal(first, second)
    third, _ = run_scheduler(sched, model, x_T[:1], 6)  # another batch size after a run
    torch.testing.assert_close(third, first[:1])


@pytest.mark.parametrize("key", ["ddim", "dpmpp2", "unipc_bh2"])
def test_half_precision_runs_without_nan(model, x_T, key):
    name, extra = BASES[key]
    for placement in ("model_output", "noise_term"):
        sched = DualFastScheduler.from_config(CONFIG, base_scheduler=name, mix_placement=placement, **extra)
        out, _ = run_scheduler(sched, model, x_T.half(), 5)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_from_config_and_round_trip(tmp_path, model, x_T):
    for source in (
        DDIMScheduler(**TESTBED_CONFIG),
        DPMSolverMultistepScheduler(solver_order=3),
        EulerDiscreteScheduler(),
    ):
        sched = DualFastScheduler.from_config(source.config)
        assert sched.config.base_scheduler == "DPMSolverMultistepScheduler"
    sched = DualFastScheduler.from_config(DPMSolverMultistepScheduler(solver_order=3, beta_end=0.015).config)
    assert sched.base.config.solver_order == 3 and sched.base.config.beta_end == 0.015
    sched = DualFastScheduler.from_config(CONFIG, base_scheduler="UniPCMultistepScheduler", c_max=0.2, tau="previous")
    assert sched.config.timestep_spacing == "trailing" and sched.init_noise_sigma == 1.0 and sched.order == 1
    sched.save_pretrained(tmp_path)
    loaded = DualFastScheduler.from_pretrained(tmp_path)
    # diffusers does not save `_use_default_values`: every saved key is explicit after loading
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == {
        k: v for k, v in sched.config.items() if k != "_use_default_values"
    }
    assert torch.equal(run_scheduler(loaded, model, x_T, 5)[0], run_scheduler(sched, model, x_T, 5)[0])
    with pytest.raises(ValueError, match="flow-matching"):
        DualFastScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    with pytest.raises(ValueError, match="EDM"):
        DualFastScheduler.from_config({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0})


def test_custom_timesteps_where_the_base_takes_them(model, x_T):
    sched = DualFastScheduler.from_config(CONFIG)
    sched.set_timesteps(timesteps=[999, 700, 400, 100])
    assert sched.timesteps.tolist() == [999, 700, 400, 100]
    run = DualFastScheduler.from_config(CONFIG, base_scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="timesteps"):
        run.set_timesteps(timesteps=[999, 500])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(c_max=-0.1), "c_max"),
        (dict(c_max=1.5), "c_max"),
        (dict(tau="last"), "tau"),
        (dict(mix_placement="everywhere"), "mix_placement"),
        (dict(mix_space="v"), "mix_space"),
        (dict(prediction_type="noise"), "prediction_type"),
        (dict(base_scheduler="EulerDiscreteScheduler"), "base_scheduler"),
        (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (dict(beta_schedule="cubic"), "beta_schedule"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DualFastScheduler.from_config(CONFIG, **kwargs)


def test_bad_step_arguments(model, x_T):
    sched = DualFastScheduler.from_config(CONFIG)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(-3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="eta"):
        sched.step(model(x_T, t).sample, t, x_T, eta=0.5)


def test_ddim_pipeline_end_to_end():
    for base in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        pipe = tiny_unet_pipeline()
        pipe.scheduler = DualFastScheduler.from_config(pipe.scheduler.config, base_scheduler=base)
        image = pipe(
            batch_size=2, num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        assert image.shape == (2, 8, 8, 3) and torch.isfinite(torch.as_tensor(image)).all()
    pipe.unet.half()  # float16 end to end
    pipe.scheduler = DualFastScheduler.from_config(pipe.scheduler.config, base_scheduler="DDIMScheduler")
    image = pipe(
        batch_size=1,
        num_inference_steps=4,
        eta=1.0,
        use_clipped_model_output=True,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.isfinite(torch.as_tensor(image)).all()


def test_stable_diffusion_pipeline_with_guidance():
    pipe = tiny_stable_diffusion_pipeline()
    for base in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        pipe.scheduler = DualFastScheduler.from_config(pipe.scheduler.config, base_scheduler=base)
        image = run_tiny_stable_diffusion(pipe)
        assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("placement", ["model_output", "leading_term", "noise_term"])
def test_prediction_types_agree(model, x_T, prediction_type, placement):
    """The same mixture predicting x0 or v gives the epsilon model's samples (the rule is parameterisation-free)."""
    other = GaussianMixtureModel.for_pipeline(model, TESTBED_CONFIG, prediction_type=prediction_type)
    for base in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        build = lambda p: DualFastScheduler.from_config(  # noqa: E731
            CONFIG, base_scheduler=base, mix_placement=placement, prediction_type=p, c_max=0.3
        )
        expected, _ = run_scheduler(build("epsilon"), model, x_T, 5)
        got, _ = run_scheduler(build(prediction_type), other, x_T, 5)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
