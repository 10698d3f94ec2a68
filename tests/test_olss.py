"""OLSSScheduler and fit_olss: DDIM expansion, exact DDIM recovery, fit quality, state, save/load, refusals."""

import warnings

import pytest
import torch
from diffusers import DDIMPipeline, DPMSolverMultistepScheduler

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.samplers.olss import OLSSScheduler
from diffsamplers.testing import ddim_reference, float64_ddim, small_mixture
from diffsamplers.train.bank import FitModel, TrajectoryBank, build_bank, evaluate, record_trajectories, sample_loop
from diffsamplers.train.olss import fit_olss, ridge_lstsq, search_path


@pytest.fixture(scope="module")
def banks(fit_model):
    train = build_bank(fit_model, list(range(1000, 1012)), reference_steps=40, progress=False)
    test = build_bank(fit_model, list(range(2000, 2012)), reference_steps=40, progress=False)
    return train, test


def _ddim64(steps):
    return float64_ddim(TESTBED_CONFIG, steps)


def _ddim_loop(fit_model, x_T, steps):
    return ddim_reference(TESTBED_CONFIG, fit_model, x_T, steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unfitted_is_ddim_expanded_exactly(prediction_type):
    config = dict(TESTBED_CONFIG, prediction_type=prediction_type)
    gmm = small_mixture(config, prediction_type)
    fm = FitModel(gmm, config, gmm.shape, "t", dtype=torch.float64)
    x_T = torch.randn(3, *gmm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample_loop(OLSSScheduler.from_config(config), fm, x_T, 6)
    x = ddim_reference(config, fm, x_T, 6)
    assert float((ours - x).abs().max()) < 1e-10


def test_fit_recovers_ddim_exactly_from_ddim_trajectories(fit_model):
    n = 6
    x_T = torch.randn(2, *fit_model.sample_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts, states, outputs, final = record_trajectories(fit_model, _ddim64(n), x_T, n)
    bank = TrajectoryBank([0, 1], ts, states, outputs, final, {"reference": "ddim", "reference_steps": n})
    olss = fit_olss(fit_model, bank, n, path_search=False)
    new = torch.randn(4, *fit_model.sample_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    err = float((sample_loop(olss, fit_model, new) - _ddim_loop(fit_model, new, n)).abs().max())
    assert err < 1e-8
    assert olss.config.fit_info["reference"] == "ddim"


def test_training_reduces_held_out_error(fit_model, banks):
    train, test = banks
    olss = fit_olss(fit_model, train, 6)
    dpm = DPMSolverMultistepScheduler.from_config(TESTBED_CONFIG)
    ours, base = evaluate(olss, fit_model, test), evaluate(dpm, fit_model, test, 6)
    assert ours < 0.5 * base, (ours, base)
    info = olss.config.fit_info
    assert info["val_rmse"] <= min(info["val_rmse_candidates"].values()) + 1e-15
    for key in ("model", "model_hash", "resolution", "prediction_type", "reference", "reference_steps", "num_train"):
        assert info[key] is not None, key


def test_path_search_is_feasible_and_monotone(banks):
    train, _ = banks
    bounds = []
    for n in (3, 5, 8):
        path, bound = search_path(train, n, iterations=16)
        assert path[0] == 0 and len(path) <= n
        assert all(b > a for a, b in zip(path, path[1:]))
        bounds.append(bound)
    assert bounds[0] >= bounds[1] >= bounds[2]


def test_collinear_basis_gives_finite_coefficients_and_warns():
    g = torch.Generator().manual_seed(0)
    col = torch.randn(20, generator=g, dtype=torch.float64)
    basis = torch.stack([col, col, 2 * col], 1)
    with pytest.warns(UserWarning, match="ill-conditioned"):
        w, mse = ridge_lstsq(basis, 3 * col)
    assert torch.isfinite(w).all() and mse < 1e-12


@pytest.fixture(scope="module")
def fitted(fit_model, banks):
    return fit_olss(fit_model, banks[0], 5)


def test_save_load_round_trip(fitted, fit_model, tmp_path):
    fitted.save_pretrained(tmp_path)
    loaded = OLSSScheduler.from_pretrained(tmp_path)
    assert loaded.config.coef_e == fitted.config.coef_e  # ragged rows survive JSON
    assert loaded.config.fit_info == fitted.config.fit_info
    x_T = torch.randn(2, *fit_model.sample_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = sample_loop(fitted, fit_model, x_T)
    torch.testing.assert_close(sample_loop(loaded, fit_model, x_T), expected, rtol=0, atol=0)


def test_no_stale_state(fitted, fit_model):
    x_T = torch.randn(3, *fit_model.sample_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = sample_loop(fitted, fit_model, x_T)
    fitted.set_timesteps(5)  # an interrupted run: two steps only
    x = x_T[:1]
    for t in fitted.timesteps[:2]:
        x = fitted.step(fit_model(x, t), t, x).prev_sample
    assert torch.equal(sample_loop(fitted, fit_model, x_T), first)  # new run, other batch size
    assert torch.equal(sample_loop(fitted, fit_model, x_T[1:2]), first[1:2])


def test_manual_diffusers_loop_equals_direct_solver(fitted, fit_model):
    gmm = fit_model.denoiser
    pipe = DDIMPipeline(unet=gmm, scheduler=fitted)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(2, *gmm.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    coef_x, coef_e = fitted.coefficients()
    fitted.set_timesteps(5)
    outputs, x = [], x_T
    for i, t in enumerate(fitted.timesteps):  # the OLSS formula written out
        outputs.append(fit_model(x, t))
        x = coef_x[i] * x_T + sum(w * e for w, e in zip(coef_e[i], outputs))
    # the pipeline's own loop (sets its timesteps, eta = 0, output_type numpy)
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np", eta=0.0,
                  generator=[torch.Generator().manual_seed(0)] * 2)
    assert images.images.shape[0] == 2
    direct = sample_loop(fitted, fit_model, x_T)
    assert float((direct - x).abs().max()) < 1e-12


def test_refuses_other_step_counts_grids_and_img2img(fitted):
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        fitted.set_timesteps(7)
    with pytest.raises(ValueError, match="custom timesteps"):
        fitted.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="img2img"):
        fitted.set_begin_index(2)
    fitted.set_timesteps(None)
    assert len(fitted.timesteps) == 5
    with pytest.raises(ValueError, match="eta"):
        fitted.step(torch.zeros(1, 1, 4, 4), fitted.timesteps[0], torch.zeros(1, 1, 4, 4), eta=0.5)


def test_warns_at_another_resolution_or_guidance(fitted):
    fitted.set_timesteps(5)
    with pytest.warns(UserWarning, match="resolution"):
        fitted.step(torch.zeros(1, 1, 16, 16), fitted.timesteps[0], torch.zeros(1, 1, 16, 16))
    with pytest.warns(UserWarning, match="guidance_scale"):
        OLSSScheduler.from_config(fitted.config, fit_info=dict(fitted.config.fit_info, guidance_scale=7.5)).check_fit(
            guidance_scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted.check_fit(resolution=(4, 4))


def test_bad_coefficients_are_refused():
    with pytest.raises(ValueError, match="coef_e row 1"):
        OLSSScheduler(solver_timesteps=[999, 500], coef_x=[1.0, 1.0], coef_e=[[0.1], [0.2]])
    with pytest.raises(ValueError, match="give all"):
        OLSSScheduler(solver_timesteps=[999])
    with pytest.raises(TypeError, match="fit_info"):
        OLSSScheduler(fit_info=[1])
