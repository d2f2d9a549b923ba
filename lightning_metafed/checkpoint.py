"""``AtomicCheckpointIO``: checkpoints that are either the old file or the complete new one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file is made
by ``tempfile.mkstemp()`` in ``$TMPDIR``, then moved with ``shutil.move``. When ``$TMPDIR`` is on
another filesystem than the checkpoint (a tmpfs ``/tmp``, a mounted volume), the rename fails with
``EXDEV`` and ``shutil.move`` falls back to copying *into the destination path*: a process killed
during that copy leaves a truncated checkpoint where the previous one used to be. Nothing is fsynced
either, so a machine crash can lose a checkpoint that was reported as saved.

This plugin writes the temporary file next to the destination (so the final ``os.replace`` is a
same-directory rename, atomic on POSIX filesystems), fsyncs it before the rename and fsyncs the
directory after it. Usage: ``Trainer(plugins=[AtomicCheckpointIO()])``.

A process killed mid-write leaves at most a hidden ``.<name>.<pid>.<hex>.tmp`` file beside the
checkpoints; it never has the ``.ckpt`` suffix, so ``ModelCheckpoint`` and ``ckpt_path="last"``
ignore it, and it can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "latest_checkpoint"]


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (temp file + fsync + rename).

    Remote paths (``s3://``, ``gs://``, ...) and ``storage_options`` go to ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = os.path.abspath(local)
        directory = os.path.dirname(local)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(local)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        # O_EXCL: never write into someone else's file; mode 0o666 lets the umask decide, like open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)  # atomic: readers see the old file or the complete new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_dir(directory)


def latest_checkpoint(directory: str | os.PathLike) -> str:
    """The checkpoint in ``directory`` with the highest ``global_step`` (``last.ckpt`` on a tie).

    Resume from this rather than from ``last.ckpt`` alone: ``ModelCheckpoint`` writes a step
    checkpoint first and ``last.ckpt`` after it, so a run killed in between leaves ``last.ckpt`` one
    save behind (or missing, before the first save completes). Hidden temporary files of
    :class:`AtomicCheckpointIO` are never considered.
    """
    paths = sorted(p for p in os.listdir(directory) if p.endswith(".ckpt") and not p.startswith("."))
    if not paths:
        raise FileNotFoundError(f"No checkpoint (*.ckpt) in {os.fspath(directory)!r}")

    def key(name: str) -> tuple[int, bool]:
        step = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=False)["global_step"]
        return step, name == "last.ckpt"

    return os.path.join(directory, max(paths, key=key))
