# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Full-step ground truth: same seeds, per-sample generators, a resumable on-disk cache.

The ground truth of a few-step sampler is the same model solved with many steps from the same initial noise. Every
sample gets its own ``torch.Generator().manual_seed(seed)``, so a sample depends on its seed only, not on the batch
it was drawn in or on how many processes shared the work.

Layout of ``out_dir``::

    manifest.json                 what was requested (config, seeds, config hash) and the shard list
    shard_00000.safetensors       samples of seeds[0:shard_size], tensor "samples"
    shard_00001.safetensors       ...

Each shard is written to a temporary file and moved into place with ``os.replace``, so a killed run leaves only
whole shards. A rerun with the same request skips finished shards; a request whose config hash differs from the
cache's is refused, never mixed in or overwritten.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "config_hash",
    "generate_ground_truth",
    "iter_ground_truth",
    "load_ground_truth",
    "pipeline_manifest",
    "pipeline_sample_fn",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "diffsamplers.ground_truth"
FORMAT_VERSION = 1


def _partial_state() -> Any:
    """accelerate's process state, created with ``cpu=True`` when there is no GPU (multi-process CPU runs)."""
    from accelerate import PartialState

    if PartialState._shared_state != {}:  # already set up, e.g. by the caller's Accelerator: never re-initialise
        return PartialState()
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


def _launched_multiprocess() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"manifest values must be JSON-serialisable; got {type(value).__name__} ({value!r})")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def config_hash(config: dict[str, Any], seeds: Sequence[int]) -> str:
    """sha256 of the canonical JSON of ``config`` and ``seeds``: what identifies a ground-truth set.

    Args:
        config (`dict`): everything that determines the samples (model id, scheduler config, steps, ...).
        seeds (`Sequence[int]`): the per-sample seeds, in order.
    """
    return hashlib.sha256(_canonical_json({"config": config, "seeds": list(seeds)}).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    _atomic_write(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a diffsamplers ground-truth manifest")
    return manifest


def _describe_mismatch(stored: dict[str, Any], config: dict[str, Any], seeds: list[int]) -> str:
    parts = []
    old_config = stored.get("config", {})
    keys = sorted(set(old_config) | set(config))
    changed = [k for k in keys if _canonical_json(old_config.get(k)) != _canonical_json(config.get(k))]
    if changed:
        parts.append("config keys differ: " + ", ".join(changed))
    if stored.get("seeds") != seeds:
        parts.append(f"seeds differ ({len(stored.get('seeds', []))} cached, {len(seeds)} requested)")
    return "; ".join(parts) or "hash differs"


def _shard_layout(num: int, shard_size: int) -> list[dict[str, Any]]:
    return [
        {"file": f"shard_{i:05d}.safetensors", "start": start, "stop": min(start + shard_size, num)}
        for i, start in enumerate(range(0, num, shard_size))
    ]


def _shard_is_done(path: Path, digest: str, start: int, stop: int) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = f.get_slice("samples").get_shape()[0]
    except Exception as err:  # os.replace makes a torn file impossible, but a user may have copied one in
        raise ValueError(f"{path} is not a readable shard ({err}); delete it and rerun") from err
    if meta.get("config_hash") != digest or (int(meta.get("start", -1)), int(meta.get("stop", -1))) != (start, stop):
        raise ValueError(f"{path} belongs to another request or shard layout; refusing to reuse {path.parent}")
    if rows != stop - start:
        raise ValueError(f"{path} holds {rows} samples, expected {stop - start}; delete it and rerun")
    return True


def _as_samples(output: Any, seeds: list[int]) -> torch.Tensor:
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"`sample_fn` must return a torch.Tensor, got {type(output).__name__}")
    if output.ndim < 1 or output.shape[0] != len(seeds):
        raise ValueError(f"`sample_fn` returned shape {tuple(output.shape)} for {len(seeds)} seeds")
    return output.detach().to("cpu").contiguous()


def generate_ground_truth(
    sample_fn: Callable[[list[int]], torch.Tensor],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    manifest: dict[str, Any],
    shard_size: int = 16,
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Generate ground-truth samples for ``seeds`` into a resumable shard cache in ``out_dir``.

    ``sample_fn(seeds)`` must return one sample per seed, stacked along dim 0, and build one
    ``torch.Generator().manual_seed(seed)`` per sample (see :func:`pipeline_sample_fn`) so that a sample does not
    depend on which other seeds share its call. Shards are written atomically; on a rerun with the same ``manifest``
    and ``seeds`` finished shards are skipped. If ``out_dir`` holds a cache with another config hash, or shard files
    without a manifest, a ``ValueError`` is raised and nothing is touched. A cache made with another ``shard_size``
    is resumed with its own layout (``shard_size`` does not change the samples).

    Under an ``accelerate``/``torchrun`` launch the pending shards are split between the processes with
    ``PartialState().split_between_processes``; ``out_dir`` must then be visible to all of them (one node or a
    shared file system), and every process must call this function. Any process can read all samples afterwards
    with :func:`load_ground_truth`.

    Args:
        sample_fn (`Callable[[list[int]], torch.Tensor]`): makes the samples of a list of seeds, on any device.
        seeds (`Sequence[int]`): per-sample seeds, in order; duplicates are allowed.
        out_dir (`str` or `os.PathLike`): cache directory, created if missing.
        manifest (`dict`): JSON-serialisable description of everything that determines the samples: model id,
            pipeline and scheduler config, steps, guidance, dtype... (:func:`pipeline_manifest` builds one). Its hash
            together with ``seeds`` identifies the cache.
        shard_size (`int`, *optional*, defaults to 16): samples per ``sample_fn`` call and per file.
        progress (`bool`, *optional*, defaults to `True`): tqdm bar on the main process.
        distributed (`bool`, *optional*): share the work between processes; by default, when launched with more
            than one process.

    Returns:
        `dict`: the manifest as written to ``out_dir/manifest.json``.
    """
    if not isinstance(manifest, dict):
        raise TypeError(f"`manifest` must be a dict, got {type(manifest).__name__}")
    if not callable(sample_fn):
        raise TypeError(f"`sample_fn` must be callable, got {type(sample_fn).__name__}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"`shard_size` must be a positive int, got {shard_size!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty")
    if any(s < 0 or s >= 2**64 for s in seeds):
        raise ValueError("`seeds` must be integers in [0, 2**64) (torch.Generator.manual_seed)")
    # the JSON round trip stores exactly what the hash covered (tuples become lists, numpy scalars numbers)
    config = json.loads(_canonical_json(manifest))
    digest = config_hash(config, seeds)
    out_dir = Path(out_dir)

    if distributed is None:
        distributed = _launched_multiprocess()
    state = _partial_state() if distributed else None
    is_main = state is None or state.is_main_process

    # every process validates before anyone writes, so a refusal raises everywhere instead of hanging a barrier
    stored = _read_manifest(out_dir) if out_dir.is_dir() else None
    if stored is not None:
        if stored.get("config_hash") != digest:
            raise ValueError(
                f"{out_dir} holds ground truth for another request ({_describe_mismatch(stored, config, seeds)}; "
                f"cached hash {stored.get('config_hash')}, requested {digest}). Use another `out_dir` or delete it."
            )
        layout = stored["shards"]
        if stored.get("shard_size") != shard_size:
            logger.info("resuming %s with its shard size %s instead of %s", out_dir, stored["shard_size"], shard_size)
    else:
        if out_dir.is_dir() and any(out_dir.glob("shard_*.safetensors")):
            raise ValueError(f"{out_dir} holds shard files but no {MANIFEST_NAME}; refusing to reuse or overwrite it")
        layout = _shard_layout(len(seeds), shard_size)
        stored = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": config,
            "config_hash": digest,
            "seeds": seeds,
            "num_samples": len(seeds),
            "shard_size": shard_size,
            "shards": layout,
            "complete": False,
        }
    pending = [s for s in layout if not _shard_is_done(out_dir / s["file"], digest, s["start"], s["stop"])]

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in out_dir.glob(".*.tmp-*"):  # from a killed run; whole shards are never temp files
            leftover.unlink(missing_ok=True)
        if _read_manifest(out_dir) is None:
            _write_manifest(out_dir, stored)
    if state is not None:
        state.wait_for_everyone()
        with state.split_between_processes(pending) as mine:
            mine = list(mine)
    else:
        mine = pending

    from safetensors.torch import save as safetensors_bytes
    from tqdm.auto import tqdm

    done = len(layout) - len(pending)
    if done and is_main:
        logger.info("%s: %d of %d shards already done", out_dir, done, len(layout))
    bar = tqdm(
        total=sum(s["stop"] - s["start"] for s in mine),
        unit="sample",
        desc="ground truth",
        disable=not (progress and is_main),
        dynamic_ncols=True,
    )
    for shard in mine:
        shard_seeds = seeds[shard["start"] : shard["stop"]]
        samples = _as_samples(sample_fn(list(shard_seeds)), shard_seeds)
        meta = {
            "config_hash": digest,
            "start": str(shard["start"]),
            "stop": str(shard["stop"]),
            "seeds": json.dumps(shard_seeds),
        }
        _atomic_write(out_dir / shard["file"], safetensors_bytes({"samples": samples}, metadata=meta))
        bar.update(len(shard_seeds))
    bar.close()

    if state is not None:
        state.wait_for_everyone()
    if is_main and not stored.get("complete"):
        stored["complete"] = True
        _write_manifest(out_dir, stored)
    if state is not None:
        state.wait_for_everyone()
    return _read_manifest(out_dir)


def _checked_manifest(out_dir: Path, config: dict[str, Any] | None, seeds: Sequence[int] | None) -> dict[str, Any]:
    stored = _read_manifest(out_dir)
    if stored is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}; run generate_ground_truth first")
    if config is not None or seeds is not None:
        want_config = json.loads(_canonical_json(config)) if config is not None else stored["config"]
        want_seeds = [int(s) for s in seeds] if seeds is not None else stored["seeds"]
        if config_hash(want_config, want_seeds) != stored["config_hash"]:
            raise ValueError(
                f"{out_dir} holds ground truth for another request "
                f"({_describe_mismatch(stored, want_config, want_seeds)})"
            )
    missing = [s["file"] for s in stored["shards"] if not (out_dir / s["file"]).is_file()]
    if missing or not stored.get("complete"):
        raise ValueError(
            f"{out_dir} is incomplete ({len(missing)} of {len(stored['shards'])} shards missing); "
            "rerun generate_ground_truth with the same arguments to finish it"
        )
    return stored


def iter_ground_truth(
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(seeds, samples)`` shard by shard, in seed order, without loading the whole set.

    Args:
        out_dir (`str` or `os.PathLike`): a cache written by :func:`generate_ground_truth`.
        config (`dict`, *optional*): if given, the cache must have been made with this manifest.
        seeds (`Sequence[int]`, *optional*): if given, the cache must hold exactly these seeds.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to load the samples.
    """
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    stored = _checked_manifest(out_dir, config, seeds)
    for shard in stored["shards"]:
        path = out_dir / shard["file"]
        _shard_is_done(path, stored["config_hash"], shard["start"], shard["stop"])
        yield stored["seeds"][shard["start"] : shard["stop"]], load_file(str(path), device=str(device))["samples"]


def load_ground_truth(
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """All ground-truth samples of a finished cache, stacked in seed order.

    Args:
        out_dir (`str` or `os.PathLike`): a cache written by :func:`generate_ground_truth`.
        config (`dict`, *optional*): if given, the cache must have been made with this manifest.
        seeds (`Sequence[int]`, *optional*): if given, the cache must hold exactly these seeds.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to put the samples.
    """
    return torch.cat([samples for _, samples in iter_ground_truth(out_dir, config=config, seeds=seeds, device=device)])


def _to_tensor_images(images: Any) -> torch.Tensor:
    """A pipeline's ``images`` as a tensor: tensors as they are, numpy NHWC and PIL lists as NCHW."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2) if images.ndim == 4 else torch.from_numpy(images)
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) for im in images])
    raise TypeError(f"cannot turn pipeline output of type {type(images).__name__} into a tensor")


def pipeline_sample_fn(
    pipe: Any,
    num_inference_steps: int,
    scheduler: Any = None,
    output_type: str = "latent",
    *,
    generator_device: str | torch.device = "cpu",
    per_seed_kwargs: Callable[[list[int]], dict[str, Any]] | None = None,
    **call_kwargs: Any,
) -> Callable[[list[int]], torch.Tensor]:
    """A ``sample_fn`` for :func:`generate_ground_truth` that runs a diffusers pipeline with per-sample generators.

    Each call builds ``[torch.Generator(generator_device).manual_seed(s) for s in seeds]`` and passes the list as
    ``generator=`` (diffusers draws the initial noise, and any per-step noise, sample by sample from such a list).
    CPU generators give the same noise on every device. The batch size is passed as ``batch_size=`` to pipelines that
    take it (DDPM/DDIM), otherwise as ``num_images_per_prompt=`` for a single prompt; per-seed inputs (a list of
    prompts, DiT's ``class_labels``) come from ``per_seed_kwargs(seeds)``.

    Args:
        pipe (`DiffusionPipeline`): the pipeline.
        num_inference_steps (`int`): steps of the ground-truth solve.
        scheduler (*optional*): a scheduler instance used instead of ``pipe.scheduler`` during each call; the
            pipeline's own scheduler is restored afterwards.
        output_type (`str`, *optional*, defaults to `"latent"`): passed to the pipeline. `"latent"` for latent
            models (compare with :func:`~diffsamplers.eval.metrics.rmse`), `"pt"` for images in [0, 1]. numpy
            (NHWC) and PIL outputs are converted to NCHW tensors.
        generator_device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): device of the generators.
        per_seed_kwargs (`Callable[[list[int]], dict]`, *optional*): extra call arguments that depend on the seeds.
        **call_kwargs: further pipeline arguments (prompt, guidance_scale, eta, ...).

    Returns:
        `Callable[[list[int]], torch.Tensor]`: the sample function; it returns CPU tensors.
    """
    params = inspect.signature(pipe.__call__).parameters

    def sample(seeds: list[int]) -> torch.Tensor:
        kwargs = dict(call_kwargs)
        if per_seed_kwargs is not None:
            kwargs.update(per_seed_kwargs(list(seeds)))
        n = len(seeds)
        if "batch_size" in params and "batch_size" not in kwargs:
            kwargs["batch_size"] = n
        elif "num_images_per_prompt" in params and "num_images_per_prompt" not in kwargs:
            prompt = kwargs.get("prompt")
            per_prompt = isinstance(prompt, (list, tuple)) and len(prompt) == n
            kwargs["num_images_per_prompt"] = 1 if per_prompt else n
        generators = [torch.Generator(generator_device).manual_seed(int(s)) for s in seeds]
        original = pipe.scheduler
        if scheduler is not None:
            pipe.scheduler = scheduler
        try:
            out = pipe(
                num_inference_steps=num_inference_steps, generator=generators, output_type=output_type, **kwargs
            )
        finally:
            if scheduler is not None:
                pipe.scheduler = original
        images = out.images if hasattr(out, "images") else out[0]
        return _to_tensor_images(images).detach().cpu()

    return sample


def pipeline_manifest(
    pipe: Any, num_inference_steps: int, scheduler: Any = None, output_type: str = "latent", **call_kwargs: Any
) -> dict[str, Any]:
    """A manifest for :func:`generate_ground_truth` describing a :func:`pipeline_sample_fn` run.

    Records the model id, pipeline class, dtype, scheduler class and config, steps, output type and the JSON-able call
    arguments (others are recorded by type name: give them a JSON form yourself if they matter).

    Args:
        pipe (`DiffusionPipeline`): the pipeline.
        num_inference_steps (`int`): steps of the ground-truth solve.
        scheduler (*optional*): the scheduler used instead of ``pipe.scheduler``.
        output_type (`str`, *optional*, defaults to `"latent"`): as passed to :func:`pipeline_sample_fn`.
        **call_kwargs: the pipeline call arguments.
    """
    sched = scheduler if scheduler is not None else pipe.scheduler
    config = getattr(pipe, "config", {}) or {}
    kwargs = {}
    for key, value in sorted(call_kwargs.items()):
        try:
            kwargs[key] = json.loads(_canonical_json(value))
        except TypeError:
            kwargs[key] = f"<{type(value).__name__}>"
    return {
        "model_id": config.get("_name_or_path", getattr(pipe, "name_or_path", None)),
        "pipeline": type(pipe).__name__,
        "dtype": str(getattr(pipe, "dtype", None)),
        "scheduler": type(sched).__name__,
        "scheduler_config": json.loads(_canonical_json(dict(sched.config))),
        "num_inference_steps": int(num_inference_steps),
        "output_type": output_type,
        "call_kwargs": kwargs,
    }
