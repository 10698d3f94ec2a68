# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Full-step ground truth: same seeds, per-sample generators, a resumable on-disk cache.

The ground truth of a few-step sampler is the same model solved with many steps from the same initial noise. Every
sample gets its own ``torch.Generator().manual_seed(seed)``, so a sample depends on its seed only, not on the batch
it was drawn in or on how many processes shared the work.

Layout of ``out_dir``::

    manifest.json                 what was requested (config, seeds), the shard list with each shard's sha256,
                                  and the config hash over config, seeds and shard list
    shard_00000.safetensors       samples of seeds[0:shard_size], tensor "samples"; header: config hash, range, seeds
    shard_00001.safetensors       ...

Every file is written to a temporary file, fsynced and moved into place with ``os.replace``, so a killed run leaves
only whole shards. A rerun with the same request verifies and skips finished shards; a request whose config hash
differs from the cache's is refused, never mixed in or overwritten. Reading checks each shard's sha256 and header
against the manifest and the manifest against its own hash, so flipped bytes, a hand-edited config or seed list, or a
shard dropped from the list raise an error naming the file instead of giving other samples.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write, load_safetensors, read_json, sha256_hex, temp_glob

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
FORMAT_VERSION = 2
#: Samples per ``sample_fn`` call and per shard file: small enough that an interrupted run loses little, large
#: enough that the per-call overhead stays small next to a many-step solve.
DEFAULT_SHARD_SIZE = 32
_SHARD_FILE = re.compile(r"shard_\d{5}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STEP_KEYS = ("steps", "num_inference_steps")


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


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def config_hash(config: dict[str, Any], seeds: Sequence[int], shards: Sequence[dict[str, Any]] | None = None) -> str:
    """sha256 of the canonical JSON of ``config``, ``seeds`` and (when given) the shard layout.

    A cache's ``config_hash`` covers all three, so that an edited config, a permuted seed list or a shard dropped
    from the manifest no longer matches the hash stored in the manifest and in every shard.

    Args:
        config (`dict`): everything that determines the samples (model id, scheduler config, steps, ...).
        seeds (`Sequence[int]`): the per-sample seeds, in order.
        shards (`Sequence[dict]`, *optional*): the manifest's shard list; its ``file``, ``start`` and ``stop``
            entries are hashed (not the checksums, which are filled in as shards are written).
    """
    payload: dict[str, Any] = {"config": config, "seeds": [int(s) for s in seeds]}
    if shards is not None:
        payload["shards"] = [[s["file"], int(s["start"]), int(s["stop"])] for s in shards]
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """Structure and self-consistency of a manifest read from ``path``; every failure names the file."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a diffsamplers ground-truth manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by another version of diffsamplers (manifest version {manifest.get('version')!r}, "
            f"this one reads {FORMAT_VERSION}); delete {path.parent} and rerun"
        )
    problems = []
    seeds, shards = manifest.get("seeds"), manifest.get("shards")
    if not isinstance(manifest.get("config"), dict):
        problems.append("`config` is not an object")
    if not isinstance(manifest.get("config_hash"), str):
        problems.append("`config_hash` is not a string")
    if not isinstance(manifest.get("complete"), bool):
        problems.append("`complete` is not a boolean")
    if not _is_int(manifest.get("shard_size")) or manifest["shard_size"] < 1:
        problems.append("`shard_size` is not a positive integer")
    if not isinstance(seeds, list) or not seeds or not all(_is_int(x) for x in seeds):
        problems.append("`seeds` is not a non-empty list of integers")
    elif manifest.get("num_samples") != len(seeds):
        problems.append(f"`num_samples` is {manifest.get('num_samples')!r} but there are {len(seeds)} seeds")
    if not isinstance(shards, list) or not shards:
        problems.append("`shards` is not a non-empty list")
    else:
        position = 0
        for i, shard in enumerate(shards):
            ok = (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and _SHARD_FILE.fullmatch(shard["file"]) is not None
                and _is_int(shard.get("start"))
                and _is_int(shard.get("stop"))
                and (shard.get("sha256") is None or _SHA256.fullmatch(str(shard["sha256"])) is not None)
            )
            if not ok:
                problems.append(f"shard entry {i} is malformed ({shard!r})")
                break
            if shard["start"] != position or shard["stop"] <= shard["start"]:
                problems.append(f"shard entry {i} ({shard['file']}) covers [{shard['start']}, {shard['stop']}), "
                                f"expected a range starting at {position}")
                break
            position = shard["stop"]
        else:
            if isinstance(seeds, list) and position != len(seeds):
                problems.append(f"the shards cover {position} samples, the manifest lists {len(seeds)} seeds")
            if len({s["file"] for s in shards}) != len(shards):
                problems.append("a shard file is listed twice")
    if problems:
        raise ValueError(f"{path} is corrupt: " + "; ".join(problems) + f". Delete {path.parent} and rerun")
    if config_hash(manifest["config"], seeds, shards) != manifest["config_hash"]:
        raise ValueError(
            f"{path} was edited or is corrupt: its config_hash does not match its config, seeds and shard list. "
            f"Delete {path.parent} and rerun"
        )
    if manifest["complete"] and any(s.get("sha256") is None for s in shards):
        raise ValueError(f"{path} is marked complete but lacks shard checksums; delete {path.parent} and rerun")
    return manifest


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    return _check_manifest(path, read_json(path))


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


def _verify_shard(out_dir: Path, shard: dict[str, Any], stored: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """Read one shard file once: check its checksum (when the manifest has one), its header against the manifest,
    and its tensor; returns the file's sha256 and the samples (CPU)."""
    path = out_dir / shard["file"]
    tensors, meta, data = load_safetensors(path)
    digest = sha256_hex(data)
    if shard.get("sha256") is not None and digest != shard["sha256"]:
        raise ValueError(
            f"{path} is corrupt: its sha256 {digest} differs from the {shard['sha256']} recorded in "
            f"{out_dir / MANIFEST_NAME}. Delete {path} and rerun generate_ground_truth to regenerate it"
        )
    start, stop = shard["start"], shard["stop"]
    try:
        span = (int(meta.get("start", -1)), int(meta.get("stop", -1)))
        shard_seeds = json.loads(meta.get("seeds", "null"))
    except ValueError as err:
        raise ValueError(f"{path} has a malformed header ({err}); delete it and rerun") from err
    if meta.get("config_hash") != stored["config_hash"] or span != (start, stop):
        raise ValueError(f"{path} belongs to another request or shard layout; refusing to reuse {out_dir}")
    if shard_seeds != stored["seeds"][start:stop]:
        raise ValueError(f"{path} holds other seeds than {out_dir / MANIFEST_NAME} lists for it; delete it and rerun")
    samples = tensors.get("samples")
    if set(tensors) != {"samples"} or samples.ndim < 1 or samples.shape[0] != stop - start:
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path} holds {found}, expected 'samples' with {stop - start} rows; delete it and rerun")
    return digest, samples


def _check_steps(value: Any, name: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"`{name}` (solver steps) must be a positive int, got {value!r}")


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
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Any]:
    """Generate ground-truth samples for ``seeds`` into a resumable shard cache in ``out_dir``.

    ``sample_fn(seeds)`` must return one sample per seed, stacked along dim 0, and build one
    ``torch.Generator().manual_seed(seed)`` per sample (see :func:`pipeline_sample_fn`) so that a sample does not
    depend on which other seeds share its call. Shards are written atomically and their sha256 is recorded in the
    manifest; on a rerun with the same ``manifest`` and ``seeds`` finished shards are verified and skipped, and one
    line says how many samples were reused. If ``out_dir`` holds a cache with another config hash, shard files
    without a manifest, a corrupt or edited manifest, or a shard that fails its checksum, a ``ValueError`` naming the
    file is raised and nothing is touched. A cache made with another ``shard_size`` is resumed with its own layout
    (``shard_size`` does not change the samples).

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
            together with ``seeds`` and the shard layout identifies the cache. A ``steps`` or
            ``num_inference_steps`` entry must be a positive int (checked before anything is written).
        shard_size (`int`, *optional*, defaults to 32): samples per ``sample_fn`` call and per file; what an
            interrupted run can lose.
        progress (`bool`, *optional*, defaults to `True`): tqdm bar (and the reuse line) on the main process.
        distributed (`bool`, *optional*): share the work between processes; by default, when launched with more
            than one process.

    Returns:
        `dict`: the manifest as written to ``out_dir/manifest.json``.
    """
    if not isinstance(manifest, dict):
        raise TypeError(f"`manifest` must be a dict, got {type(manifest).__name__}")
    if not callable(sample_fn):
        raise TypeError(f"`sample_fn` must be callable, got {type(sample_fn).__name__}")
    if not _is_int(shard_size) or shard_size < 1:
        raise ValueError(f"`shard_size` must be a positive int, got {shard_size!r}")
    # a zero-step request would fail inside sample_fn only after the manifest is written, leaving a cache that
    # refuses the next (correct) request
    for key in _STEP_KEYS:
        if key in manifest:
            _check_steps(manifest[key], f"manifest[{key!r}]")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("`seeds` is empty")
    if any(s < 0 or s >= 2**64 for s in seeds):
        raise ValueError("`seeds` must be integers in [0, 2**64) (torch.Generator.manual_seed)")
    # the JSON round trip stores exactly what the hash covered (tuples become lists, numpy scalars numbers)
    config = json.loads(_canonical_json(manifest))
    out_dir = Path(out_dir)

    if distributed is None:
        distributed = _launched_multiprocess()
    state = _partial_state() if distributed else None
    is_main = state is None or state.is_main_process

    # every process validates before anyone writes, so a refusal raises everywhere instead of hanging a barrier
    stored = _read_manifest(out_dir) if out_dir.is_dir() else None
    if stored is not None:
        if config_hash(config, seeds, stored["shards"]) != stored["config_hash"]:
            raise ValueError(
                f"{out_dir} holds ground truth for another request ({_describe_mismatch(stored, config, seeds)}; "
                f"cached hash {stored['config_hash']}). Use another `out_dir` or delete it."
            )
        layout = stored["shards"]
        if stored["shard_size"] != shard_size:
            logger.info("resuming %s with its shard size %s instead of %s", out_dir, stored["shard_size"], shard_size)
    else:
        if out_dir.is_dir() and any(out_dir.glob("shard_*.safetensors")):
            raise ValueError(f"{out_dir} holds shard files but no {MANIFEST_NAME}; refusing to reuse or overwrite it")
        layout = _shard_layout(len(seeds), shard_size)
        stored = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": config,
            "config_hash": config_hash(config, seeds, layout),
            "seeds": seeds,
            "num_samples": len(seeds),
            "shard_size": shard_size,
            "shards": layout,
            "complete": False,
        }
    digest = stored["config_hash"]
    pending = []
    for shard in layout:
        if (out_dir / shard["file"]).is_file():
            # also records the checksum of a shard whose run was killed before its manifest update
            shard["sha256"] = _verify_shard(out_dir, shard, stored)[0]
        else:
            # a deleted (e.g. corrupt) shard is made again: its old checksum must not outlive it, since another
            # process may write it and the main process only fills in missing checksums at the end
            shard["sha256"] = None
            pending.append(shard)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for pattern in (temp_glob("shard_*.safetensors"), temp_glob(MANIFEST_NAME)):
            for leftover in out_dir.glob(pattern):  # only a SIGKILL mid-write leaves these; whole files never are
                leftover.unlink(missing_ok=True)
        _write_manifest(out_dir, stored)
    if state is not None:
        state.wait_for_everyone()
        with state.split_between_processes(pending) as mine:
            mine = list(mine)
    else:
        mine = pending

    from safetensors.torch import save as safetensors_bytes
    from tqdm.auto import tqdm

    reused = len(seeds) - sum(s["stop"] - s["start"] for s in pending)
    if reused and is_main:
        message = f"ground truth: reusing {reused} of {len(seeds)} samples from {out_dir}"
        logger.info(message)
        if progress:
            print(message, file=sys.stderr, flush=True)
    bar = tqdm(
        total=reused + sum(s["stop"] - s["start"] for s in mine),
        initial=reused,
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
        data = safetensors_bytes({"samples": samples}, metadata=meta)
        atomic_write(out_dir / shard["file"], data)
        shard["sha256"] = sha256_hex(data)
        if is_main:  # only the main process writes the manifest; the others' checksums are read back at the end
            _write_manifest(out_dir, stored)
        bar.update(len(shard_seeds))
    bar.close()

    if state is not None:
        state.wait_for_everyone()
    if is_main:
        for shard in layout:
            if shard.get("sha256") is None:
                shard["sha256"] = _verify_shard(out_dir, shard, stored)[0]
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
        if config_hash(want_config, want_seeds, stored["shards"]) != stored["config_hash"]:
            raise ValueError(
                f"{out_dir} holds ground truth for another request "
                f"({_describe_mismatch(stored, want_config, want_seeds)})"
            )
    missing = [s["file"] for s in stored["shards"] if not (out_dir / s["file"]).is_file()]
    if missing or not stored["complete"]:
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

    Every shard is checked against the manifest as it is read (sha256, config hash, seeds, sample count, and the
    same sample shape and dtype as the first shard); a mismatch raises a ``ValueError`` naming the file.

    Args:
        out_dir (`str` or `os.PathLike`): a cache written by :func:`generate_ground_truth`.
        config (`dict`, *optional*): if given, the cache must have been made with this manifest.
        seeds (`Sequence[int]`, *optional*): if given, the cache must hold exactly these seeds.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where to load the samples.
    """
    out_dir = Path(out_dir)
    stored = _checked_manifest(out_dir, config, seeds)
    first: tuple[tuple[int, ...], torch.dtype] | None = None
    for shard in stored["shards"]:
        samples = _verify_shard(out_dir, shard, stored)[1]
        kind = (tuple(samples.shape[1:]), samples.dtype)
        if first is None:
            first = kind
        elif kind != first:
            raise ValueError(
                f"{out_dir / shard['file']} holds samples of shape {kind[0]} and dtype {kind[1]}, the first shard "
                f"{first[0]} and {first[1]}; delete it and rerun"
            )
        yield stored["seeds"][shard["start"] : shard["stop"]], samples.to(device)


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
    _check_steps(num_inference_steps, "num_inference_steps")
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
    _check_steps(num_inference_steps, "num_inference_steps")
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
