"""Convergence order of diffusers' solvers on the exact testbed: a broken schedule or conversion fails these."""

import pytest

from diffsamplers.eval.testbed import diffusers_baselines, exact_testbed_errors, loglog_slope


@pytest.fixture(scope="module")
def records():
    # NFEs that divide 1000: DDIM steps by T // N, so other counts would not end on clean data
    return exact_testbed_errors(diffusers_baselines(), [25, 50, 100, 200], num_samples=8)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_first_order_solvers(records, sampler):
    assert 0.7 <= loglog_slope(records, sampler) <= 1.4


@pytest.mark.parametrize("sampler", ["dpmpp2m", "heun"])
def test_second_order_solvers(records, sampler):
    assert loglog_slope(records, sampler) >= 1.6


def test_dpmpp2m_beats_ddim_at_nfe_10():
    rec = exact_testbed_errors(diffusers_baselines(), [10], num_samples=8)
    err = {r["sampler"]: r["rmse_vs_gt"] for r in rec}
    assert err["dpmpp2m"] < err["ddim"]
