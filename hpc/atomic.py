"""Atomic file writes: the one helper every room uses.

A writer writes ``<dir>/.<name>.tmp-<pid>``, flushes and fsyncs it, then ``os.replace``s it over
``<dir>/<name>``: a reader (or a process killed mid-write) sees the old file or the new one, never a
torn one. The temp name starts with a dot so listings (``glob("*.json")``) never pick it up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def temp_path(path: str | os.PathLike, *, suffix: str = "") -> Path:
    """The temporary sibling that an atomic write of ``path`` uses (same folder, so rename is atomic).

    ``suffix``: an ending the temp name must keep (writers that pick the format from it, e.g. ".nii.gz").
    """
    path = Path(path)
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    return path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], Any], *, suffix: str = "") -> Path:
    """Call ``write(tmp)`` for a library that writes to a file name itself (SimpleITK), then rename
    ``tmp`` over ``path``. ``suffix`` as in :func:`temp_path`. On error ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix=suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Commit a fully written folder ``tmp`` as ``final``: the old ``final`` (if any) is moved aside,
    ``tmp`` renamed in, then the old one removed. A reader sees the old folder or the new one."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call ``write(fh)`` on a binary temp file beside ``path``, then rename it over ``path``.

    Creates the parent folder. On any error the temp file is removed and ``path`` is untouched.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: name the target (ENOSPC, EIO)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """JSON (numpy scalars/arrays and paths converted) written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, default=_json_default) + "\n")
