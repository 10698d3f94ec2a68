# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""Per-class Gaussian statistics, so a class-conditional run teleports with the statistics of its class.

Analytical teleportation (Wang & Vastola, arXiv 2412.09726) replaces the first, high-noise part of the
probability-flow ODE by the closed-form flow of a Gaussian fitted to the data. For a class-conditional model the
distribution being sampled is ``p(x | c)``, so the Gaussian to use is that of class ``c``: its mean is much closer to
the samples than the mean of all classes, which is what matters at the noise levels the teleport covers (Sec. 3 of
the paper: the Gaussian's score is accurate while the noise dominates the data's spread around its mean).

:class:`ClassConditionalStats` holds one :class:`~diffsamplers.pipelines.gaussian_stats.GaussianStats` per class
and saves them as a folder (``index.json`` + one GaussianStats safetensors file per class).
:func:`teleport_class_conditional` runs a class-conditional pipeline (``DiTPipeline``-style: ``class_labels=``, a
pipeline that calls ``scale_model_input``) once per class present, each with a
:class:`~diffsamplers.TeleportScheduler` over that class's statistics, and returns the images in the order asked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._io import atomic_write, read_json
from ..samplers.teleport_scheduler import TeleportScheduler
from .gaussian_stats import GaussianStats

_FORMAT = "diffsamplers.ClassConditionalStats"
_FORMAT_VERSION = "1"
_INDEX = "index.json"


class ClassConditionalStats:
    """One :class:`GaussianStats` per class label (integer labels, not necessarily contiguous).

    Args:
        stats (`Mapping[int, GaussianStats]`): label -> statistics; all of the same per-sample shape.
    """

    def __init__(self, stats: Mapping[int, GaussianStats]):
        if not isinstance(stats, Mapping) or not stats:
            raise ValueError(f"stats must be a non-empty mapping of class label -> GaussianStats, got {stats!r}")
        shapes = set()
        for label, value in stats.items():
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"stats keys must be int class labels, got {label!r}")
            if not isinstance(value, GaussianStats):
                raise TypeError(f"stats[{label}] must be a GaussianStats, got {type(value).__name__}")
            shapes.add(tuple(value.shape))
        if len(shapes) != 1:
            raise ValueError(f"stats must all describe samples of one shape, got shapes {sorted(shapes)}")
        self.stats = dict(sorted(stats.items()))
        self.shape = shapes.pop()

    @property
    def classes(self) -> list[int]:
        """The class labels, sorted."""
        return list(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def __getitem__(self, label: int) -> GaussianStats:
        if label not in self.stats:
            raise KeyError(f"no statistics for class {label!r}; classes: {self.classes}")
        return self.stats[label]

    def __repr__(self) -> str:
        return f"ClassConditionalStats(classes={self.classes}, shape={self.shape})"

    @classmethod
    def from_samples(cls, samples: torch.Tensor, labels: torch.Tensor | Sequence[int], *, rank: int | None = None,
                     **kwargs: Any) -> ClassConditionalStats:
        """Per-class :meth:`GaussianStats.from_samples` (mean and unbiased covariance of each class's samples).

        Args:
            samples (`torch.Tensor` of shape `(N, ...)`): e.g. a VAE's scaled latents of the training images.
            labels (`torch.Tensor` or sequence of `int`, `N` values): the class of each sample; every class needs
                at least two samples.
            rank (`int`, *optional*): as in :meth:`GaussianStats.from_moments`.
            **kwargs: the other :class:`GaussianStats` fields (``space``, ``scaling_factor``...).
        """
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.numel() != samples.shape[0] or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be {samples.shape[0]} integer class labels (one per sample), got shape "
                f"{tuple(labels.shape)} and dtype {labels.dtype}"
            )
        stats = {}
        for label in labels.unique().tolist():
            members = samples[labels == label]
            if members.shape[0] < 2:
                raise ValueError(f"labels: class {label} has {members.shape[0]} sample, at least 2 are needed")
            stats[int(label)] = GaussianStats.from_samples(members, rank=rank, **kwargs)
        return cls(stats)

    def save(self, path: str | os.PathLike) -> None:
        """Write a folder: ``index.json`` (format, classes, shape) and ``class_<label>.safetensors`` per class
        (:meth:`GaussianStats.save`; no pickle). The index is written last, so a partial folder does not load."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        folder = os.fspath(path)
        os.makedirs(folder, exist_ok=True)
        files = {}
        for label, stats in self.stats.items():
            files[str(label)] = f"class_{label}.safetensors"
            stats.save(os.path.join(folder, files[str(label)]))
        index = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "shape": list(self.shape), "files": files}
        atomic_write(os.path.join(folder, _INDEX), (json.dumps(index, indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassConditionalStats:
        """Read a folder written by :meth:`save`; a missing or foreign index, or a class file that is missing or of
        another shape, raises a ``ValueError`` naming the file."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        index_path = os.path.join(os.fspath(path), _INDEX)
        if not os.path.isfile(index_path):
            raise ValueError(f"{index_path} does not exist: {os.fspath(path)!r} is not a ClassConditionalStats folder")
        index = read_json(index_path)
        if not isinstance(index, dict) or index.get("format") != _FORMAT:
            raise ValueError(f"{index_path} is not a ClassConditionalStats index")
        if index.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{index_path} has format version {index.get('format_version')!r}, this version reads "
                             f"{_FORMAT_VERSION!r}")
        files = index.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError(f"{index_path} lists no class files")
        stats = {}
        for label, name in files.items():
            if not isinstance(name, str) or os.path.basename(name) != name:
                raise ValueError(f"{index_path}: class {label} names the file {name!r}, not a file in the folder")
            try:
                key = int(label)
            except ValueError as err:
                raise ValueError(f"{index_path}: class label {label!r} is not an int") from err
            file = os.path.join(os.fspath(path), name)
            if not os.path.isfile(file):
                raise ValueError(f"{file} (class {label} of {index_path}) does not exist")
            stats[key] = GaussianStats.load(file)
            if list(stats[key].shape) != index.get("shape"):
                raise ValueError(f"{file} holds statistics of shape {stats[key].shape}, {index_path} says "
                                 f"{index.get('shape')}")
        return cls(stats)


def teleport_class_conditional(
    pipe: Any,
    class_stats: ClassConditionalStats,
    class_labels: Sequence[int],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    skip_fraction: float | None = None,
    sigma_skip: float | None = None,
    skip_steps: int | None = None,
    **call_kwargs: Any,
) -> Any:
    """Sample a class-conditional pipeline with each sample teleported by the statistics of its own class.

    The samples are grouped by class; each group runs through ``pipe(class_labels=group, ...)`` with
    ``pipe.scheduler`` wrapped in a :class:`~diffsamplers.TeleportScheduler` over ``class_stats[c]`` (the teleport
    acts on the pipeline's latents in ``scale_model_input``, so with CFG both halves of the batch move together).
    ``pipe.scheduler`` is restored afterwards. Give one generator per sample to make a sample independent of how
    the batch is grouped.

    Args:
        pipe (`DiffusionPipeline`): a pipeline taking ``class_labels=`` (e.g. ``DiTPipeline``).
        class_stats (`ClassConditionalStats`): statistics in the pipeline's latent space, one per class.
        class_labels (sequence of `int`): one class per sample.
        generator (`torch.Generator` or list, *optional*): a list must hold one generator per sample.
        skip_fraction, sigma_skip, skip_steps: as in :class:`~diffsamplers.TeleportScheduler`.
        **call_kwargs: everything else for ``pipe(...)`` (``guidance_scale``, ``num_inference_steps``,
            ``output_type``...; ``return_dict`` is not supported).

    Returns:
        `ImagePipelineOutput`-like object of ``pipe``'s output class, with ``images`` in the order of
        ``class_labels`` (a tensor, an array or a list, as the pipeline returns them).
    """
    if not isinstance(class_stats, ClassConditionalStats):
        raise TypeError(f"class_stats must be a ClassConditionalStats, got {type(class_stats).__name__}")
    if isinstance(class_labels, torch.Tensor):
        class_labels = class_labels.tolist()
    labels = list(class_labels) if isinstance(class_labels, (list, tuple)) else []
    if not labels or any(isinstance(c, bool) or not isinstance(c, int) for c in labels):
        raise ValueError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
    missing = sorted(set(labels) - set(class_stats.classes))
    if missing:
        raise ValueError(f"class_labels: no statistics for classes {missing} (class_stats has {class_stats.classes})")
    if isinstance(generator, list) and len(generator) != len(labels):
        raise ValueError(f"generator: a list must hold one generator per sample ({len(labels)}), got {len(generator)}")
    if "return_dict" in call_kwargs:
        raise ValueError("return_dict is not supported by teleport_class_conditional")
    original = pipe.scheduler
    base = original.base if isinstance(original, TeleportScheduler) else original
    order: list[int] = []
    outputs = []
    try:
        for label in sorted(set(labels)):
            members = [i for i, c in enumerate(labels) if c == label]
            pipe.scheduler = TeleportScheduler(base, class_stats[label], skip_fraction=skip_fraction,
                                               sigma_skip=sigma_skip, skip_steps=skip_steps)
            gens = [generator[i] for i in members] if isinstance(generator, list) else generator
            outputs.append(pipe(class_labels=[label] * len(members), generator=gens, **call_kwargs))
            order.extend(members)
    finally:
        pipe.scheduler = original
    images = [out.images for out in outputs]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    if isinstance(images[0], torch.Tensor):
        merged: Any = torch.cat(images)[torch.tensor(inverse)]
    elif isinstance(images[0], list):
        flat = [im for group in images for im in group]
        merged = [flat[i] for i in inverse]
    else:
        import numpy as np

        merged = np.concatenate(images)[inverse]
    return type(outputs[0])(images=merged)


__all__ = ["ClassConditionalStats", "teleport_class_conditional"]
