# Copyright 2026 The diffsamplers authors. Licensed under the Apache License, Version 2.0.
"""File helpers shared by everything that writes or reads the project's files: atomic writes, safetensors bytes.

Writes go to a temporary file in the destination's folder, are flushed to disk and then moved into place with
``os.replace``, so a reader (or a rerun after a kill) sees either the old file or the new one, never a torn one.
safetensors' own ``save_file`` (0.8) also writes a temporary file and renames it, but it does not fsync and leaves the
file with mode 0600 whatever the umask; writing the bytes of ``safetensors.torch.save`` here avoids both.

Reads load JSON or safetensors only (never pickle) and turn any parse failure into a ``ValueError`` that names the
file, so a truncated download or a renamed pickle reads as "this file is not what it claims" rather than as an
internal error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "check_tensors",
    "load_safetensors",
    "load_tagged_safetensors",
    "read_json",
    "safetensors_from_bytes",
    "sha256_hex",
    "temp_glob",
]

_TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    # /proc avoids setting the umask to read it, which would race with other threads creating files
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # makes the rename itself durable on POSIX; directories cannot be opened this way on Windows
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_glob(name: str) -> str:
    """Glob pattern matching the temporary files :func:`atomic_write` uses for a destination called ``name``."""
    return f".{name}.*{_TEMP_SUFFIX}"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, ``os.replace``.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask), not the 0600 of
    ``tempfile.mkstemp``. On any error, including ``KeyboardInterrupt``, the temporary file is removed and ``path``
    is left as it was.

    Args:
        path (`str` or `os.PathLike`): destination; its folder must exist.
        data (`bytes`): the full content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a file that is not valid UTF-8 JSON raises a ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a valid JSON file ({err})") from err


def safetensors_from_bytes(data: bytes, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and header metadata of safetensors ``data`` read from ``path`` (named in errors).

    Returns:
        `tuple[dict[str, torch.Tensor], dict[str, str]]`: the tensors (on the CPU) and the ``__metadata__`` strings.
    """
    from safetensors.torch import load

    try:
        # safetensors' header: an 8-byte little-endian length, then that many bytes of JSON
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header length")
        size = int.from_bytes(data[:8], "little")
        if size > len(data) - 8:
            raise ValueError(f"header length {size} exceeds the file size {len(data)}")
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("the header metadata is not a map of strings")
        tensors = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError for torn or foreign files
        raise ValueError(f"{os.fspath(path)} is not a readable safetensors file ({err})") from err
    return tensors, metadata


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str], bytes]:
    """Read a safetensors file once: its tensors, its header metadata, and its raw bytes (for a checksum).

    Args:
        path (`str` or `os.PathLike`): the file; a missing one raises ``FileNotFoundError``, anything that is not
            safetensors (a pickle renamed ``.safetensors``, a truncated copy) a ``ValueError`` naming it.
    """
    data = Path(path).read_bytes()
    tensors, metadata = safetensors_from_bytes(data, path)
    return tensors, metadata, data


def load_tagged_safetensors(
    path: str | os.PathLike, fmt: str, version: str, *, what: str, version_key: str = "version"
) -> tuple[dict[str, Any], dict[str, str], bytes]:
    """:func:`load_safetensors` for a file whose header names its format and version, as the project's files do.

    Args:
        path (`str` or `os.PathLike`): the file.
        fmt (`str`): the expected ``format`` entry of the header metadata.
        version (`str`): the expected format version.
        what (`str`): the kind of file, for error messages ("StreamingStats", "GaussianStats", ...).
        version_key (`str`, *optional*, defaults to `"version"`): the metadata key that holds the version.
    """
    tensors, metadata, data = load_safetensors(path)
    name = os.fspath(path)
    if metadata.get("format") != fmt:
        raise ValueError(f"{name} is not a {what} file (format {metadata.get('format')!r})")
    if metadata.get(version_key) != version:
        raise ValueError(
            f"{name} is a {what} file of format version {metadata.get(version_key)!r}; this version of diffsamplers "
            f"reads version {version!r}"
        )
    return tensors, metadata, data


def check_tensors(path: str | os.PathLike, tensors: dict[str, Any], expected: dict[str, tuple[tuple[int, ...], Any]],
                  what: str = "") -> None:
    """Raise a ``ValueError`` naming ``path`` unless ``tensors`` has exactly the names, shapes and dtypes expected.

    Args:
        path (`str` or `os.PathLike`): the file the tensors came from.
        tensors (`dict[str, torch.Tensor]`): what was read.
        expected (`dict[str, tuple[tuple[int, ...], torch.dtype]]`): name -> (shape, dtype).
        what (`str`, *optional*): which group of tensors, for the message ("model", "EMA", ...).
    """
    name, group = os.fspath(path), f"{what} " if what else ""
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{name}: the {group}tensors do not match (missing {missing[:5]}, unexpected {extra[:5]})")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(
                f"{name}: {group}tensor {key!r} has shape {tuple(t.shape)} and dtype {t.dtype}, expected "
                f"{tuple(shape)} and {dtype}"
            )
