"""`diffsamplers fit` and the fitted bench entries, on the exact testbed with tiny banks."""

import json

import pytest

from diffsamplers import BespokeScheduler, BNSScheduler, LearnedTimestepsScheduler, OLSSScheduler
from diffsamplers.eval.cli import main

TINY = ["--num-train", "6", "--num-val", "4", "--reference-steps", "40", "--no-progress"]


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffsamplers: error: "), lines
    return lines[0]


@pytest.fixture
def small_testbed(monkeypatch):
    """``--model testbed`` fits the six-component mixture (exact references in milliseconds, not seconds)."""

    from diffsamplers.testing import small_fit_model
    from diffsamplers.train import fit_cli

    real = fit_cli.load_fit_model

    def load(model, device="cpu"):
        return small_fit_model("testbed:digits") if model == "testbed" else real(model, device)

    monkeypatch.setattr(fit_cli, "load_fit_model", load)


def test_the_testbed_and_the_bundled_model_load_for_fitting():
    from diffsamplers.train.fit_cli import load_fit_model

    testbed, digits = load_fit_model("testbed"), load_fit_model("digits")
    assert testbed.exact is not None and testbed.sample_shape == (1, 8, 8)
    assert digits.exact is None and digits.sample_shape == (1, 8, 8)
    # the bench's sampling config: every solver starts from pure noise, no x0 clipping
    for model in (testbed, digits):
        assert model.scheduler_config["timestep_spacing"] == "trailing" and not model.scheduler_config["clip_sample"]


@pytest.mark.parametrize("method, cls", [("olss", OLSSScheduler), ("timesteps", LearnedTimestepsScheduler),
                                         ("bespoke", BespokeScheduler), ("bns", BNSScheduler)])
def test_fit_writes_a_scheduler_that_loads_with_from_pretrained(method, cls, tmp_path, capsys, small_testbed):
    out = tmp_path / method
    argv = ["fit", method, "--model", "testbed", "--nfe", "3", "--iterations", "5", "--refine-iterations", "5",
            "--solver-type", "rk1", "--out", str(out), *TINY]
    assert main(argv) == 0
    assert f"{cls.__name__}.from_pretrained" in capsys.readouterr().out
    scheduler = cls.from_pretrained(out)
    info = scheduler.config.fit_info
    assert info["model"] == "testbed:digits" and info["reference"] == "exact" and info["num_train"] == 6
    scheduler.set_timesteps(3)
    assert len(scheduler.timesteps) == 3
    assert list((out / "banks").glob("bank-*.safetensors"))  # the references are cached for the next fit
    # a second fit into the same folder is refused unless asked for
    assert main(argv) == 2
    assert "--overwrite" in one_line_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["olss", "--nfe", "0"], "--nfe"),
    (["olss", "--nfe", "3", "--num-train", "0"], "--num-train"),
    (["olss", "--nfe", "3", "--model", "/nonexistent"], "--model"),
    (["bespoke", "--nfe", "3"], "--solver-type rk2"),
    (["bns", "--nfe", "3", "--refine-iterations", "-1"], "--refine-iterations"),
    (["heun", "--nfe", "3"], "argument method"),
])
def test_fit_mistakes_get_one_line(args, message, tmp_path, capsys):
    assert main(["fit", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys)


def test_fitted_bench_entries_are_cached_and_avoid_the_bench_seeds(tmp_path, monkeypatch):
    from diffsamplers.eval import learned
    from diffsamplers.eval.testbed import TESTBED_CONFIG, testbed_bench_model
    from diffsamplers.testing import small_mixture

    monkeypatch.setenv("DIFFSAMPLERS_CACHE", str(tmp_path))
    monkeypatch.setattr(learned, "FIT_SETTINGS", dict(num_train=6, num_val=4, reference_steps=40, iterations=5))
    model = testbed_bench_model(small_mixture(), TESTBED_CONFIG)
    fit = learned.learned_sampler_specs()["olss"].fit
    first = fit(model, 3, list(range(8)))
    banks = sorted((tmp_path / "fits" / "banks").glob("*"))
    second = fit(model, 3, list(range(8)))
    assert sorted((tmp_path / "fits" / "banks").glob("*")) == banks
    assert json.dumps(second.config.coef_e) == json.dumps(first.config.coef_e)
    assert second.config.fit_info["fit_seconds"] == first.config.fit_info["fit_seconds"]
    with pytest.raises(ValueError, match="overlap"):  # bench seeds inside the fitting range are refused
        fit(model, 4, [1_000_000])


def test_bespoke_and_bns_bench_entries_fit_per_budget(tmp_path, monkeypatch):
    from diffsamplers.eval import learned
    from diffsamplers.eval.testbed import TESTBED_CONFIG, exact_testbed_errors, testbed_bench_model
    from diffsamplers.testing import small_mixture

    monkeypatch.setenv("DIFFSAMPLERS_CACHE", str(tmp_path))
    monkeypatch.setattr(learned, "FIT_SETTINGS", dict(num_train=6, num_val=4, reference_steps=40, iterations=3))
    model = testbed_bench_model(small_mixture(), TESTBED_CONFIG)
    specs = learned.learned_sampler_specs()
    odd, even = specs["bespoke"].fit(model, 3, list(range(8))), specs["bespoke"].fit(model, 4, list(range(8)))
    assert (odd.config.solver_type, even.config.solver_type) == ("rk1", "rk2")  # RK2 needs two calls per step
    assert (specs["bespoke"].steps_for_nfe(3), specs["bespoke"].steps_for_nfe(4)) == (3, 2)
    records = exact_testbed_errors({"bespoke": specs["bespoke"]}, [4], model=small_mixture(), num_samples=4)
    assert records[0]["nfe"] == 4 and records[0]["steps"] == 2
    bns = specs["bns"].fit(model, 3, list(range(8)))
    assert isinstance(bns, BNSScheduler) and bns.config.num_steps == 3
    assert isinstance(specs["bns"].fit(model, 3, list(range(8))), BNSScheduler)  # from the cache
