"""BDIAEDMScheduler: the EDM Heun reduction, the BDIA-EDM update, exact inversion, convergence and the diffusers
contract (EDM configs, Heun call pattern, pipelines)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffsamplers import BDIAEDMScheduler, BDIAScheduler, GaussianMixtureModel, exact_solution
from diffsamplers.eval.testbed import run_scheduler
from diffsamplers.testing import EDMPreconditionedGMM, run_tiny_stable_diffusion, tiny_stable_diffusion_pipeline

EDM = dict(EDMEulerScheduler().config)


@pytest.fixture(scope="module")
def digits():
    return EDMPreconditionedGMM(GaussianMixtureModel.digits(scheduler_config=EDM))


@pytest.fixture(scope="module")
def toy():
    return EDMPreconditionedGMM(GaussianMixtureModel.toy_2d(scheduler_config=EDM))


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_bdia_edm(model, n, x, gamma=0.0, sigma_data=0.5, solver="heun", **config):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1: Heun, Euler into the last level; or Euler
    throughout) on EDMEulerScheduler's grid, plus the BDIA term gamma (x_{k-1} - x_k - (sigma_{k-1} - sigma_k) d_k)
    from the second interval on (gamma = 0: Algorithm 1 itself). Returns the final sample and all level states."""
    grid = EDMEulerScheduler(**config)
    grid.set_timesteps(n)
    sig, ts = grid.sigmas.double().tolist(), grid.timesteps

    def denoise(x, k):  # D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        s = sig[k]
        out = model(x / math.sqrt(s**2 + sigma_data**2), ts[k]).sample
        c_out = s * sigma_data / math.sqrt(s**2 + sigma_data**2)
        return sigma_data**2 / (s**2 + sigma_data**2) * x + c_out * out

    states, x = [x], x * 1.0
    for k in range(n):
        d = (x - denoise(x, k)) / sig[k]
        x_next = x + (sig[k + 1] - sig[k]) * d
        if k < n - 1 and solver == "heun":
            d2 = (x_next - denoise(x_next, k + 1)) / sig[k + 1]
            x_next = x + (sig[k + 1] - sig[k]) * (0.5 * d + 0.5 * d2)
        if k > 0:
            x_next = x_next + gamma * (states[-2] - x - (sig[k - 1] - sig[k]) * d)
        x = x_next
        states.append(x)
    return x, states


def sample_levels(scheduler, model, x, n):
    """A pipeline-style loop from ``x`` (already at sigma_0); returns the states at the grid levels and the calls."""
    scheduler.set_timesteps(n)
    states, calls = [x], 0
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t).sample
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
        if scheduler.order == 1 or scheduler.step_index % 2 == 0 or scheduler.step_index == len(scheduler.timesteps):
            states.append(x)  # a completed interval (with Heun, the calls in between return predictors)
    return states, calls


def invert(scheduler, model, upper, lower):
    """The docstring's inversion loop: from ``(x_{N-1}, x_N)`` back to ``(x_0, x_1)``; returns them and the calls."""
    calls = 0
    for t in scheduler.level_timesteps.flip(0)[:-1]:
        out = model(scheduler.scale_model_input(upper, t), t).sample
        pred = scheduler.heun_predictor(out, t, upper)
        out2 = None
        if pred is not None:
            out2 = model(scheduler.scale_model_input(pred.sample, pred.timestep), pred.timestep).sample
        calls += 1 + (pred is not None)
        upper, lower = scheduler.inverse_step(out, t, upper, lower, predictor_output=out2).upper_sample, upper
    return upper, lower, calls


# ---------------------------------------------------------------------------------------------------------------
# gamma = 0 is EDM Heun; the BDIA-EDM update
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_matches_reference_edm_sampler_and_bdia_update(toy, solver, schedule, gamma):
    n, x = 7, 80.0 * randn(5, *toy.shape)
    expected, _ = reference_bdia_edm(toy, n, x, gamma=gamma, solver=solver, sigma_schedule=schedule)
    scheduler = BDIAEDMScheduler(gamma=gamma, sigma_schedule=schedule, solver=solver)
    before = toy.num_calls
    states, calls = sample_levels(scheduler, toy, x, n)
    assert calls == toy.num_calls - before == (2 * n - 1 if solver == "heun" else n)
    assert states[-1].dtype == torch.float64
    # the same maths up to float64 rounding of the start's scale (80), amplified a little by the recursion
    torch.testing.assert_close(states[-1], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_first_call_is_edm_euler_and_preconditioning_matches_diffusers(solver):
    # the first call of a run is EDMEulerScheduler's step (with Heun: its predictor), with its c_in, c_skip and c_out
    for prediction_type in ("epsilon", "v_prediction"):
        ref = EDMEulerScheduler(prediction_type=prediction_type)
        ours = BDIAEDMScheduler.from_config(ref.config, gamma=0.5, solver=solver)
        ref.set_timesteps(6)
        x = 80.0 * randn(2, 4, 3, 3, dtype=torch.float32)
        for k in range(6):
            t = ref.timesteps[k]
            ours.set_timesteps(6)
            ours.set_begin_index(ours.order * k)  # a fresh run at the first call of level k
            torch.testing.assert_close(ours.scale_model_input(x, t), ref.scale_model_input(x, t), rtol=1e-6, atol=0)
            out = randn(*x.shape, seed=k + 1, dtype=torch.float32)
            expected = ref.step(out, t, x)
            got = ours.step(out, t, x)
            torch.testing.assert_close(got.prev_sample, expected.prev_sample, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample, rtol=1e-5, atol=1e-5)
    noise, x0 = randn(3, 2, 2, seed=1), randn(3, 2, 2, seed=2)
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    ts = ours.level_timesteps[[0, 2, 5]]
    torch.testing.assert_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), rtol=1e-6, atol=1e-6)


def test_exact_network_wrapper_gives_the_posterior_mean(toy):
    sigma = torch.tensor([80.0, 1.3, 0.01], dtype=torch.float64)
    x = randn(3, *toy.shape) * sigma.reshape(-1, 1, 1, 1)
    root = (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
    out = toy(x / root, torch.log(sigma) / 4).sample
    c_skip, c_out = 0.25 / root**2, sigma.reshape(-1, 1, 1, 1) * 0.5 / root
    expected = toy.mixture.posterior_mean(x.reshape(3, -1), torch.ones(3, dtype=torch.float64), sigma)
    torch.testing.assert_close((c_skip * x + c_out * out).reshape(3, -1), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# exact inversion
# ---------------------------------------------------------------------------------------------------------------


def test_gamma_zero_euler_is_diffusers_edm_euler(digits):
    # float32 like EDMEulerScheduler's step, which upcasts to float32
    n, x_0 = 8, 80.0 * randn(3, *digits.shape, dtype=torch.float32)
    ref = EDMEulerScheduler()
    ref.set_timesteps(n)
    x = x_0
    for t in ref.timesteps:
        x = ref.step(digits(ref.scale_model_input(x, t), t).sample, t, x).prev_sample
    ours = sample_levels(BDIAEDMScheduler(gamma=0.0), digits, x_0, n)[0][-1]
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("gamma", [0.9, 1.0])
@pytest.mark.parametrize("n", [10, 50])
def test_exact_round_trip(digits, solver, gamma, n):
    scheduler = BDIAEDMScheduler(gamma=gamma, solver=solver)
    x_0 = 80.0 * randn(4, *digits.shape)
    states, _ = sample_levels(scheduler, digits, x_0, n)
    assert len(states) == n + 1
    upper, lower, calls = invert(scheduler, digits, states[-2], states[-1])
    # every inverted interval costs its sampling calls: Heun two (but the last, Euler), Euler one
    assert calls == (2 * (n - 1) - 1 if solver == "heun" else n - 1)
    assert (upper - x_0).abs().max() < 1e-10
    assert (lower - states[1]).abs().max() < 1e-10


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_editing_round_trip_through_injected_pair(digits, solver):
    n, scheduler = 8, BDIAEDMScheduler(gamma=0.95, solver=solver)
    scheduler.set_timesteps(n)
    data = digits.mixture.sample_data(3, generator=torch.Generator().manual_seed(0))
    # any x_{N-1} gives an exact round trip: here the data noised to its level
    near = data + scheduler.level_sigmas[n - 1] * randn(*data.shape, seed=3)
    top, below, _ = invert(scheduler, digits, near, data)
    # a stock loop from latents = x_0 / init_noise_sigma: the skipped interval's calls are spent for nothing
    scheduler.set_inversion_pair(top, below)
    out, calls = run_scheduler(scheduler, digits, top / scheduler.init_noise_sigma, n)
    assert calls == len(scheduler.timesteps) and (out - data).abs().max() < 1e-10
    # a custom loop that starts at x_1 (found by its timestep: the first call of level 1)
    scheduler.set_timesteps(n)
    scheduler.set_inversion_pair(top, below)
    x = below
    for t in scheduler.timesteps[scheduler.order :]:
        x = scheduler.step(digits(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert (x - data).abs().max() < 1e-10
    # the pair is consumed: the next run starts with a plain Heun step and does not return the data
    out, _ = run_scheduler(scheduler, digits, top / scheduler.init_noise_sigma, n)
    assert (out - data).abs().max() > 1e-3
    scheduler.set_inversion_pair(top, below)
    with pytest.raises(ValueError, match="injected"):
        run_scheduler(scheduler, digits, top + 1, n)


# ---------------------------------------------------------------------------------------------------------------
# accuracy on the exact testbed
# ---------------------------------------------------------------------------------------------------------------


def test_convergence_against_exact_solution(toy):
    x_0 = 80.0 * randn(16, *toy.shape)
    reference = exact_solution(toy.mixture, x_0, math.log(80.0) / 4)
    levels = (80, 160, 320)  # asymptotic: at 20-80 levels the Karras grid's uneven steps blur the orders
    err, slope = {}, {}
    for solver, gamma in (("heun", 0.0), ("heun", 1.0), ("euler", 0.0), ("euler", 1.0)):
        for n in levels:
            states, calls = sample_levels(BDIAEDMScheduler(gamma=gamma, solver=solver), toy, x_0, n)
            err[solver, gamma, n] = float((states[-1] - reference).pow(2).mean().sqrt())
        nfe = torch.tensor([2.0 * n - 1 if solver == "heun" else float(n) for n in levels]).log()
        y = torch.tensor([err[solver, gamma, n] for n in levels]).log()
        slope[solver, gamma] = -float(((nfe - nfe.mean()) * (y - y.mean())).sum() / ((nfe - nfe.mean()) ** 2).sum())
    # EDM Heun is second order and EDM Euler first; BDIA with Euler both ways (gamma = 1) is second order, since the
    # leading errors of the two directions cancel; with Heun forward and an Euler backward step only first order
    assert 1.8 < slope["heun", 0.0] < 2.3 and 0.8 < slope["heun", 1.0] < 1.4, slope
    assert 0.8 < slope["euler", 0.0] < 1.2 and 1.8 < slope["euler", 1.0] < 2.3, slope
    assert err["euler", 1.0, 320] < 0.2 * err["euler", 0.0, 320] and err["euler", 1.0, 320] < err["heun", 1.0, 320]


# ---------------------------------------------------------------------------------------------------------------
# grid, configs, guards and state
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_grid_is_edm_euler_in_heun_layout(schedule, final, n):
    ref = EDMEulerScheduler(sigma_schedule=schedule, final_sigmas_type=final)
    ref.set_timesteps(n)
    euler = BDIAEDMScheduler.from_config(ref.config)
    euler.set_timesteps(n)
    assert euler.order == 1 and torch.equal(euler.timesteps, ref.timesteps) and torch.equal(euler.sigmas, ref.sigmas)
    ours = BDIAEDMScheduler.from_config(ref.config, solver="heun")
    ours.set_timesteps(n)
    assert ours.order == 2
    assert torch.equal(ours.level_sigmas.float(), ref.sigmas) and torch.equal(ours.level_timesteps, ref.timesteps)
    heun = torch.cat([ref.timesteps[:1], ref.timesteps[1:].repeat_interleave(2)])
    assert torch.equal(ours.timesteps, heun) and len(ours.timesteps) == 2 * n - 1 and ours.num_inference_steps == n
    # sigmas[c] is the level of timesteps[c], then the final level
    assert torch.equal(ours.sigmas[:-1], ref.sigmas[[0] + [k for k in range(1, n) for _ in (0, 1)]])
    assert ours.sigmas[-1] == ref.sigmas[-1] and ours.init_noise_sigma == ref.init_noise_sigma


def test_from_config_of_edm_schedulers_and_bdia_dispatch(tmp_path):
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    euler = EDMEulerScheduler(sigma_schedule="exponential", prediction_type="v_prediction", sigma_data=1.0)
    dpm = EDMDPMSolverMultistepScheduler(sigma_max=120.0, final_sigmas_type="zero", solver_order=3)
    for source in (euler, dpm):
        ours = BDIAEDMScheduler.from_config(source.config, gamma=0.5)
        assert ours.config.gamma == 0.5
        for key in ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "prediction_type", "rho"):
            assert ours.config[key] == source.config[key]
        via_bdia = BDIAScheduler.from_config(source.config, gamma=0.5)
        assert isinstance(via_bdia, BDIAEDMScheduler) and public(via_bdia.config) == public(ours.config)
    # the solver's own keys ride along unused (diffusers' compatibles), so switching back keeps them
    assert EDMDPMSolverMultistepScheduler.from_config(ours.config).config.solver_order == 3
    assert BDIAScheduler.from_config(DDIMScheduler().config).__class__ is BDIAScheduler
    with pytest.raises(ValueError, match="EDM config"):
        BDIAEDMScheduler.from_config(DDIMScheduler().config)
    with pytest.raises(ValueError, match="thresholding"):
        BDIAEDMScheduler.from_config(EDMDPMSolverMultistepScheduler(thresholding=True).config)
    # save_pretrained / from_pretrained (also through BDIAScheduler)
    ours = BDIAEDMScheduler.from_config(euler.config, gamma=0.8)
    ours.save_pretrained(tmp_path)
    for loader in (BDIAEDMScheduler, BDIAScheduler):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, BDIAEDMScheduler) and public(loaded.config) == public(ours.config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_injected_pair_in_half_precision_starts_a_custom_loop_at_the_lower_sample(digits, dtype):
    # neighbouring states lie within the slack that recognises a rescaled upper sample: the lower one must win
    n, scheduler = 12, BDIAEDMScheduler(gamma=0.9)
    states, _ = sample_levels(scheduler, digits, 80.0 * randn(2, *digits.shape), n)
    upper, lower = states[1].to(dtype), states[2].to(dtype)
    scheduler.set_timesteps(n)
    scheduler.set_inversion_pair(upper, lower)
    scheduler.set_begin_index(2)
    t = scheduler.timesteps[2]
    out = scheduler.step(digits(scheduler.scale_model_input(lower, t), t).sample, t, lower).prev_sample
    assert scheduler.step_index == 3 and not torch.equal(out, lower)
    scale = float(states[3].abs().max())
    assert float((out.double() - states[3]).abs().max()) < 0.05 * scale


def test_other_ve_configs_are_refused():
    # consistency models and score-SDE VE have sigma_max but label timesteps differently from EDM's log(sigma) / 4
    from diffusers import CMStochasticIterativeScheduler, ScoreSdeVeScheduler

    for source in (CMStochasticIterativeScheduler(), ScoreSdeVeScheduler()):
        named = {"_class_name": type(source).__name__, **source.config}  # as a loaded pipeline's config
        for config in (source.config, named):
            for cls in (BDIAScheduler, BDIAEDMScheduler):
                with pytest.raises(ValueError):
                    cls.from_config(config)
    with pytest.raises(ValueError):  # a loaded cosine DPM-Solver (Stable Audio) config
        BDIAScheduler.from_config({"_class_name": "CosineDPMSolverMultistepScheduler", **EDMEulerScheduler().config})
    unnamed = {k: v for k, v in EDMEulerScheduler().config.items() if not k.startswith("_")}
    assert isinstance(BDIAScheduler.from_config(unnamed), BDIAEDMScheduler)


def test_bad_arguments_raise():
    for gamma in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="gamma"):
            BDIAEDMScheduler(gamma=gamma)
    with pytest.raises(ValueError, match="prediction_type"):
        BDIAEDMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="sigma_schedule"):
        BDIAEDMScheduler(sigma_schedule="linear")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        BDIAEDMScheduler(final_sigmas_type="one")
    with pytest.raises(ValueError, match="sigma_min"):
        BDIAEDMScheduler(sigma_min=100.0)
    with pytest.raises(ValueError, match="solver"):
        BDIAEDMScheduler(solver="dpm")
    with pytest.raises(ValueError, match="rho"):
        BDIAEDMScheduler(rho=0.0)
    with pytest.raises(ValueError, match="sigmas"):
        BDIAEDMScheduler().set_timesteps(sigmas=[0.5, 0.5, 0.2])
    scheduler = BDIAEDMScheduler(gamma=0.9, solver="heun")
    x = randn(1, 2)
    with pytest.raises(ValueError, match="timestep 0.5"):  # the construction grid (as EDMEulerScheduler's) lacks it
        scheduler.step(x, 0.5, x)
    for steps in (-3, 0, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_timesteps(5, timesteps=[1.0, 0.5])
    scheduler.set_timesteps(5)
    t = scheduler.level_timesteps
    with pytest.raises(ValueError, match="first timestep"):
        scheduler.inverse_step(x, t[0], x, x, predictor_output=x)
    with pytest.raises(ValueError, match="predictor_output"):
        scheduler.inverse_step(x, t[2], x, x)
    with pytest.raises(ValueError, match="predictor_output"):
        scheduler.inverse_step(x, t[4], x, x, predictor_output=x)
    with pytest.raises(ValueError, match="gamma"):
        BDIAEDMScheduler(gamma=0.0).inverse_step(x, t[1], x, x, predictor_output=x)
    euler = BDIAEDMScheduler(gamma=0.9)
    euler.set_timesteps(5)
    assert euler.heun_predictor(x, t[2], x) is None
    with pytest.raises(ValueError, match="predictor_output"):
        euler.inverse_step(x, t[2], x, x, predictor_output=x)
    with pytest.raises(ValueError, match="lower_sample"):
        euler.inverse_step(x, t[2], x, randn(2, 2))
    scheduler.set_begin_index(1)  # a run cannot begin with a Heun corrector call
    with pytest.raises(ValueError, match="second"):
        scheduler.step(x, scheduler.timesteps[1], x)


def test_state_resets_between_runs(toy):
    scheduler = BDIAEDMScheduler(gamma=0.5, solver="heun")
    x_0 = 80.0 * randn(2, *toy.shape)
    first = sample_levels(scheduler, toy, x_0, 6)[0][-1]
    assert torch.equal(sample_levels(scheduler, toy, x_0, 6)[0][-1], first)
    # abandon a run half way (between the two calls of a Heun step): set_timesteps clears it
    scheduler.set_timesteps(6)
    x = x_0 + 0.3
    for t in scheduler.timesteps[:5]:
        x = scheduler.step(toy(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert torch.equal(sample_levels(scheduler, toy, x_0, 6)[0][-1], first)
    # an img2img-style run that begins part way makes a plain Heun first step
    heun = BDIAEDMScheduler(gamma=0.0, solver="heun")
    outs = []
    for s in (scheduler, heun):
        s.set_timesteps(6)
        s.set_begin_index(4)
        x = x_0 / 40
        for t in s.timesteps[4:6]:
            x = s.step(toy(s.scale_model_input(x, t), t).sample, t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_stable_diffusion_pipeline_with_guidance_fp32_and_fp16(solver):
    scheduler = BDIAScheduler.from_config(EDMEulerScheduler().config, gamma=0.5, solver=solver)
    pipe = tiny_stable_diffusion_pipeline(scheduler=scheduler)
    assert isinstance(pipe.scheduler, BDIAEDMScheduler)
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    a = run_tiny_stable_diffusion(pipe, num_inference_steps=4, guidance_scale=7.5)
    assert len(calls) == (7 if solver == "heun" else 4)  # Heun 2N - 1 (batched CFG: one UNet pass per call)
    b = run_tiny_stable_diffusion(pipe, num_inference_steps=4, guidance_scale=7.5)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    pipe.scheduler = BDIAEDMScheduler.from_config(pipe.scheduler.config, gamma=0.0)
    assert not np.allclose(run_tiny_stable_diffusion(pipe, num_inference_steps=4), a, atol=1e-4)
    pipe.scheduler = scheduler
    pipe.to(torch.float16)
    half = run_tiny_stable_diffusion(pipe, num_inference_steps=4, guidance_scale=7.5)
    assert np.isfinite(half).all() and np.abs(half - a).max() < 0.05
