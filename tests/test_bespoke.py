"""BespokeScheduler and train_bespoke: DDIM / midpoint reductions, convergence order, fitting, state, save/load,
refusals (spec tests B1, B2, B4, B6, B8, B9)."""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.models import GaussianMixtureModel
from diffsamplers.samplers.bespoke import BespokeScheduler, ot_velocity
from diffsamplers.testing import ddim_reference, small_mixture
from diffsamplers.train.bank import FitModel, build_bank, evaluate, sample_loop
from diffsamplers.train.bespoke import _initial, _params, bound_loss, train_bespoke


@pytest.fixture(scope="module")
def banks(fit_model):
    train = build_bank(fit_model, list(range(1000, 1012)), reference_steps=40, progress=False)
    val = build_bank(fit_model, list(range(1500, 1512)), reference_steps=40, progress=False)
    test = build_bank(fit_model, list(range(2000, 2016)), reference_steps=40, progress=False)
    return train, val, test


def _noise(n, shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unfitted_rk1_is_ddim(prediction_type):
    config = dict(TESTBED_CONFIG, prediction_type=prediction_type)
    gmm = small_mixture(config, prediction_type)
    fm = FitModel(gmm, config, gmm.shape, "t", dtype=torch.float64)
    x_T = _noise(3, gmm.shape)
    ours = sample_loop(BespokeScheduler.from_config(config, solver_type="rk1"), fm, x_T, 6)
    x = ddim_reference(config, fm, x_T, 6)
    assert float((ours - x).abs().max()) < 1e-10


def test_unfitted_rk2_is_the_ot_midpoint_rule(fit_model):
    x_T = _noise(3, fit_model.sample_shape, 1)
    scheduler = BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk2")
    ours = sample_loop(scheduler, fit_model, x_T, 4)
    assert len(scheduler.timesteps) == 8 and scheduler.order == 2
    # the midpoint rule written out in OT coordinates (tau = alpha / (alpha + sigma), y = x / (alpha + sigma))
    alpha, sigma = scheduler._alpha, scheduler._sigma
    tau = (alpha / (alpha + sigma)).tolist()
    x = x_T.clone()
    for i in range(4):
        t0, t1 = tau[2 * i], tau[2 * i + 2]
        a, s = float(alpha[2 * i]), float(sigma[2 * i])
        y, u = ot_velocity(fit_model(x, scheduler.timesteps[2 * i]), x, a, s, "epsilon")
        y_mid = y + 0.5 * (t1 - t0) * u
        am, sm = float(alpha[2 * i + 1]), float(sigma[2 * i + 1])
        assert math.isclose(tau[2 * i + 1], 0.5 * (t0 + t1), rel_tol=1e-12)
        x_mid = y_mid * (am + sm)
        _, u_mid = ot_velocity(fit_model(x_mid, scheduler.timesteps[2 * i + 1]), x_mid, am, sm, "epsilon")
        an, sn = float(alpha[2 * i + 2]), float(sigma[2 * i + 2])
        x = (y + (t1 - t0) * u_mid) * (an + sn)
    assert float((ours - x).abs().max()) < 1e-12


def test_identity_parameters_reduce_to_euler_and_midpoint(fit_model):
    """Fitted-form parameters at the identity (s = 1, s_dot = 0, t_dot = the gaps) equal the unfitted solvers."""
    x_T = _noise(2, fit_model.sample_shape, 2)
    for solver_type in ("rk1", "rk2"):
        tau, t_dot = _initial(dict(TESTBED_CONFIG), solver_type, 4)
        m = len(t_dot)
        fitted = BespokeScheduler.from_config(TESTBED_CONFIG, solver_type=solver_type, num_steps=4, t=tau,
                                              t_dot=t_dot, s=[1.0] * (m + 1), s_dot=[0.0] * m)
        unfitted = BespokeScheduler.from_config(TESTBED_CONFIG, solver_type=solver_type)
        a, b = sample_loop(fitted, fit_model, x_T), sample_loop(unfitted, fit_model, x_T, 4)
        assert float((a - b).abs().max()) < 1e-10, solver_type


def _smooth(solver_type, n, tau0):
    """Fixed non-trivial smooth scale-time parameters with exact derivatives on ``r_j = j / m``."""
    m = n * (2 if solver_type == "rk2" else 1)
    r = np.linspace(0.0, 1.0, m + 1)
    # t_r = tau0 + (1 - tau0) (r + 0.4 r (1 - r)); s_r = 1 + 0.5 r(1 - r) + 0.3 r (s_1 = 1.3)
    t = tau0 + (1 - tau0) * (r + 0.4 * r * (1 - r))
    t_dot = (1 - tau0) * (1 + 0.4 * (1 - 2 * r))
    s = 1 + 0.5 * r * (1 - r) + 0.3 * r
    s_dot = 0.5 * (1 - 2 * r) + 0.3
    return dict(num_steps=n, t=t.tolist(), t_dot=t_dot[:-1].tolist(), s=s.tolist(), s_dot=s_dot[:-1].tolist())


@pytest.fixture(scope="module")
def smooth_reference(fit_model):
    x_T = _noise(2, fit_model.sample_shape, 6)
    tau0 = _initial(dict(TESTBED_CONFIG), "rk1", 4)[0][0]

    def solve(kind, n):
        return sample_loop(BespokeScheduler.from_config(TESTBED_CONFIG, solver_type=kind, **_smooth(kind, n, tau0)),
                           fit_model, x_T)

    # every member of the family solves the same ODE (Thm 2.3): a fine RK2 solve of it is the reference
    return solve, solve("rk2", 512)


@pytest.mark.parametrize(("solver_type", "order", "steps"), [("rk1", 1, (64, 128, 256)), ("rk2", 2, (32, 64, 128))])
def test_convergence_order_of_fixed_smooth_parameters(fit_model, smooth_reference, solver_type, order, steps):
    solve, reference = smooth_reference
    errors = [float((solve(solver_type, n) - reference).pow(2).mean().sqrt()) for n in steps]
    slopes = -np.diff(np.log(errors)) / math.log(2)
    assert abs(slopes[-1] - order) < 0.3, (errors, slopes)


@pytest.fixture(scope="module")
def fitted(fit_model, banks):
    return train_bespoke(fit_model, banks[0], 4, solver_type="rk2", val_bank=banks[1], iterations=60, progress=False)


def test_training_reduces_held_out_error(fit_model, banks, fitted):
    test = banks[2]
    midpoint = evaluate(BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk2"), fit_model, test, 2)
    euler = evaluate(BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk1"), fit_model, test, 4)
    ours = evaluate(fitted, fit_model, test)
    assert ours < 0.8 * midpoint and ours < euler, (ours, midpoint, euler)
    info = fitted.config.fit_info
    assert info["method"] == "bespoke:rk2" and info["val_rmse"] <= info["val_rmse_initial"]
    assert info["model"] == "testbed:small" and info["nfe"] == 4


def test_train_resume_gives_the_same_result(fit_model, banks, tmp_path):
    checkpoint = tmp_path / "fit.json"
    kwargs = dict(solver_type="rk1", val_bank=banks[1], progress=False, val_every=5)
    full = train_bespoke(fit_model, banks[0], 3, iterations=20, **kwargs)
    train_bespoke(fit_model, banks[0], 3, iterations=10, checkpoint=checkpoint, **kwargs)
    resumed = train_bespoke(fit_model, banks[0], 3, iterations=20, checkpoint=checkpoint, **kwargs)
    again = train_bespoke(fit_model, banks[0], 3, iterations=20, checkpoint=checkpoint, **kwargs)
    assert resumed.config.fit_info["val_rmse"] <= full.config.fit_info["val_rmse_initial"]
    assert again.config.t == resumed.config.t and again.config.s == resumed.config.s  # the budget is spent


def _gaussian_fit_model(std=0.5):
    gmm = GaussianMixtureModel(torch.zeros(1, 1, 4, 4), torch.tensor([std]), scheduler_config=TESTBED_CONFIG)
    return FitModel(gmm, dict(TESTBED_CONFIG), gmm.shape, "gaussian", exact=gmm, dtype=torch.float64)


def _random_solver(solver_type, nfe, seed, spread=0.4):
    n = nfe // 2 if solver_type == "rk2" else nfe
    tau0, t_dot0 = _initial(dict(TESTBED_CONFIG), solver_type, n)
    theta = np.random.default_rng(seed).normal(0.0, spread, 4 * len(t_dot0))
    return BespokeScheduler.from_config(TESTBED_CONFIG, solver_type=solver_type, num_steps=n,
                                        **_params(theta, tau0, t_dot0))


def _per_sample_error(scheduler, model, bank):
    return (sample_loop(scheduler, model, bank.x_T) - bank.final).reshape(len(bank), -1).pow(2).mean(1).sqrt()


@pytest.mark.parametrize("solver_type", ["rk1", "rk2"])
def test_bound_dominates_the_global_error(solver_type):
    """Spec B5: for Gaussian data N(0, c^2 I) the OT velocity is ``(tau c^2 - (1 - tau)) / v(tau) y`` with
    ``v = tau^2 c^2 + (1 - tau)^2``; with ``L_tau`` its sup over the path the bound holds for every sample."""
    model = _gaussian_fit_model(0.5)
    bank = build_bank(model, list(range(3000, 3008)), reference_steps=400, progress=False)
    tau = np.linspace(0.0, 1.0, 100001)
    c2 = 0.25
    lipschitz = float(np.max(np.abs(tau * c2 - (1 - tau)) / (tau**2 * c2 + (1 - tau) ** 2))) * 1.001
    for seed in range(4):
        scheduler = _random_solver(solver_type, 4, seed)
        bound = bound_loss(scheduler, model, bank, lipschitz)
        error = _per_sample_error(scheduler, model, bank)
        assert bool((bound >= error).all()), (seed, bound, error)
        assert float(error.mean()) > 1e-3  # a solver far from exact: the check is not vacuous


@pytest.mark.parametrize(("solver_type", "nfe"), [("rk1", 1), ("rk2", 2)])
def test_one_step_bound_is_the_global_error(fit_model, banks, solver_type, nfe):
    """With one step the only local error starts at x_T, on the path: the bound equals the global error exactly
    (checks the reference points at both ends and the step the bound replays)."""
    scheduler = _random_solver(solver_type, nfe, 7)
    bound = bound_loss(scheduler, fit_model, banks[0])
    torch.testing.assert_close(bound, _per_sample_error(scheduler, fit_model, banks[0]), rtol=1e-10, atol=1e-12)


def test_training_on_the_bound_reduces_held_out_error(fit_model, banks):
    fitted = train_bespoke(fit_model, banks[0], 4, solver_type="rk1", loss="bound", val_bank=banks[1],
                           iterations=40, progress=False)
    start = evaluate(BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk1"), fit_model, banks[2], 4)
    assert evaluate(fitted, fit_model, banks[2]) < start
    assert fitted.config.fit_info["loss"] == "bound" and fitted.config.fit_info["lipschitz"] == 1.0


def test_train_arguments_are_checked(fit_model, banks):
    with pytest.raises(ValueError, match="nfe must be even"):
        train_bespoke(fit_model, banks[0], 5, solver_type="rk2", progress=False)
    with pytest.raises(ValueError, match="solver_type"):
        train_bespoke(fit_model, banks[0], 4, solver_type="rk3", progress=False)
    with pytest.raises(ValueError, match="loss"):
        train_bespoke(fit_model, banks[0], 4, loss="l1", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_bespoke(fit_model, banks[0], 4, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="lipschitz"):
        train_bespoke(fit_model, banks[0], 4, loss="bound", lipschitz=0.0, progress=False)


def test_save_load_round_trip(fitted, fit_model, tmp_path):
    fitted.save_pretrained(tmp_path)
    loaded = BespokeScheduler.from_pretrained(tmp_path)
    assert loaded.config.t == fitted.config.t and loaded.config.fit_info == fitted.config.fit_info
    x_T = _noise(2, fit_model.sample_shape, 3)
    torch.testing.assert_close(sample_loop(loaded, fit_model, x_T), sample_loop(fitted, fit_model, x_T), rtol=0,
                               atol=0)


def test_no_stale_state(fitted, fit_model):
    x_T = _noise(3, fit_model.sample_shape, 4)
    first = sample_loop(fitted, fit_model, x_T)
    fitted.set_timesteps(2)  # an interrupted run: one stage only
    x = x_T[:1]
    t = fitted.timesteps[0]
    fitted.step(fit_model(x, t), t, x)
    assert torch.equal(sample_loop(fitted, fit_model, x_T), first)  # new run, other batch size
    assert torch.equal(sample_loop(fitted, fit_model, x_T[1:2]), first[1:2])


def test_manual_diffusers_loop_equals_direct_solver(fitted, fit_model):
    gmm = fit_model.denoiser
    pipe = DDIMPipeline(unet=gmm, scheduler=fitted)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np", eta=0.0,
                  generator=[torch.Generator().manual_seed(0)] * 2)
    assert images.images.shape[0] == 2
    x_T = _noise(2, gmm.shape, 5)
    fitted.set_timesteps(2)
    assert len(fitted.timesteps) == 4
    x = x_T.clone()
    for t in fitted.timesteps:
        x = fitted.step(fit_model(fitted.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.equal(sample_loop(fitted, fit_model, x_T), x)


def test_refuses_other_step_counts_grids_and_img2img(fitted):
    with pytest.raises(ValueError, match="num_inference_steps=2"):
        fitted.set_timesteps(7)
    with pytest.raises(ValueError, match="custom timesteps"):
        fitted.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="img2img"):
        fitted.set_begin_index(2)
    unfitted = BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk2")
    unfitted.set_timesteps(4)
    with pytest.raises(ValueError, match="img2img"):
        unfitted.set_begin_index(3)  # an RK2 slice must start on a first stage
    unfitted.set_begin_index(2)
    fitted.set_timesteps(None)
    with pytest.raises(ValueError, match="eta"):
        fitted.step(torch.zeros(1, 1, 4, 4), fitted.timesteps[0], torch.zeros(1, 1, 4, 4), eta=0.5)


def test_warns_at_another_resolution_or_guidance(fitted):
    fitted.set_timesteps(2)
    with pytest.warns(UserWarning, match="resolution"):
        fitted.step(torch.zeros(1, 1, 16, 16), fitted.timesteps[0], torch.zeros(1, 1, 16, 16))
    with pytest.warns(UserWarning, match="guidance_scale"):
        info = dict(fitted.config.fit_info, guidance_scale=7.5)
        BespokeScheduler.from_config(fitted.config, fit_info=info).check_fit(guidance_scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted.check_fit(resolution=tuple(fitted.config.fit_info["resolution"]))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="give all"):
        BespokeScheduler(num_steps=2)
    with pytest.raises(ValueError, match="t must have 3"):
        BespokeScheduler(solver_type="rk1", num_steps=2, t=[0.1, 1.0], t_dot=[1, 1], s=[1, 1, 1], s_dot=[0, 0])
    with pytest.raises(ValueError, match="increasing"):
        BespokeScheduler(solver_type="rk1", num_steps=2, t=[0.1, 0.05, 1.0], t_dot=[1, 1], s=[1, 1, 1], s_dot=[0, 0])
    with pytest.raises(ValueError, match="solver_type"):
        BespokeScheduler(solver_type="rk4")


@pytest.mark.parametrize("steps", [4, 250, 999])
def test_rk2_stages_are_at_the_levels_the_model_sees(steps):
    """Every stage's (alpha, sigma) is the level of the timestep the model is given: on a fine grid the last
    midpoint would otherwise fall past timestep 0, and the model would be evaluated at another level."""
    scheduler = BespokeScheduler.from_config(TESTBED_CONFIG, solver_type="rk2")
    scheduler.set_timesteps(steps)
    g = scheduler.stage_grid()
    alpha, sigma = scheduler.noise_schedule.alpha_sigma(g["timesteps"].double())
    # 1e-7: the stage timesteps are float32, as pipelines pass them to the model
    torch.testing.assert_close(g["alpha"][:-1], alpha, rtol=0, atol=1e-7)
    torch.testing.assert_close(g["sigma"][:-1], sigma, rtol=0, atol=1e-7)
