"""BNSScheduler and train_bns: Euler = DDIM reduction, the NS recursion, fitting, state, save/load, refusals."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.samplers.bns import BNSScheduler, euler_coefficients
from diffsamplers.schedule import ot_velocity
from diffsamplers.testing import ddim_reference, small_mixture
from diffsamplers.train.bank import FitModel, build_bank, evaluate, sample_loop
from diffsamplers.train.bns import fit_bns_weights, train_bns


@pytest.fixture(scope="module")
def banks(fit_model):
    return [build_bank(fit_model, list(range(base, base + count)), reference_steps=40, progress=False)
            for base, count in ((1000, 64), (1500, 64), (2000, 128))]


def _noise(n, shape, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_unfitted_is_ddim(prediction_type, spacing):
    config = dict(TESTBED_CONFIG, prediction_type=prediction_type, timestep_spacing=spacing)
    gmm = small_mixture(config, prediction_type)
    fm = FitModel(gmm, config, gmm.shape, "t", dtype=torch.float64)
    x_T = _noise(3, gmm.shape)
    ours = sample_loop(BNSScheduler.from_config(config), fm, x_T, 6)
    x = ddim_reference(config, fm, x_T, 6)
    assert float((ours - x).abs().max()) < 1e-10


def test_fitted_step_is_the_ns_recursion(fit_model):
    """y_{i+1} = a_i y_0 + sum_j b_ij u_j in OT coordinates, written out by hand (arXiv 2403.01329, Prop. 3.1)."""
    tau = [0.02, 0.2, 0.55, 1.0]
    a = [0.9, 1.1, 0.95]
    b = [[0.2], [0.1, 0.25], [0.05, -0.1, 0.5]]
    scheduler = BNSScheduler.from_config(TESTBED_CONFIG, num_steps=3, t=tau, a=a, b=b)
    x_T = _noise(2, fit_model.sample_shape, 1)
    ours = sample_loop(scheduler, fit_model, x_T)
    alpha, sigma = scheduler._alpha, scheduler._sigma
    assert torch.allclose(alpha / (alpha + sigma), torch.tensor(tau, dtype=torch.float64), atol=1e-12)
    x, y0, us = x_T, None, []
    for i in range(3):
        y, u = ot_velocity(fit_model(x, scheduler.timesteps[i]), x, float(alpha[i]), float(sigma[i]), "epsilon")
        y0 = y if y0 is None else y0
        us.append(u)
        x = (a[i] * y0 + sum(w * v for w, v in zip(b[i], us))) * float(alpha[i + 1] + sigma[i + 1])
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)


def test_least_squares_weights_at_euler_times_beat_euler(fit_model, banks):
    """The closed-loop fit starts from nothing but must do at least as well as the Euler (= DDIM) weights it can
    represent, on the bank it is fitted to."""
    base = BNSScheduler.from_config(TESTBED_CONFIG)
    base.set_timesteps(4)
    tau = base.ot_times()
    a, b, final = fit_bns_weights(fit_model, banks[0], tau)
    euler = evaluate(BNSScheduler.from_config(TESTBED_CONFIG), fit_model, banks[0], 4)
    fitted = BNSScheduler.from_config(TESTBED_CONFIG, num_steps=4, t=tau, a=a, b=b)
    assert evaluate(fitted, fit_model, banks[0]) < euler
    torch.testing.assert_close(sample_loop(fitted, fit_model, banks[0].x_T), final, rtol=0, atol=1e-10)
    ea, eb = euler_coefficients(tau)
    assert ea == [1.0] * 4 and eb[3] == [t1 - t0 for t0, t1 in zip(tau, tau[1:])]


@pytest.fixture(scope="module")
def fitted(fit_model, banks):
    return train_bns(fit_model, banks[0], 4, val_bank=banks[1], iterations=30, refine_iterations=30, progress=False)


def test_training_reduces_held_out_error(fit_model, banks, fitted):
    test = banks[2]
    ddim = evaluate(BNSScheduler.from_config(TESTBED_CONFIG), fit_model, test, 4)
    assert evaluate(fitted, fit_model, test) < 0.5 * ddim
    info = fitted.config.fit_info
    assert info["method"] == "bns" and info["val_rmse"] <= info["val_rmse_times_stage"] < info["val_rmse_initial"]
    assert info["model"] == "testbed:small" and info["nfe"] == 4
    n = 4  # parameter count of the paper's Sec. 3: n - 1 interior times, n weights a, n (n + 1) / 2 weights b
    assert len(fitted.config.t) - 2 + len(fitted.config.a) + sum(map(len, fitted.config.b)) == n * (n + 5) // 2 - 1


def test_train_resume(fit_model, banks, tmp_path):
    kwargs = dict(val_bank=banks[1], progress=False, val_every=5, refine_iterations=0)
    train_bns(fit_model, banks[0], 3, iterations=10, checkpoint=tmp_path / "fit", **kwargs)
    resumed = train_bns(fit_model, banks[0], 3, iterations=20, checkpoint=tmp_path / "fit", **kwargs)
    again = train_bns(fit_model, banks[0], 3, iterations=20, checkpoint=tmp_path / "fit", **kwargs)
    assert again.config.t == resumed.config.t  # the budget is spent: nothing reruns
    assert resumed.config.fit_info["val_rmse"] <= resumed.config.fit_info["val_rmse_initial"]


def test_train_arguments_are_checked(fit_model, banks):
    with pytest.raises(ValueError, match="nfe"):
        train_bns(fit_model, banks[0], 0, progress=False)
    with pytest.raises(ValueError, match="refine_iterations"):
        train_bns(fit_model, banks[0], 3, refine_iterations=-1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_bns(fit_model, banks[0], 3, lr=0.0, progress=False)


def test_config_is_checked():
    with pytest.raises(ValueError, match="give all"):
        BNSScheduler(num_steps=2, t=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="row 1"):
        BNSScheduler(num_steps=2, t=[0.1, 0.5, 1.0], a=[1.0, 1.0], b=[[0.4], [0.4]])
    with pytest.raises(ValueError, match="increasing"):
        BNSScheduler(num_steps=2, t=[0.1, 0.05, 1.0], a=[1.0, 1.0], b=[[0.4], [0.4, 0.5]])
    with pytest.raises(ValueError, match="finite"):
        BNSScheduler(num_steps=1, t=[0.1, 1.0], a=[float("nan")], b=[[0.9]])


def test_save_load_round_trip(fitted, fit_model, tmp_path):
    fitted.save_pretrained(tmp_path)
    loaded = BNSScheduler.from_pretrained(tmp_path)
    assert loaded.config.b == fitted.config.b and loaded.config.fit_info == fitted.config.fit_info
    x_T = _noise(2, fit_model.sample_shape, 3)
    assert torch.equal(sample_loop(loaded, fit_model, x_T), sample_loop(fitted, fit_model, x_T))


def test_no_stale_state_and_pipeline_loop(fitted, fit_model):
    x_T = _noise(3, fit_model.sample_shape, 4)
    first = sample_loop(fitted, fit_model, x_T)
    fitted.set_timesteps(4)  # an interrupted run
    t = fitted.timesteps[0]
    fitted.step(fit_model(x_T[:1], t), t, x_T[:1])
    assert torch.equal(sample_loop(fitted, fit_model, x_T), first)
    assert torch.equal(sample_loop(fitted, fit_model, x_T[1:2]), first[1:2])
    pipe = DDIMPipeline(unet=fit_model.denoiser, scheduler=fitted)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=4, output_type="np", eta=0.0)
    assert np.isfinite(out.images).all()


def test_refuses_other_step_counts_grids_img2img_and_eta(fitted, fit_model):
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        fitted.set_timesteps(7)
    with pytest.raises(ValueError, match="custom timesteps"):
        fitted.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="img2img"):
        fitted.set_begin_index(1)
    fitted.set_timesteps(4)
    t = fitted.timesteps[0]
    x = _noise(1, fit_model.sample_shape)
    with pytest.raises(ValueError, match="eta"):
        fitted.step(fit_model(x, t), t, x, eta=0.5)
