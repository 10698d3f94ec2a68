"""Learned time grids for diffusers' own solvers: the fit helps on held-out noise, saves, reloads and resumes."""

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffsamplers.eval.testbed import TESTBED_CONFIG
from diffsamplers.samplers.learned_timesteps import LearnedTimestepsScheduler
from diffsamplers.train.bank import build_bank, evaluate, sample_loop
from diffsamplers.train.timegrid import _timesteps_from_theta, base_scheduler, fit_timesteps, load_learned_grid


@pytest.fixture(scope="module")
def banks(fit_model):
    return [build_bank(fit_model, list(range(start, start + n)), reference_steps=40, progress=False)
            for start, n in ((1000, 64), (2000, 32), (3000, 64))]


@pytest.mark.parametrize("base", ["dpmpp2m", "ddim"])
def test_the_learned_grid_lowers_the_held_out_error(fit_model, banks, base):
    train, val, test = banks
    grid = fit_timesteps(fit_model, train, 4, base=base, val_bank=val, iterations=60, progress=False)
    assert len(grid.timesteps) == 4 and grid.timesteps[0] == 999
    assert all(a > b >= 0 for a, b in zip(grid.timesteps, grid.timesteps[1:]))
    plain = evaluate(base_scheduler(base, fit_model.scheduler_config), fit_model, test, 4)
    learned = evaluate(base_scheduler(base, fit_model.scheduler_config), fit_model, test, None,
                       timesteps=grid.timesteps)
    assert learned < 0.95 * plain
    assert grid.fit_info["val_rmse"] < grid.fit_info["val_rmse_initial"]
    assert grid.fit_info["method"] == f"timesteps:{base}" and grid.fit_info["reference"] == "exact"


def test_saved_grid_loads_with_from_pretrained(fit_model, banks, tmp_path):
    train, val, _ = banks
    grid = fit_timesteps(fit_model, train, 4, val_bank=val, iterations=10, progress=False)
    grid.save(tmp_path)
    loaded = LearnedTimestepsScheduler.from_pretrained(tmp_path)
    assert loaded.config.learned_timesteps == grid.timesteps and loaded.config.fit_info["num_train"] == 64
    scheduler, timesteps = load_learned_grid(tmp_path)
    assert timesteps == grid.timesteps and scheduler.config.algorithm_type == "dpmsolver++"
    # what a pipeline calls runs the learned grid; diffusers' own scheduler with timesteps= gives the same samples
    loaded.set_timesteps(len(timesteps))
    assert loaded.timesteps.tolist() == grid.timesteps
    x_T = banks[1].x_T[:4]
    plain = DPMSolverMultistepScheduler.from_config(TESTBED_CONFIG, algorithm_type="dpmsolver++")
    assert torch.equal(sample_loop(loaded, fit_model, x_T, len(timesteps)),
                       sample_loop(plain, fit_model, x_T, None, timesteps=timesteps))
    with pytest.warns(UserWarning, match="fitted for 4 steps"):
        loaded.set_timesteps(6)
    assert len(loaded.timesteps) == 6
    with pytest.raises(ValueError, match="learned_timesteps"):
        LearnedTimestepsScheduler.from_config(TESTBED_CONFIG, learned_timesteps=[10, 500])


def test_an_interrupted_fit_resumes_from_its_checkpoint(fit_model, banks, tmp_path):
    train, val, _ = banks
    checkpoint = tmp_path / "grid.json"
    first = fit_timesteps(fit_model, train, 4, val_bank=val, iterations=20, checkpoint=checkpoint, progress=False)
    saved = json.loads(checkpoint.read_text())
    assert saved["iteration"] >= 20 and saved["nfe"] == 4
    # asking again for no more iterations than were done returns the checkpoint's best iterate without work
    again = fit_timesteps(fit_model, train, 4, val_bank=val, iterations=20, checkpoint=checkpoint, progress=False)
    assert again.timesteps == first.timesteps
    more = fit_timesteps(fit_model, train, 4, val_bank=val, iterations=40, checkpoint=checkpoint, progress=False)
    assert more.fit_info["val_rmse"] <= first.fit_info["val_rmse"]


def test_grids_from_any_parameters_are_valid():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 20, 200):
        for scale in (0.1, 3.0, 30.0):
            ts = _timesteps_from_theta(rng.normal(size=n) * scale, 999)
            assert len(ts) == n and ts[0] == 999 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(nfe=0), "nfe"), (dict(nfe=True), "nfe"), (dict(nfe=4, base="unipc"), "UniPC"),
    (dict(nfe=4, base="heun"), "base"),
])
def test_bad_input_is_refused(fit_model, banks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_timesteps(fit_model, banks[0], progress=False, **kwargs)
