"""The inverse-problem bench (diffsamplers.eval.inverse_bench): budgets in model calls, validation-only tuning,
resume from its checkpoint, the claim table's pairing, and the examples figure."""

import json

import pytest
import torch

from diffsamplers.eval import inverse_bench
from diffsamplers.eval.inverse_bench import (
    claim_table,
    equal_steps_table,
    markdown_table,
    run_inverse_bench,
    score,
    split_images,
    steps_for,
    trace_term_ablation,
    write_examples,
)
from diffsamplers.pipelines.operators import BoxInpainting


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    torch.set_num_threads(1)
    checkpoint = tmp_path_factory.mktemp("bench") / "records.json"
    records = run_inverse_bench(tasks=("sr4",), budgets=(4, 16), weights=(1.0, 4.0), rhos=(1e-2,),
                                num_validation=2, num_test=2, checkpoint=str(checkpoint))
    return records, checkpoint


def test_budgets_are_model_calls_and_tuning_uses_the_validation_grid(small_run):
    records, _ = small_run
    assert [(r["method"], r["calls"]) for r in records] == [(m, b) for b in (4, 16) for m in ("dps", "psld", "stsl")]
    for r in records:
        assert r["model_calls_per_image"] == r["calls"]  # STSL's probe calls count: half the steps
        assert r["steps"] == (r["calls"] // 2 if r["method"] == "stsl" else r["calls"])
        assert [t["weight"] for t in r["validation"]] == [1.0, 4.0]
        best = max(r["validation"], key=lambda t: t["psnr_db"])
        assert (r["weight"], r["rho"]) == (best["weight"], best["rho"])
        assert r["rho"] == (1e-2 if r["method"] == "stsl" else 0.0)
        assert len(r["per_image"]["psnr_db"]) == 2 and r["vae_psnr_db"] > r["psnr_db"] - 1
    assert "| sr4 | stsl | 16 | 8 | " in markdown_table(records)


def test_a_rerun_resumes_from_the_checkpoint(small_run, monkeypatch):
    records, checkpoint = small_run
    assert len(json.loads(checkpoint.read_text())["records"]) == len(records)

    def no_solving(*args, **kwargs):
        raise AssertionError("a finished setting was recomputed")

    monkeypatch.setattr(inverse_bench, "solve", no_solving)
    again = run_inverse_bench(tasks=("sr4",), budgets=(4, 16), weights=(1.0, 4.0), rhos=(1e-2,), num_validation=2,
                              num_test=2, checkpoint=str(checkpoint))
    assert [r["psnr_db"] for r in again] == [r["psnr_db"] for r in records]
    # a checkpoint made with other settings is refused, not silently reused
    with pytest.raises(ValueError, match="other settings"):
        run_inverse_bench(tasks=("sr4",), budgets=(4, 16), weights=(1.0, 8.0), rhos=(1e-2,), num_validation=2,
                          num_test=2, checkpoint=str(checkpoint))


def test_trace_term_ablation_counts_the_estimators_calls(small_run):
    records, _ = small_run
    rows = trace_term_ablation(records, task="sr4", calls=4, rhos=(1e-2,), num_validation=2, num_test=2)
    assert [(r["estimator"], r["probes"], r["model_calls_per_image"]) for r in rows] == [
        ("none (PSLD)", 0, 4), ("forward", 1, 8), ("vjp", 4, 4)]  # the exact VJP makes no extra model calls
    assert rows[0]["gain_db"] == 0 and all(r["steps"] == 4 for r in rows)
    with pytest.raises(ValueError, match="calls=7"):
        trace_term_ablation(records, task="sr4", calls=7)


def test_validation_and_test_digits_are_disjoint():
    val, test = split_images(3, 5)
    assert val.shape == (3, 1, 16, 16) and test.shape == (5, 1, 16, 16)
    assert min(float((v - t).abs().max()) for v in val for t in test) > 0


def _record(task, method, calls, psnrs):
    return {"task": task, "method": method, "model_calls_per_image": calls, "psnr_db": sum(psnrs) / len(psnrs),
            "per_image": {"psnr_db": psnrs}, "steps": calls // 2 if method == "stsl" else calls, "rho": 0.01}


def test_claim_table_pairs_stsl_at_a_quarter_of_the_calls():
    records = [_record("box", "psld", 100, [20.0, 22.0, 24.0]), _record("box", "psld", 24, [18.0, 19.0, 20.0]),
               _record("box", "stsl", 24, [19.0, 21.5, 23.0]), _record("box", "stsl", 50, [30.0, 30.0, 30.0]),
               _record("sr4", "psld", 100, [20.0, 20.0, 20.0]), _record("sr4", "stsl", 24, [20.1, 19.9, 20.0]),
               _record("blur", "psld", 100, [20.0, 20.0, 20.0]), _record("blur", "stsl", 24, [21.0, 19.0, 20.0])]
    rows = {r["task"]: r for r in claim_table(records)}
    box = rows["box"]
    assert (box["psld_calls"], box["stsl_calls"]) == (100, 24)  # 50 calls is more than a quarter: not used
    assert box["difference_db"] == pytest.approx(-2.5 / 3, abs=1e-3) and not box["matches"]
    assert box["standard_error_db"] == pytest.approx(1 / 6, abs=1e-3)
    assert box["stsl_gain_at_equal_calls_db"] == pytest.approx(2.0 + 0.5 / 3, abs=1e-3)
    # within the 0.5 dB margin with confidence: a match; the same mean difference but noisy: not one
    assert rows["sr4"]["difference_db"] == pytest.approx(0.0) and rows["sr4"]["matches"]
    assert rows["blur"]["difference_db"] == pytest.approx(0.0) and not rows["blur"]["matches"]
    assert "psld_at_stsl_calls_psnr_db" not in rows["sr4"]
    assert not claim_table([_record("box", "psld", 24, [1.0])])


def test_equal_steps_table_pairs_the_nearest_step_count():
    records = [_record("box", "psld", 24, [18.0, 19.0]), _record("box", "psld", 100, [20.0, 22.0]),
               _record("box", "stsl", 50, [19.0, 20.0]), _record("box", "stsl", 100, [1.0, 1.0])]
    (row,) = equal_steps_table(records)  # STSL at 50 calls takes 25 steps, PSLD 24; nothing near 50 steps
    assert (row["stsl_steps"], row["psld_steps"]) == (25, 24) and row["gain_db"] == pytest.approx(1.0)


def test_score_counts_only_the_observed_pixels_of_an_inpainting():
    op = BoxInpainting(16, 8, noise_sigma=0.05)
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.measure(x, torch.Generator().manual_seed(1))
    s = score(x, x, op, y)
    assert s["psnr_db"][0] > 90 and s["ssim"][0] == pytest.approx(1.0)
    observed = 16 * 16 - 8 * 8
    expected = ((op(x) - y).flatten(1).norm(dim=1) / observed ** 0.5).tolist()
    assert s["residual"] == pytest.approx(expected, rel=1e-6)  # sigma_y-sized for the truth
    assert sum(s["residual"]) / 4 == pytest.approx(0.05, rel=0.15)


def test_examples_figure(tmp_path):
    torch.set_num_threads(1)
    path = write_examples(str(tmp_path / "examples.png"), calls=2, num_images=1)
    from PIL import Image

    assert Image.open(path).size[0] > 300


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="method"):
        steps_for("ddim", 10)
    with pytest.raises(ValueError, match="calls"):
        steps_for("stsl", 1)
    with pytest.raises(ValueError, match="tasks"):
        run_inverse_bench(tasks=("denoise",))
    with pytest.raises(ValueError, match="methods"):
        run_inverse_bench(methods=("ddim",))
    with pytest.raises(ValueError, match="budgets"):
        run_inverse_bench(budgets=(1,))
    with pytest.raises(ValueError, match="weights"):
        run_inverse_bench(weights=(-1.0,))
    with pytest.raises(ValueError, match="rhos"):
        run_inverse_bench(rhos=(0.0, 1e-2))
