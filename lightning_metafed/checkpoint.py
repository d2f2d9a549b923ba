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

Errors name the checkpoint: a save that runs out of disk space says so and that the previous
checkpoint at that path is intact; loading a truncated or foreign file (``trainer.fit(ckpt_path=...)``,
``metafed test --ckpt_path ...``) says it is "truncated or not a checkpoint file" before anything runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lightning_metafed.files import is_disk_full, load_torch_file

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


def _storage_as_saved(storage: Any, location: str) -> Any:
    """``TorchCheckpointIO``'s default ``map_location``: every storage stays on the CPU."""
    return storage


def _weights_only_remedy(path: str) -> str:
    """What to do when ``weights_only`` loading refuses the objects of the checkpoint at ``path``."""
    return (
        f"If you trust the source of {path!r}, pass weights_only=False (`trainer.fit(..., ckpt_path=..., "
        "weights_only=False)`, likewise validate/test/predict; `--weights_only false` on the metafed command "
        "line), or allowlist the classes it holds with torch.serialization.add_safe_globals([...])."
    )


def _disk_full_error(path: str) -> OSError:
    """The error for a save to ``path`` that ran out of disk space (its temporary file already removed)."""
    kept = f"the previous checkpoint at {path!r} is intact" if os.path.exists(path) else f"nothing was written at {path!r}"
    return OSError(
        errno.ENOSPC,
        f"Disk full: no space left on device to save the checkpoint {path!r}; {kept} (the partial temporary file "
        "was removed). Free some disk space, or save checkpoints elsewhere, and save again.",
    )


def _save_atomically(checkpoint: dict[str, Any], local: str) -> None:
    """``torch.save`` to a temporary file beside ``local``, fsync it, rename it over ``local``, fsync the folder."""
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (temp file + fsync + rename),
    and whose errors name the checkpoint.

    A save that runs out of disk space raises ``OSError(ENOSPC)`` saying the previous checkpoint at
    that path is intact. Loading a truncated or foreign file raises ``ValueError`` ("truncated or not
    a checkpoint file"), a missing one ``FileNotFoundError`` (see
    ``lightning_metafed.files.load_torch_file``). Remote saves (``s3://``, ``gs://``, ...) and
    saves with ``storage_options`` go to ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = os.path.abspath(local)
        try:
            _save_atomically(checkpoint, local)
        except Exception as err:  # a KeyboardInterrupt stays one
            if not is_disk_full(err):
                raise
            raise _disk_full_error(local) from err

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = _storage_as_saved,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """``TorchCheckpointIO.load_checkpoint`` whose errors name ``path``. URLs (``http...``) are
        downloaded by ``TorchCheckpointIO``; local and fsspec paths are read here."""
        if str(path).startswith("http"):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_torch_file(
            path, "checkpoint", weights_only=weights_only, map_location=map_location, remedy=_weights_only_remedy(str(path))
        )


def _global_step(path: str) -> int:
    """The ``global_step`` of the checkpoint at ``path``; ``ValueError`` naming ``path`` when it has none."""
    checkpoint = load_torch_file(path, "checkpoint", weights_only=False, map_location="cpu")
    step = checkpoint.get("global_step") if isinstance(checkpoint, Mapping) else None
    if not isinstance(step, int) or isinstance(step, bool):
        found = f"a {type(checkpoint).__name__}" if not isinstance(checkpoint, Mapping) else f"global_step={step!r}"
        raise ValueError(
            f"Cannot read {path!r}: it is not a Lightning checkpoint (expected a dict with an integer "
            f"'global_step' entry, got {found})"
        )
    return step


def latest_checkpoint(directory: str | os.PathLike) -> str:
    """The checkpoint in ``directory`` with the highest ``global_step`` (``last.ckpt`` on a tie).

    Resume from this rather than from ``last.ckpt`` alone: ``ModelCheckpoint`` writes a step
    checkpoint first and ``last.ckpt`` after it, so a run killed in between leaves ``last.ckpt`` one
    save behind (or missing, before the first save completes). Hidden temporary files of
    :class:`AtomicCheckpointIO` are never considered. A checkpoint that cannot be read (truncated,
    not a checkpoint, without ``global_step``) is skipped with a warning naming it and why; when none
    can be read, ``FileNotFoundError`` lists them all.
    """
    names = sorted(p for p in os.listdir(directory) if p.endswith(".ckpt") and not p.startswith("."))
    if not names:
        raise FileNotFoundError(f"No checkpoint (*.ckpt) in {os.fspath(directory)!r}")
    best: str | None = None
    best_key: tuple[int, bool] | None = None
    reasons: list[str] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            key = (_global_step(path), name == "last.ckpt")
        except (OSError, ValueError) as err:
            reasons.append(str(err))
            rank_zero_warn(f"latest_checkpoint: skipping an unreadable checkpoint. {err}")
            continue
        if best_key is None or key > best_key:
            best, best_key = path, key
    if best is None:
        raise FileNotFoundError(f"No readable checkpoint in {os.fspath(directory)!r}: " + "; ".join(reasons))
    return best
