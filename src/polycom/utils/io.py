"""Atomic writes: a run killed at any moment leaves either the old file or the new one.

Every writer here writes to a temporary file in the SAME folder (so the final rename
never crosses a file system), flushes and fsyncs it, then ``os.replace``s it over the
target and fsyncs the folder so the rename itself is durable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_torch", "atomic_dir", "fsync_dir", "remove_if_empty"]


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_if_empty(path: PathLike) -> bool:
    """Remove the folder ``path`` if it is empty; True if it was removed."""
    try:
        os.rmdir(path)  # fails (and is a no-op) unless the folder is empty
    except OSError:
        return False
    return True


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: PathLike, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda h: h.write(data), "wb")


def atomic_write_text(path: PathLike, text: str) -> Path:
    return _atomic_write(path, lambda h: h.write(text.encode("utf-8")), "wb")


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def atomic_save_torch(path: PathLike, obj: Any) -> Path:
    """``torch.save`` through a temp file + fsync + rename."""
    import torch

    return _atomic_write(path, lambda h: torch.save(obj, h), "wb")


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place on success.

    Yields the temporary directory. On an exception it is removed, so ``path`` either
    does not exist or is complete. If another process finished ``path`` first, ours is
    discarded and theirs kept (both are built from the same inputs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent)))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir() would
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(tmp)
        try:
            os.replace(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a benign race: keep the finished copy
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
