# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Ground-truth cache: batch- and process-count invariance, resume after interruption, refusal of mismatched caches."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from diffsamplers.eval.features import extract_features
from diffsamplers.eval.fid import StreamingStats, fid_from_stats
from diffsamplers.eval.ground_truth import (
    config_hash,
    generate_ground_truth,
    iter_ground_truth,
    load_ground_truth,
    pipeline_manifest,
    pipeline_sample_fn,
)
from diffsamplers.testing import tiny_unet_pipeline

MANIFEST = {"model_id": "toy/tanh-noise", "steps": 1000, "scheduler": {"beta_start": 0.0001, "eta": 0.0}}
SEEDS = list(range(100, 110))


def toy_sample_fn(seeds: list[int]) -> torch.Tensor:
    """One generator per sample and only element-wise maths: exactly batch-invariant."""
    samples = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.tanh(torch.stack(samples))


class CountingSampleFn:
    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.seeds: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, seeds: list[int]) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.seeds += seeds
        return toy_sample_fn(seeds)


class ToyExtractor(nn.Module):
    """Extractors receive uint8 batches (extract_features quantises like PNG)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255)


def toy_extractor() -> nn.Module:
    return ToyExtractor()


def to_images(samples: torch.Tensor) -> torch.Tensor:
    return (samples + 1) / 2


def reference_stats() -> StreamingStats:
    return StreamingStats().update(torch.randn(50, 6, generator=torch.Generator().manual_seed(7)).abs())


def _generate(sample_fn, out_dir, **kwargs):
    kwargs.setdefault("shard_size", 3)
    return generate_ground_truth(sample_fn, SEEDS, out_dir, manifest=MANIFEST, progress=False, **kwargs)


def test_samples_do_not_depend_on_shard_size(tmp_path):
    expected = toy_sample_fn(SEEDS)
    for shard_size in (1, 3, 4, 10, 64):
        out_dir = tmp_path / f"s{shard_size}"
        manifest = _generate(toy_sample_fn, out_dir, shard_size=shard_size)
        assert manifest["complete"] and manifest["shard_size"] == shard_size
        assert len(manifest["shards"]) == -(-len(SEEDS) // shard_size)
        assert torch.equal(load_ground_truth(out_dir), expected)
    assert [seeds for seeds, _ in iter_ground_truth(tmp_path / "s4")] == [SEEDS[:4], SEEDS[4:8], SEEDS[8:]]


def test_resume_after_crash_regenerates_only_missing_shards(tmp_path):
    crashing = CountingSampleFn(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _generate(crashing, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        load_ground_truth(tmp_path)
    (tmp_path / ".shard_00002.safetensors.k1ll3d.tmp").write_bytes(b"torn")  # what a kill mid-write leaves

    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*")}
    resumed = CountingSampleFn()
    manifest = _generate(resumed, tmp_path)
    assert manifest["complete"]
    assert resumed.calls == 2 and resumed.seeds == SEEDS[6:]  # shards 2 and 3 only
    assert all((tmp_path / name).stat().st_mtime_ns == t for name, t in finished.items())
    assert not list(tmp_path.glob(".*tmp*"))
    assert torch.equal(load_ground_truth(tmp_path), toy_sample_fn(SEEDS))

    again = CountingSampleFn()
    _generate(again, tmp_path)
    assert again.calls == 0


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from diffsamplers.eval.ground_truth import generate_ground_truth

    def slow(seeds):
        time.sleep(0.4)
        noise = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.tanh(torch.stack(noise))

    manifest = {manifest!r}
    generate_ground_truth(slow, {seeds!r}, sys.argv[1], manifest=manifest, shard_size=3, progress=False)
    """
)


def test_resume_after_kill(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(KILL_SCRIPT.format(manifest=MANIFEST, seeds=SEEDS))
    out_dir = tmp_path / "gt"
    proc = subprocess.Popen([sys.executable, str(script), str(out_dir)])
    try:
        deadline = time.monotonic() + 60
        while not (out_dir / "shard_00000.safetensors").exists():
            assert proc.poll() is None, "generation subprocess exited early"
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(p.name for p in out_dir.glob("shard_*"))
    assert 1 <= len(done) < 4
    resumed = CountingSampleFn()
    _generate(resumed, out_dir)
    assert resumed.calls == 4 - len(done)
    assert torch.equal(load_ground_truth(out_dir), toy_sample_fn(SEEDS))


def test_mismatched_cache_is_refused(tmp_path):
    _generate(toy_sample_fn, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    never = CountingSampleFn()
    with pytest.raises(ValueError, match="another request.*steps"):
        generate_ground_truth(never, SEEDS, tmp_path, manifest={**MANIFEST, "steps": 999}, progress=False)
    with pytest.raises(ValueError, match="seeds differ"):
        generate_ground_truth(never, SEEDS[:-1], tmp_path, manifest=MANIFEST, progress=False)
    with pytest.raises(ValueError, match="another request"):
        load_ground_truth(tmp_path, config={**MANIFEST, "steps": 999})
    assert never.calls == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "shard_00000.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest.json"):
        _generate(never, orphan)


def test_resume_keeps_the_cached_shard_layout(tmp_path):
    crashing = CountingSampleFn(fail_on_call=2)
    with pytest.raises(RuntimeError):
        _generate(crashing, tmp_path, shard_size=4)
    resumed = CountingSampleFn()
    manifest = _generate(resumed, tmp_path, shard_size=2)
    assert manifest["shard_size"] == 4 and resumed.calls == 2
    assert torch.equal(load_ground_truth(tmp_path, config=MANIFEST, seeds=SEEDS), toy_sample_fn(SEEDS))


def test_manifest_and_argument_validation(tmp_path):
    manifest = _generate(toy_sample_fn, tmp_path)
    assert manifest["config"] == json.loads(json.dumps(MANIFEST))
    assert manifest["config_hash"] == config_hash(MANIFEST, SEEDS, manifest["shards"]) != config_hash(MANIFEST, SEEDS)
    assert manifest["seeds"] == SEEDS
    with pytest.raises(TypeError, match="manifest"):
        generate_ground_truth(toy_sample_fn, SEEDS, tmp_path / "x", manifest=None)
    with pytest.raises(ValueError, match="shard_size"):
        generate_ground_truth(toy_sample_fn, SEEDS, tmp_path / "x", manifest=MANIFEST, shard_size=0)
    with pytest.raises(TypeError, match="JSON"):
        generate_ground_truth(toy_sample_fn, SEEDS, tmp_path / "x", manifest={"f": object()})
    with pytest.raises(ValueError, match="returned shape"):
        generate_ground_truth(lambda s: torch.zeros(1), SEEDS, tmp_path / "y", manifest=MANIFEST, progress=False)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "missing")


def test_pipeline_sample_fn_per_sample_generators(tmp_path):
    from diffusers import DDIMScheduler

    pipe = tiny_unet_pipeline()
    original = pipe.scheduler
    trailing = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    # eta=1 draws fresh noise at every step: per-sample generators must make that batch-invariant too
    sample_fn = pipeline_sample_fn(pipe, 4, scheduler=trailing, output_type="pt", eta=1.0)
    manifest = pipeline_manifest(pipe, 4, scheduler=trailing, output_type="pt", eta=1.0)
    assert manifest["scheduler_config"]["timestep_spacing"] == "trailing" and manifest["call_kwargs"] == {"eta": 1.0}
    assert manifest["num_inference_steps"] == 4
    seeds = [3, 1, 4, 1, 5]
    results = []
    for shard_size in (1, 2, 5):
        out_dir = tmp_path / str(shard_size)
        generate_ground_truth(sample_fn, seeds, out_dir, manifest=manifest, shard_size=shard_size, progress=False)
        results.append(load_ground_truth(out_dir))
    assert pipe.scheduler is original
    assert results[0].shape == (5, 3, 8, 8) and 0 <= results[0].min() and results[0].max() <= 1
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[0][3], rtol=0, atol=1e-5)  # the same seed twice
    assert not torch.allclose(results[0][0], results[0][1])

    numpy_out = pipeline_sample_fn(pipe, 2, output_type="np")([0, 1])
    assert numpy_out.shape == (2, 3, 8, 8)  # NHWC numpy converted to NCHW


WORKER = textwrap.dedent(
    """
    import importlib.util, sys, torch
    spec = importlib.util.spec_from_file_location("gt_test", {test_file!r})
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    out_dir, result_dir = sys.argv[1], sys.argv[2]
    t.generate_ground_truth(t.toy_sample_fn, t.SEEDS, out_dir, manifest=t.MANIFEST, shard_size=2, progress=False)
    samples = t.load_ground_truth(out_dir)
    stats = t.extract_features(t.to_images(samples), t.toy_extractor(), batch_size=5, progress=False, distributed=True)
    fid = t.fid_from_stats(stats, t.reference_stats())
    rank = torch.distributed.get_rank()
    result = {{"samples": samples, "count": stats.count, "mean": stats.mean, "fid": fid}}
    torch.save(result, f"{{result_dir}}/{{rank}}.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(test_file=str(Path(__file__).resolve())))
    out_dir, result_dir = tmp_path / "gt", tmp_path / "results"
    result_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), str(script), str(out_dir), str(result_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    expected = toy_sample_fn(SEEDS)
    single = extract_features(to_images(expected), toy_extractor(), batch_size=5, progress=False)
    single_fid = fid_from_stats(single, reference_stats())
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5
    for rank in (0, 1):
        result = torch.load(result_dir / f"{rank}.pt")
        assert torch.equal(result["samples"], expected)
        assert result["count"] == len(SEEDS)
        torch.testing.assert_close(result["mean"], single.mean, rtol=1e-6, atol=1e-9)
        assert result["fid"] == pytest.approx(single_fid, rel=1e-6)
