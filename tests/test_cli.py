"""The `diffsamplers bench` command on the exact testbed."""

import json
import os

import pytest

from diffsamplers.eval.cli import main


def test_bench_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["bench", "--model", "testbed", "--samplers", "ddim,dpmpp2m", "--nfe", "5,10", "--num-samples", "4",
          "--out", str(out)])
    records = json.loads((out / "results.json").read_text())
    assert {(r["sampler"], r["nfe"]) for r in records} == {("ddim", 5), ("ddim", 10), ("dpmpp2m", 5), ("dpmpp2m", 10)}
    for r in records:
        assert set(r) >= {"sampler", "nfe", "rmse_vs_gt", "seconds_per_image"}
        assert 0 < r["rmse_vs_gt"] < 1
    err = {(r["sampler"], r["nfe"]): r["rmse_vs_gt"] for r in records}
    assert err[("ddim", 10)] < err[("ddim", 5)]
    assert os.path.getsize(out / "rmse_vs_nfe.png") > 1000
    assert "dpmpp2m" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--samplers", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["bench", "--nfe", "0,5", "--out", str(tmp_path)])
