# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Bad inputs and damaged files in the evaluation code: clear errors naming the argument or file, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsamplers import _io
from diffsamplers.eval.features import load_inception
from diffsamplers.eval.fid import StreamingStats, frechet_distance
from diffsamplers.eval.ground_truth import generate_ground_truth, load_ground_truth, pipeline_sample_fn

MANIFEST = {"model_id": "toy/tanh-noise", "steps": 1000}
SEEDS = list(range(10))


def toy_sample_fn(seeds: list[int]) -> torch.Tensor:
    return torch.tanh(torch.stack([torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds]))


def _named(path) -> str:
    return re.escape(str(path))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------ frechet_distance


def test_frechet_rejects_non_symmetric_covariance():
    mu = np.zeros(3)
    asym = np.eye(3)
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match=r"`sigma2` is not symmetric"):
        frechet_distance(mu, np.eye(3), mu, asym)
    with pytest.raises(ValueError, match=r"`sigma1` is not symmetric"):
        frechet_distance(mu, asym, mu, np.eye(3), method="cholesky")


def test_frechet_rejects_indefinite_covariance():
    mu = np.zeros(4)
    # today's symmetrise-and-clip returned -8 here: a distance cannot be negative, the input is not a covariance
    with pytest.raises(ValueError, match=r"`sigma2` is not positive semi-definite"):
        frechet_distance(mu, np.eye(4), mu, -np.eye(4))
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1, positive diagonal
    with pytest.raises(ValueError, match=r"`sigma1` is not positive semi-definite"):
        frechet_distance(np.zeros(2), indefinite, np.zeros(2), np.eye(2))


def test_frechet_tolerates_round_off():
    # fewer samples than features, statistics in float32: tiny negative eigenvalues and asymmetry are round-off
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(30, 64, generator=torch.Generator().manual_seed(1))
    cx, cy = torch.cov(x.T), torch.cov(y.T)
    assert torch.linalg.eigvalsh(cx.double()).min() < 0 or torch.linalg.eigvalsh(cy.double()).min() < 0
    cx_noisy = cx + 1e-7 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2))  # slightly asymmetric
    exact = frechet_distance(x.mean(0).double(), cx.double(), y.mean(0).double(), cy.double())
    assert exact > 0
    # (the square root amplifies the 1e-7 perturbation of the 44 zero eigenvalues to a few 1e-5 relative)
    assert frechet_distance(x.mean(0), cx_noisy, y.mean(0), cy) == pytest.approx(exact, rel=1e-3)
    assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3))) == 0.0


def test_frechet_rejects_a_matrix_as_mean():
    s = np.eye(4)
    with pytest.raises(ValueError, match=r"`mu1` must be a mean vector"):
        frechet_distance(np.eye(2), s, np.zeros(4), s)  # 4 values, but not a vector
    # a (1, d) mean from a keepdim reduction is fine
    assert frechet_distance(np.ones((1, 4)), s, np.zeros(4), s) == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------ StreamingStats files


def _stats() -> StreamingStats:
    return StreamingStats().update(torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "pickle", "foreign", "old-version", "extra-tensor", "shape", "dtype", "negative-count"],
)
def test_streaming_stats_load_names_the_file(tmp_path, damage):
    path = tmp_path / "stats.safetensors"
    good = _stats()
    state = good.state_dict()
    meta = {"format": "diffsamplers.StreamingStats", "version": "1"}
    if damage == "truncated":
        good.save(path)
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "pickle":
        path.write_bytes(pickle.dumps(state))
    elif damage == "foreign":
        save_file(state, str(path))
    elif damage == "old-version":
        save_file(state, str(path), metadata={**meta, "version": "0"})
    elif damage == "extra-tensor":
        save_file({**state, "x": torch.zeros(1)}, str(path), metadata=meta)
    elif damage == "shape":
        save_file({**state, "outer_sum": torch.zeros(3, 4, dtype=torch.float64)}, str(path), metadata=meta)
    elif damage == "dtype":
        save_file({**state, "sum": state["sum"].float()}, str(path), metadata=meta)
    else:
        save_file({**state, "count": torch.tensor([-1])}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=_named(path)):
        StreamingStats.load(path)


def test_streaming_stats_save_is_atomic_with_the_umask_mode(tmp_path, monkeypatch, umask_022):
    path = tmp_path / "stats.safetensors"
    _stats().save(path)
    assert _mode(path) == umask_022  # safetensors' own save_file leaves 0600
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        StreamingStats().update(torch.zeros(4, 3)).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.safetensors"]  # and no temporary file is left
    with pytest.raises(ValueError, match="reserved"):
        _stats().save(tmp_path / "other.safetensors", metadata={"format": "mine"})


def test_atomic_write_cleans_up_on_interrupt(tmp_path, monkeypatch, umask_022):
    target = tmp_path / "out.bin"

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write(target, b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    _io.atomic_write(target, b"data")
    assert target.read_bytes() == b"data" and _mode(target) == umask_022


# ------------------------------------------------------------------------------------------ Inception loader


def test_load_inception_rejects_foreign_files(tmp_path):
    torn = tmp_path / "torn.pt"
    linear = tmp_path / "linear.pt"
    torch.jit.script(nn.Linear(3, 2)).save(str(linear))
    torn.write_bytes(linear.read_bytes()[:100])
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    for path in (torn, pickled):
        with pytest.raises(ValueError, match=_named(path) + ".*not a TorchScript file"):
            load_inception(path)
    with pytest.raises(ValueError, match=_named(linear) + ".*not a TorchScript Inception network"):
        load_inception(linear)

    class Pool(nn.Module):  # runs on 299x299 but gives 3 features
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    pool = tmp_path / "pool.pt"
    torch.jit.script(Pool()).save(str(pool))
    with pytest.raises(ValueError, match=_named(pool) + r".*\(1, 3\), not 2048 features"):
        load_inception(pool)


# ------------------------------------------------------------------------------------------ ground-truth cache


def _generate(out_dir, sample_fn=toy_sample_fn, **kwargs):
    kwargs.setdefault("shard_size", 4)
    kwargs.setdefault("progress", False)
    return generate_ground_truth(sample_fn, SEEDS, out_dir, manifest=MANIFEST, **kwargs)


def _edit_manifest(out_dir, edit) -> None:
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_records_shard_checksums_and_umask_modes(tmp_path, umask_022):
    manifest = _generate(tmp_path)
    for shard in manifest["shards"]:
        path = tmp_path / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert _mode(path) == umask_022
    assert _mode(tmp_path / "manifest.json") == umask_022


def test_flipped_bytes_in_a_shard_are_caught(tmp_path):
    _generate(tmp_path)
    shard = tmp_path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: still a valid safetensors file
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=_named(shard) + " is corrupt: its sha256"):
        load_ground_truth(tmp_path)
    with pytest.raises(ValueError, match=_named(shard)):
        _generate(tmp_path)  # a resumed run does not reuse it either


def _permute_seeds(m):
    m["seeds"][0], m["seeds"][1] = m["seeds"][1], m["seeds"][0]


def _drop_last_shard(m):
    m["shards"].pop()


def _drop_last_shard_consistently(m):
    last = m["shards"].pop()
    m["seeds"] = m["seeds"][: last["start"]]
    m["num_samples"] = len(m["seeds"])


def _edit_config(m):
    m["config"]["steps"] = 10


@pytest.mark.parametrize("edit", [_permute_seeds, _drop_last_shard, _drop_last_shard_consistently, _edit_config])
def test_edited_manifest_is_refused(tmp_path, edit):
    _generate(tmp_path)
    _edit_manifest(tmp_path, edit)
    path = tmp_path / "manifest.json"
    with pytest.raises(ValueError, match=_named(path) + " (was edited or is corrupt|is corrupt)"):
        load_ground_truth(tmp_path)
    with pytest.raises(ValueError, match=_named(path)):
        _generate(tmp_path)


def test_corrupt_manifest_json_names_the_file(tmp_path):
    _generate(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=_named(path) + " is not a valid JSON file"):
        load_ground_truth(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=_named(path) + " is not a diffsamplers ground-truth manifest"):
        _generate(tmp_path)


def test_pickle_renamed_as_shard_names_the_file(tmp_path):
    _generate(tmp_path)
    shard = tmp_path / "shard_00000.safetensors"
    shard.write_bytes(pickle.dumps({"samples": torch.zeros(4, 2, 4, 4)}))
    with pytest.raises(ValueError, match=_named(shard) + " is not a readable safetensors file"):
        load_ground_truth(tmp_path)


def test_failed_shard_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("shard_00001.safetensors"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        _generate(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard_00000.safetensors"]
    _generate(tmp_path)  # resumes from the shard that was written
    assert torch.equal(load_ground_truth(tmp_path), toy_sample_fn(SEEDS))


def test_default_shards_are_small_and_resume_says_what_it_reused(tmp_path, capsys, monkeypatch):
    seeds = list(range(70))
    manifest = generate_ground_truth(toy_sample_fn, seeds, tmp_path / "a", manifest=MANIFEST, progress=False)
    assert [s["stop"] - s["start"] for s in manifest["shards"]] == [32, 32, 6]

    import tqdm.auto

    bars = []
    real_tqdm = tqdm.auto.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording_tqdm)
    calls = []

    def crash_on_second(chunk):
        calls.append(chunk)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return toy_sample_fn(chunk)

    out_dir = tmp_path / "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_ground_truth(crash_on_second, seeds, out_dir, manifest=MANIFEST, progress=True)
    capsys.readouterr()
    generate_ground_truth(toy_sample_fn, seeds, out_dir, manifest=MANIFEST, progress=True)
    err = capsys.readouterr().err
    assert f"ground truth: reusing 32 of 70 samples from {out_dir}" in err
    assert bars[-1]["initial"] == 32 and bars[-1]["total"] == 70
    assert torch.equal(load_ground_truth(out_dir), toy_sample_fn(seeds))


def test_zero_steps_are_refused_before_anything_is_written(tmp_path):
    out_dir = tmp_path / "gt"
    for key in ("steps", "num_inference_steps"):
        with pytest.raises(ValueError, match=rf"manifest\['{key}'\].*positive int, got 0"):
            generate_ground_truth(toy_sample_fn, SEEDS, out_dir, manifest={**MANIFEST, key: 0}, progress=False)
    assert not out_dir.exists()
    # so the next, correct request is not refused
    assert _generate(out_dir)["complete"]

    from diffsamplers.testing import tiny_unet_pipeline

    with pytest.raises(ValueError, match="num_inference_steps"):
        pipeline_sample_fn(tiny_unet_pipeline(), 0)


def test_bench_ground_truth_with_zero_steps_leaves_no_manifest(tmp_path):
    from diffusers import DDPMScheduler

    from diffsamplers.eval.bench import BenchModel, ground_truth

    model = BenchModel("toy", None, (1, 4, 4), dict(DDPMScheduler().config), lambda x: x)
    with pytest.raises(ValueError, match="steps"):
        ground_truth(model, [0, 1], str(tmp_path / "gt"), steps=0)
    assert not (tmp_path / "gt" / "manifest.json").exists()
