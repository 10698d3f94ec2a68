"""BDIAScheduler: the DDIM reduction, exact inversion, the amplification law and the diffusers contract."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffsamplers.eval.testbed import (
    TESTBED_CONFIG,
    SamplerSpec,
    diffusers_baselines,
    exact_testbed_errors,
    run_scheduler,
)
from diffsamplers.models import GaussianMixtureModel
from diffsamplers.samplers.bdia import BDIAScheduler
from diffsamplers.schedule import TIMESTEP_SPACINGS, ddim_step, to_x0_eps
from diffsamplers.testing import (
    tiny_flow_embeddings,
    tiny_flow_pipeline,
    tiny_stable_diffusion_pipeline,
    tiny_unet_pipeline,
)

BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD_VP = {**BETAS, "clip_sample": False, "steps_offset": 1}
FLOW = dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


@pytest.fixture(scope="module")
def digits():
    return GaussianMixtureModel.digits(scheduler_config=TESTBED_CONFIG)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sample_states(scheduler, model, x, num_inference_steps):
    """All states of one run: ``[z_N (input of step 0), ..., z_0 (final output)]``."""
    scheduler.set_timesteps(num_inference_steps)
    states = [x]
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
        states.append(x)
    return states


def invert(scheduler, model, upper, lower):
    """From ``(z_1, z_0)`` (the inputs of the last step and its output) back to ``(z_N, z_{N-1})``."""
    for k in range(len(scheduler.timesteps) - 1, 0, -1):
        t = scheduler.timesteps[k]
        upper, lower = scheduler.inverse_step(model(upper, t).sample, t, upper, lower).upper_sample, upper
    return upper, lower


# ---------------------------------------------------------------------------------------------------------------
# gamma = 0 is DDIM; the update and its levels
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_gamma_zero_is_ddim(digits, spacing, prediction_type, set_alpha_to_one):
    cfg = DDIMScheduler(
        **SD_VP, timestep_spacing=spacing, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one
    ).config
    model = GaussianMixtureModel.for_pipeline(digits, cfg, prediction_type=prediction_type)
    for dtype in (torch.float64, torch.float32):
        ref, ref64, bdia = (
            DDIMScheduler.from_config(cfg),
            DDIMScheduler.from_config(cfg),
            BDIAScheduler.from_config(cfg, gamma=0.0),
        )
        # DDIMScheduler forms its levels in float32 even for float64 inputs; with float64 tables its arithmetic is
        # ours, so the float64 reduction is exact (v prediction: up to the rounding of alpha^2 + sigma^2 = 1)
        ref64.alphas_cumprod = ref64.alphas_cumprod.double()
        ref64.final_alpha_cumprod = torch.as_tensor(ref64.final_alpha_cumprod).double()
        for s in (ref, ref64, bdia):
            s.set_timesteps(7)  # 7 does not divide 1000: t + T // N is then never the previous entry
        assert torch.equal(bdia.timesteps, ref.timesteps)
        x = randn(3, *model.shape, dtype=dtype)
        for t in ref.timesteps:
            out = model(x, t).sample
            got = bdia.step(out, t, x).prev_sample
            expected = ref.step(out, t, x).prev_sample
            assert got.dtype == dtype
            scale = float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * scale)
            if dtype == torch.float64:
                exact = ref64.step(out, t, x).prev_sample
                if prediction_type == "v_prediction":
                    torch.testing.assert_close(got, exact, rtol=0, atol=1e-14 * scale)
                else:
                    assert torch.equal(got, exact)
            x = expected


@pytest.mark.parametrize("use_clipped_model_output", [False, True])
def test_gamma_zero_is_ddim_with_clipping(use_clipped_model_output):
    cfg = DDIMScheduler(clip_sample=True, clip_sample_range=1.0, timestep_spacing="trailing").config
    ref, bdia = DDIMScheduler.from_config(cfg), BDIAScheduler.from_config(cfg, gamma=0.0)
    ref.set_timesteps(6)
    bdia.set_timesteps(6)
    x = 3 * randn(2, 3, 4, 4)
    for i, t in enumerate(ref.timesteps):
        out = randn(*x.shape, seed=i + 1)  # large outputs: the x0 clip engages
        expected = ref.step(out, t, x, use_clipped_model_output=use_clipped_model_output).prev_sample
        got = bdia.step(out, t, x, use_clipped_model_output=use_clipped_model_output).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        x = expected


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_update_uses_previous_timestep_entry_as_upper_level(spacing):
    # a z-independent epsilon model makes the update a fixed linear map: check it against DDIM's own tables, with
    # the upper level alphas_cumprod[timesteps[k - 1]] and the lower level DDIM's t - T // N
    gamma, n = 0.7, 7
    ref = DDIMScheduler(**SD_VP, timestep_spacing=spacing, set_alpha_to_one=False)
    ref.set_timesteps(n)
    bdia = BDIAScheduler.from_config(ref.config, gamma=gamma)
    bdia.set_timesteps(n)
    ac = ref.alphas_cumprod.double()
    level = lambda t: ac[t] if t >= 0 else torch.as_tensor(ref.final_alpha_cumprod).double()
    eps = randn(2, 4, 3, 3, seed=5)
    upper, x = None, randn(2, 4, 3, 3)
    for k, t in enumerate(ref.timesteps.tolist()):
        a, s = level(t).sqrt(), (1 - level(t)).sqrt()
        x0 = (x - s * eps) / a
        lo = level(t - 1000 // n)
        expected = lo.sqrt() * x0 + (1 - lo).sqrt() * eps
        if k > 0:
            up = level(int(ref.timesteps[k - 1]))
            expected = expected + gamma * (upper - (up.sqrt() * x0 + (1 - up).sqrt() * eps))
        got = bdia.step(eps, t, x).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        upper, x = x, got


def test_flow_update_is_bdia_on_flow_match_euler_sigmas():
    # in flow coordinates DDIM is Euler: z_{i-1} = z_i + (s_{i-1} - s_i) v + gamma (z_{i+1} - z_i - (s_{i+1} - s_i) v)
    gamma = 0.6
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    bdia = BDIAScheduler.from_config(ref.config, gamma=gamma)
    bdia.set_timesteps(6)
    assert bdia.config.prediction_type == "flow_prediction"
    assert torch.equal(bdia.timesteps, ref.timesteps)
    sig = ref.sigmas.double()
    upper, x = None, randn(2, 4, 3, 3)
    for k, t in enumerate(ref.timesteps):
        v = randn(*x.shape, seed=k + 1)
        expected = x + (sig[k + 1] - sig[k]) * v
        if k > 0:
            expected = expected + gamma * (upper - x - (sig[k - 1] - sig[k]) * v)
        got = bdia.step(v, t, x).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        upper, x = x, got


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_linear_step_returns_fresh_outputs_and_the_x0_prediction(prediction_type):
    # BDIA steps combine in reused float64 buffers: outputs (float64 ones too) must not alias them, and
    # pred_original_sample is the x0 of to_x0_eps at the step's level, in the model's dtype
    cfg = DDIMScheduler(**SD_VP, prediction_type=prediction_type, timestep_spacing="trailing").config
    bdia = BDIAScheduler.from_config(cfg, gamma=0.7)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        bdia.set_timesteps(6)
        x, kept = randn(2, 4, 5, 5, dtype=dtype), []
        for k, t in enumerate(bdia.timesteps):
            out = randn(*x.shape, seed=k + 1, dtype=dtype)
            step = bdia.step(out, t, x)
            x0 = to_x0_eps(out.double(), x.double(), bdia.alpha_t[k], bdia.sigma_t[k], prediction_type)[0]
            assert step.prev_sample.dtype == step.pred_original_sample.dtype == dtype
            torch.testing.assert_close(step.pred_original_sample.double(), x0, rtol=tol, atol=tol * x0.abs().max())
            kept.append((step.prev_sample, step.prev_sample.clone()))
            x = step.prev_sample
        assert all(torch.equal(returned, copy) for returned, copy in kept)


# ---------------------------------------------------------------------------------------------------------------
# exact inversion
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.9, 1.0])
@pytest.mark.parametrize("n", [10, 50])
def test_exact_round_trip_on_testbed(digits, gamma, n):
    bdia = BDIAScheduler.from_config(TESTBED_CONFIG, gamma=gamma)
    z_N = randn(4, *digits.shape)
    states = sample_states(bdia, digits, z_N, n)
    upper, lower = invert(bdia, digits, states[-2], states[-1])
    assert (upper - z_N).abs().max() < 1e-10
    assert (lower - states[1]).abs().max() < 1e-10


@pytest.mark.parametrize("kind", ["v_prediction-leading", "flow", "karras"])
def test_exact_round_trip_other_frames(digits, kind):
    if kind == "flow":
        cfg, extra = FLOW, {}
    elif kind == "karras":
        cfg, extra = dict(TESTBED_CONFIG), {"use_karras_sigmas": True}
    else:
        cfg, extra = dict(DDIMScheduler(**SD_VP, prediction_type="v_prediction", set_alpha_to_one=False).config), {}
    model = GaussianMixtureModel.for_pipeline(digits, cfg)
    bdia = BDIAScheduler.from_config(cfg, gamma=0.94, **extra)
    z_N = randn(3, *model.shape)
    states = sample_states(bdia, model, z_N, 12)
    assert (invert(bdia, model, states[-2], states[-1])[0] - z_N).abs().max() < 1e-10


def test_editing_round_trip_through_injected_pair(digits):
    n, bdia = 10, BDIAScheduler.from_config(TESTBED_CONFIG, gamma=0.94)
    bdia.set_timesteps(n)
    z_0 = digits.sample_data(3, generator=torch.Generator().manual_seed(0))
    # z_1 by one DDIM inversion step from the clean level (any z_1 gives an exact round trip)
    t_last, k = bdia.timesteps[-1], n - 1
    x0, eps = to_x0_eps(digits(z_0, t_last).sample, z_0, bdia.alpha_next[k], bdia.sigma_next[k], "epsilon")
    z_1 = ddim_step(x0, eps, bdia.alpha_next[k], bdia.sigma_next[k], bdia.alpha_t[k], bdia.sigma_t[k])
    z_N, z_N1 = invert(bdia, digits, z_1, z_0)
    assert z_N.std() < 2  # a healthy inverted latent at gamma near 1

    # a stock loop from latents = z_N: the first step hands back z_{N-1}; set_timesteps keeps the pending pair
    bdia.set_inversion_pair(z_N, z_N1)
    out, calls = run_scheduler(bdia, digits, z_N, n)
    assert calls == n and (out - z_0).abs().max() < 1e-10
    # a custom loop that starts at z_{N-1} makes N - 1 calls
    bdia.set_timesteps(n)
    bdia.set_inversion_pair(z_N, z_N1)
    bdia.set_begin_index(1)
    x = z_N1
    for t in bdia.timesteps[1:]:
        x = bdia.step(digits(x, t).sample, t, x).prev_sample
    assert (x - z_0).abs().max() < 1e-10
    # the pair is consumed: the next run starts with a plain DDIM step and does not return z_0
    out, _ = run_scheduler(bdia, digits, z_N, n)
    assert (out - z_0).abs().max() > 1e-3
    # a run that starts from neither sample of the pair is refused
    bdia.set_inversion_pair(z_N, z_N1)
    with pytest.raises(ValueError, match="injected"):
        run_scheduler(bdia, digits, z_N + 1, n)


@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("n", [9, 20])
def test_amplification_law_on_zero_velocity_model(gamma, n):
    # D_{i->k}(z) = z (velocity 0): the inverse recursion z_{i+1} = (z_{i-1} - z_i) / gamma + z_i has roots 1, -1/gamma
    # A perturbation d of z_0 reaches z_N as d (1 + (-1)^N gamma^{1-N}) / (1 + gamma): the parasitic mode grows
    # by 1/gamma per inverse step, so errors for gamma_1 and gamma_2 scale as (gamma_2 / gamma_1)^(N-1)
    zero = lambda x, t: SimpleNamespace(sample=torch.zeros_like(x))
    bdia = BDIAScheduler.from_config(FLOW, gamma=gamma)
    states = sample_states(bdia, zero, randn(2, 3), n)
    d = 1e-6
    upper, _ = invert(bdia, zero, states[-2], states[-1] + d)
    expected = d * (1 + (-1) ** n * gamma ** (1 - n)) / (1 + gamma)
    torch.testing.assert_close(upper - states[0], torch.full_like(upper, expected), rtol=1e-6, atol=1e-15)


def test_amplification_law_bounds_testbed_error_growth(digits):
    # on the testbed a perturbation splits into the parasitic mode, amplified by gamma^-(N-1), and the physical
    # mode of integrating the ODE backwards (gamma-independent; it dominates in the stiff low-noise directions),
    # so the error ratio between gamma_1 < gamma_2 lies between 1 and the law (gamma_2 / gamma_1)^(N-1)
    n, z_N = 20, randn(2, *digits.shape)
    d = 1e-9 * randn(2, *digits.shape, seed=1)
    err = {}
    for gamma in (0.5, 0.9, 1.0):
        bdia = BDIAScheduler.from_config(TESTBED_CONFIG, gamma=gamma)
        states = sample_states(bdia, digits, z_N, n)
        err[gamma] = float((invert(bdia, digits, states[-2], states[-1] + d)[0] - z_N).norm())
    for g1, g2 in [(0.5, 1.0), (0.9, 1.0), (0.5, 0.9)]:
        law = (g2 / g1) ** (n - 1)
        assert 1 < err[g1] / err[g2] <= 2 * law, (g1, g2, err[g1] / err[g2], law)
    assert err[0.5] / err[1.0] > 1e3  # 0.5^-19 = 5e5: small gamma is unusable for inversion


# ---------------------------------------------------------------------------------------------------------------
# guards and state
# ---------------------------------------------------------------------------------------------------------------


def test_bad_arguments_raise():
    for gamma in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="gamma"):
            BDIAScheduler(gamma=gamma)
    with pytest.raises(ValueError, match="prediction_type"):
        BDIAScheduler(prediction_type="velocity")
    with pytest.raises(ValueError, match="timestep_spacing"):
        BDIAScheduler(timestep_spacing="uniform")
    # EDM configs are not refused: they get the EDM variant (tests/test_bdia_edm.py)
    edm = BDIAScheduler.from_config({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0})
    assert type(edm).__name__ == "BDIAEDMScheduler"
    with pytest.raises(ValueError, match="thresholding"):
        BDIAScheduler.from_config(DDIMScheduler(thresholding=True).config)
    bdia = BDIAScheduler(gamma=0.9)
    x = randn(1, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        bdia.step(x, 999, x)
    for steps in (-3, 0, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            bdia.set_timesteps(steps)
    bdia.set_timesteps(5)
    t = bdia.timesteps
    with pytest.raises(ValueError, match="eta"):
        bdia.step(x, t[0], x, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        bdia.inverse_step(x, t[1], x, x, eta=0.5)
    with pytest.raises(ValueError, match="first timestep"):
        bdia.inverse_step(x, t[0], x, x)
    with pytest.raises(ValueError, match="gamma"):
        BDIAScheduler(gamma=0.0).inverse_step(x, t[1], x, x)


def test_state_resets_between_runs(digits):
    bdia = BDIAScheduler.from_config(TESTBED_CONFIG, gamma=0.5)
    z_N = randn(2, *digits.shape)
    first = run_scheduler(bdia, digits, z_N, 8)[0]
    assert torch.equal(run_scheduler(bdia, digits, z_N, 8)[0], first)
    # abandon a run half way: set_timesteps clears the stored z_{i+1} and the step index
    bdia.set_timesteps(8)
    x = z_N + 0.3
    for t in bdia.timesteps[:4]:
        x = bdia.step(digits(x, t).sample, t, x).prev_sample
    assert torch.equal(run_scheduler(bdia, digits, z_N, 8)[0], first)
    # an img2img-style run that begins part way makes a plain DDIM first step
    ddim = BDIAScheduler.from_config(TESTBED_CONFIG, gamma=0.0)
    for s in (bdia, ddim):
        s.set_timesteps(8)
        s.set_begin_index(3)
    t = bdia.timesteps[3]
    out = digits(z_N, t).sample
    assert torch.equal(bdia.step(out, t, z_N).prev_sample, ddim.step(out, t, z_N).prev_sample)


# ---------------------------------------------------------------------------------------------------------------
# diffusers contract
# ---------------------------------------------------------------------------------------------------------------


def test_from_config_of_diffusers_schedulers():
    ddim = DDIMScheduler(**SD_VP, set_alpha_to_one=False, prediction_type="v_prediction")
    for source in (ddim, DPMSolverMultistepScheduler(**BETAS), EulerDiscreteScheduler(**BETAS, steps_offset=1)):
        bdia = BDIAScheduler.from_config(source.config, gamma=0.5)
        assert bdia.config.gamma == 0.5 and not bdia.is_flow
        torch.testing.assert_close(bdia.alphas_cumprod, source.alphas_cumprod, rtol=0, atol=0)
    assert BDIAScheduler.from_config(ddim.config).config.prediction_type == "v_prediction"
    assert BDIAScheduler.from_config(EulerDiscreteScheduler(use_karras_sigmas=True).config).config.use_karras_sigmas
    for kw, mu in [({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.8)]:
        flow = FlowMatchEulerDiscreteScheduler(**kw)
        bdia = BDIAScheduler.from_config(flow.config)
        assert bdia.is_flow and bdia.config.prediction_type == "flow_prediction"
        flow.set_timesteps(9, mu=mu)
        bdia.set_timesteps(9, mu=mu)
        assert torch.equal(bdia.timesteps, flow.timesteps)
    # DPMSolver's flow mode names its shift flow_shift
    dpm_flow = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    assert BDIAScheduler.from_config(dpm_flow.config).config.shift == 3.0


def test_save_and_load_round_trip(tmp_path):
    bdia = BDIAScheduler.from_config(DDIMScheduler(**SD_VP, timestep_spacing="trailing").config, gamma=0.8)
    bdia.save_pretrained(tmp_path)
    loaded = BDIAScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(loaded.config) == public(bdia.config)
    outs = []
    for s in (bdia, loaded):
        s.set_timesteps(5)
        x, res = randn(1, 4, 4, 4), []
        for k, t in enumerate(s.timesteps[:3]):
            x = s.step(randn(1, 4, 4, 4, seed=k + 1), t, x).prev_sample
            res.append(x)
        outs.append(torch.stack(res))
    assert torch.equal(outs[0], outs[1])


def test_ddim_pipeline():
    pipe = tiny_unet_pipeline()
    run = lambda: (
        pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    )
    reference = run()
    config = pipe.scheduler.config
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.0)
    np.testing.assert_allclose(run(), reference, rtol=0, atol=1e-5)
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.5)
    a, b = run(), run()
    assert np.isfinite(a).all() and not np.allclose(a, reference, atol=1e-4)
    np.testing.assert_array_equal(a, b)


def test_stable_diffusion_pipeline_with_guidance_and_fp16():
    pipe = tiny_stable_diffusion_pipeline()
    kw = {"prompt": ["a cat", "a dog"], "num_inference_steps": 4, "guidance_scale": 7.5, "height": 32, "width": 32}
    run = lambda: pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    reference = run()
    config = pipe.scheduler.config
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.0)
    np.testing.assert_allclose(run(), reference, rtol=0, atol=1e-5)
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.5)
    out = run()
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    pipe.to(torch.float16)
    half = run()
    assert np.isfinite(half).all() and np.abs(half - out).max() < 0.05


def test_flow_pipeline():
    pipe = tiny_flow_pipeline()
    kw = {**tiny_flow_embeddings(2), "num_inference_steps": 4, "guidance_scale": 5.0, "height": 32, "width": 32}
    run = lambda **extra: pipe(**kw, **extra, generator=torch.Generator().manual_seed(0), output_type="np").images
    reference = run()
    config = pipe.scheduler.config
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.0)  # DDIM in flow coordinates is FlowMatchEuler
    np.testing.assert_allclose(run(), reference, rtol=0, atol=1e-5)
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.5)
    out = run()
    assert np.isfinite(out).all() and not np.allclose(out, reference, atol=1e-4)
    assert np.isfinite(run(sigmas=list(np.linspace(1.0, 0.25, 4)))).all()  # SD3 forwards custom sigmas
    pipe.scheduler = BDIAScheduler.from_config(config, gamma=0.5, use_dynamic_shifting=True)  # SD3 passes mu
    assert np.isfinite(run()).all()


# ---------------------------------------------------------------------------------------------------------------
# accuracy on the exact testbed
# ---------------------------------------------------------------------------------------------------------------


def test_bdia_beats_ddim_at_nfe_10_on_testbed():
    samplers = {"ddim": diffusers_baselines()["ddim"]}
    for gamma in (0.5, 1.0):
        samplers[f"bdia{gamma}"] = SamplerSpec(
            f"bdia{gamma}", lambda c, g=gamma: BDIAScheduler.from_config(c, gamma=g)
        )
    records = exact_testbed_errors(samplers, [10], num_samples=4)
    err = {r["sampler"]: r["rmse_vs_gt"] for r in records}
    assert all(r["nfe"] == 10 for r in records)  # one model call per step
    assert err["bdia0.5"] < 0.85 * err["ddim"] and err["bdia1.0"] < err["bdia0.5"], err
    assert math.isfinite(err["bdia1.0"])
