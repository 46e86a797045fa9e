"""Atomic artifact writes: a killed stage leaves the old file or the new one, never a torn one.

Everything a stage writes goes through these helpers: write to a temporary sibling, flush and
fsync, then ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Re-raise a failed write as an ``OSError`` naming ``path``.

    torch and safetensors report a full disk as their own exception types (or as an OSError
    without a file name); the stages turn an ``OSError`` into one line, ``error: cannot write
    <path>: No space left on device``, instead of a traceback.
    """
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except Exception as exc:
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with write_errors(path):
            yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are shared files
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # mkstemp/mkdtemp names above


def remove_stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete the hidden temporaries killed writers left in ``directory`` (only those of
    ``name`` when given); returns them.

    A kill skips the writer's cleanup, and a checkpoint's temporary directory is the size of
    the model and optimizer. Call it only where no other process writes the same names (a
    held :func:`output_lock`, or ``name`` = the directory this process is about to replace).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = []
    for path in directory.iterdir():
        match = _TEMP_RE.match(path.name)
        if match and (name is None or match["name"] == name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the C library or the filesystem lacks it (the caller then falls back
    to two renames, which a kill can interrupt).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | Path) -> None:
    """Finish a directory swap a kill interrupted: bring ``.<name>.old`` back when ``path``
    is missing (the two-rename fallback was killed in between), else delete it."""
    path = Path(path)
    old = _old_name(path)
    if old.is_dir():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes the umask gives new files: mkdtemp
    makes 0700 and safetensors writes 0600, and teammates must read shared checkpoints."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` (a whole checkpoint) on success.

    The old directory and the new one are swapped in one ``renameat2`` exchange where the
    system has it, so ``path`` is always visible, old or new; elsewhere, two renames and
    :func:`recover_dir` on the next write. Stale temporaries of ``path`` from killed writers
    are deleted first. The directory and its files follow the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    remove_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with write_errors(path):
            yield tmp
        _follow_umask(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # tmp now holds the old directory when it worked
            old = _old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OutputLockedError(RuntimeError):
    """Another live process holds the output directory's lock."""


@contextlib.contextmanager
def output_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``<directory>/.lock`` (``flock``) for the duration; a second holder fails at once.

    Two runs writing one output directory would interleave metrics rows and overwrite each
    other's checkpoints. The kernel drops the lock when its process dies, even by SIGKILL, so
    a crashed run never leaves a stale lock; the file stays and records the holder's pid.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise OutputLockedError(f"another run is writing {directory} (lock {lock} held by "
                                    f"pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield lock
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Encode uint8 frames [T, H, W, 3] as lossless H.264 (yuv420p, qp 0) with PyAV.

    Lossless on purpose: lossy x264 here is not deterministic (the same frames encoded twice
    decode to pixels differing by up to 7 in a few percent of videos), which made the data
    stage, and everything trained on it, differ between two runs of the same pipeline.
    """
    import av  # local import: only the data stage writes videos

    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=_fps_fraction(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"qp": "0", "preset": "veryfast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1000)
