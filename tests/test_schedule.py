"""Shared maths: schedules, conversions and the DDIM step against diffusers' own schedulers."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffsamplers.schedule import (
    PREDICTION_TYPES,
    NoiseSchedule,
    convert_model_output,
    ddim_step,
    flow_timesteps,
    from_x0_eps,
    prediction_coefficients,
    to_x0_eps,
)

VP_CONFIGS = {
    "linear": dict(),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
}


@pytest.mark.parametrize("name", list(VP_CONFIGS))
def test_vp_schedule_matches_diffusers_alphas(name):
    ref = DDIMScheduler(**VP_CONFIGS[name])
    sched = NoiseSchedule.from_config(ref.config)
    assert sched.family == "vp"
    t = torch.arange(1000)
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(alpha**2, ref.alphas_cumprod.double(), rtol=0, atol=1e-7)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_vp_inverse_map_roundtrips_float_timesteps(name):
    sched = NoiseSchedule.from_config(DDIMScheduler(**VP_CONFIGS[name]).config)
    t = torch.tensor([0.0, 0.5, 3.25, 100.0, 517.7, 998.9])
    torch.testing.assert_close(sched.timestep_from_ve_sigma(sched.ve_sigma(t)), t.double(), rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.timestep_from_lambda(sched.lambda_(t)), t.double(), rtol=0, atol=1e-9)


def test_vp_inverse_map_matches_diffusers_karras_timesteps():
    # Euler with Karras sigmas gives float timesteps through its _sigma_to_t: ours must invert to the same
    euler = EulerDiscreteScheduler(use_karras_sigmas=True)
    euler.set_timesteps(12)
    sched = NoiseSchedule.from_config(euler.config)
    ts = sched.timestep_from_ve_sigma(euler.sigmas[:-1].double())
    torch.testing.assert_close(ts.float(), euler.timesteps.float(), rtol=0, atol=2e-3)


def test_flow_and_ve_families():
    flow = NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert flow.family == "flow"
    a, s = flow.alpha_sigma(torch.tensor([1000.0, 250.0]))
    torch.testing.assert_close(s, torch.tensor([1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(a + s, torch.ones(2, dtype=torch.float64))
    ve = NoiseSchedule.from_config({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0})
    assert ve.family == "ve"
    c_noise = torch.log(torch.tensor(80.0)) / 4
    torch.testing.assert_close(ve.ve_sigma(c_noise), torch.tensor(80.0, dtype=torch.float64))


@pytest.mark.parametrize("shift,mu", [(1.0, None), (3.0, None), (1.0, 0.8)])
def test_flow_grid_is_flowmatch_eulers(shift, mu):
    kw = dict(shift=shift, use_dynamic_shifting=mu is not None)
    ref = FlowMatchEulerDiscreteScheduler(**kw)
    ref.set_timesteps(7, mu=mu)
    ts, sigmas = flow_timesteps(dict(ref.config), 7, mu=mu)
    assert torch.equal(ts, ref.timesteps) and torch.equal(sigmas, ref.sigmas)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("from_type", PREDICTION_TYPES)
@pytest.mark.parametrize("to_type", PREDICTION_TYPES)
def test_conversions_roundtrip(dtype, tol, from_type, to_type):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype)
    out = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype)
    for alpha, sigma in [(0.8, 0.6), (torch.tensor([0.3, 0.5, 0.9, 0.99]), torch.tensor([0.7, 0.5, 0.1, 0.01]))]:
        there = convert_model_output(out, x, alpha, sigma, from_type, to_type)
        back = convert_model_output(there, x, alpha, sigma, to_type, from_type)
        scale = out.abs().max() if from_type != to_type else 1
        assert (back - out).abs().max() <= tol * 10 * scale


def test_conversions_are_mutually_consistent():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 8, generator=g, dtype=torch.float64)
    for a, s in [(0.6, 0.8), (0.7, 0.3)]:  # VP and flow-like frames
        x = a * x0 + s * eps
        for p in PREDICTION_TYPES:
            got_x0, got_eps = to_x0_eps(from_x0_eps(x0, eps, a, s, p), x, a, s, p)
            torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-12)
            torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0_eps(x0, x0, 0.5, 0.5, "velocity")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_coefficients_are_the_linear_map_of_to_x0_eps(prediction_type):
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    flow = prediction_type == "flow_prediction"
    # VP levels from almost clean to almost pure noise (flow: alpha = 1 - sigma), as floats and as 0-d tensors
    levels = [(1 - s, s) if flow else ((1 - s * s) ** 0.5, s) for s in (0.01, 0.3, 0.8, 0.998)]
    levels.append(tuple(torch.tensor(v, dtype=torch.float64) for v in levels[1]))
    for alpha, sigma in levels:
        (x0_out, x0_x), (eps_out, eps_x) = prediction_coefficients(prediction_type, alpha, sigma)
        assert all(isinstance(k, float) for k in (x0_out, x0_x, eps_out, eps_x))
        x0, eps = to_x0_eps(out, x, alpha, sigma, prediction_type)
        torch.testing.assert_close(x0_out * out + x0_x * x, x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps_out * out + eps_x * x, eps, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_coefficients("velocity", 0.6, 0.8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_shared_ddim_step_reproduces_ddim_scheduler(spacing, prediction_type, set_alpha_to_one, eta):
    ref = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        timestep_spacing=spacing, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
    )
    ref.set_timesteps(10)
    sched = NoiseSchedule.from_config(ref.config)
    ts, prev = sched.ddim_timesteps(10)
    assert torch.equal(ts, ref.timesteps)
    g = torch.Generator().manual_seed(0)
    # float64 inputs: diffusers then does float64 maths on its float32 tables, and the two must agree closely
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t, tp in zip(ts, prev):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        # the step formula is checked on diffusers' own float32 levels (the levels themselves are tested above;
        # with sample prediction eps = (x - a x0) / s amplifies float32 rounding of a by 1 / s)
        ac = ref.alphas_cumprod
        a, s = ac[t] ** 0.5, (1 - ac[t]) ** 0.5
        ac_prev = ac[tp] if tp >= 0 else ref.final_alpha_cumprod
        an, sn = ac_prev**0.5, (1 - ac_prev) ** 0.5
        a, s, an, sn = (v.double() for v in (a, s, an, sn))
        x0, e = to_x0_eps(out, x, a, s, prediction_type)
        got = ddim_step(x0, e, a, s, an, sn, eta=eta, noise=noise)
        # diffusers forms its eta variance in float32; with sample prediction eps = (x - a x0) / s is large, so
        # allow float32 rounding on the scale of the eps term
        tol = 1e-6 * (1 + float(e.abs().max()) * (eta > 0))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=tol)
        if prediction_type == "epsilon":  # and in float32, the way pipelines call it
            got32 = ddim_step(*to_x0_eps(out.float(), x.float(), a, s, "epsilon"), a, s, an, sn, eta, noise.float())
            expected32 = ref.step(out.float(), t, x.float(), eta=eta, variance_noise=noise.float()).prev_sample
            torch.testing.assert_close(got32, expected32, rtol=1e-6, atol=1e-6)
        x = expected


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shared_ddim_step_is_flow_match_euler(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(8)
    sched = NoiseSchedule.from_config(ref.config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=g)
        expected = ref.step(v, t, x).prev_sample
        a, s = sched.alpha_sigma(t)
        x0, e = to_x0_eps(v.double(), x.double(), a, s, "flow_prediction")
        sn = ref.sigmas[i + 1].double()
        got = ddim_step(x0, e, a, s, 1 - sn, sn).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * max(1, float(expected.abs().max())))
        x = expected


def test_shared_ddim_step_matches_dpmsolver_first_order():
    # DPM-Solver++ of order 1 is DDIM: a second, independent diffusers reference
    ref = DPMSolverMultistepScheduler(solver_order=1, final_sigmas_type="zero")
    ref.set_timesteps(6)
    sched = NoiseSchedule.from_config(ref.config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    ts = list(ref.timesteps) + [-1]
    for t, tn in zip(ts[:-1], ts[1:]):
        out = torch.randn(x.shape, generator=g)
        expected = ref.step(out, t, x).prev_sample
        a, s = sched.alpha_sigma(t)
        an, sn = (torch.tensor(1.0), torch.tensor(0.0)) if tn < 0 else sched.alpha_sigma(tn)
        x0, e = to_x0_eps(out.double(), x.double(), a, s, "epsilon")
        torch.testing.assert_close(ddim_step(x0, e, a, s, an, sn).float(), expected, rtol=1e-5, atol=1e-5)
        x = expected
