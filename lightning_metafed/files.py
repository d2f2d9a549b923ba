"""Reading and writing files with errors a user can act on: which file, and what is wrong with it.

A file that cannot be decoded (cut short by a crash or a full disk, random bytes, empty, another
format) raises ``ValueError`` naming the path and saying it is "truncated or not a <kind> file",
with the decoder's own first line in parentheses and its error chained (``from``). A missing or
unreadable file keeps its ``OSError`` type (``FileNotFoundError``, ``PermissionError``, ...) and
names the path. A torch file that ``weights_only`` loading refuses raises ``pickle.UnpicklingError``
saying so and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
from typing import IO, Any

import fsspec
import torch

__all__ = ["is_disk_full", "load_json_file", "load_torch_file"]

#: ``torch.save``'s zip format starts with a zip local-file header.
_ZIP_MAGIC = b"PK\x03\x04"
#: The legacy (non-zip) ``torch.save`` format starts with a pickled magic number.
_LEGACY_MAGICS = tuple(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in (2, 3, 4, 5))
_HEADER_SIZE = max(len(_ZIP_MAGIC), *(len(m) for m in _LEGACY_MAGICS))
#: What torch's decoders raise on bytes that are not (or no longer) a torch file.
_DECODE_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, zipfile.BadZipFile)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_DETAIL = 200


def load_torch_file(
    path: str | os.PathLike,
    what: str,
    *,
    weights_only: bool | None = True,
    map_location: Any = None,
    remedy: str | None = None,
) -> Any:
    """``torch.load(path)`` whose failures name ``path`` (local paths or fsspec URLs).

    Args:
        what: the kind of file, for messages (``"checkpoint"`` → "not a checkpoint file").
        weights_only: as for :func:`torch.load` (``None``: torch's default, ``True`` since torch 2.6).
        map_location: as for :func:`torch.load`.
        remedy: what to do when ``weights_only`` loading refuses the file's objects (default: load
            it with ``weights_only=False`` if its source is trusted, or allowlist its classes).

    Raises:
        FileNotFoundError: ``path`` does not exist. Other ``OSError``: it cannot be read.
        ValueError: the file is truncated, empty or not a torch file.
        pickle.UnpicklingError: a readable torch file holding objects ``weights_only`` loading refuses.
    """
    name = os.fspath(path)
    with _open(name, what) as f:
        header = f.read(_HEADER_SIZE)
        f.seek(0)
        try:
            return torch.load(f, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            error = _torch_error(err, f, header, name, what, remedy)
            if error is None:  # a readable torch file whose objects failed to build: the original says why
                err.add_note(f"While reading the {what} file {name!r}")
                raise
            raise error from err


def load_json_file(path: str | os.PathLike, what: str) -> Any:
    """``json.load`` of ``path`` (UTF-8, -16 or -32) whose failures name ``path``.

    Args:
        what: the kind of file, for messages (``"LEAF JSON"`` → "not a LEAF JSON file").

    Raises:
        FileNotFoundError: ``path`` does not exist. Other ``OSError``: it cannot be read.
        ValueError: the file is truncated, empty, not valid JSON or not valid UTF-8.
    """
    name = os.fspath(path)
    with _open(name, what) as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        detail = "the file is empty" if not raw.strip() else f"json.load failed: {_first_line(err)}"
        raise ValueError(_undecodable(name, what, detail)) from err


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, says the disk is full
    (``ENOSPC``; torch's zip writer re-raises a failed write as a ``RuntimeError`` about its stream)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _open(name: str, what: str) -> IO[bytes]:
    """``name`` opened for binary reading; a failure keeps its ``OSError`` type and names the file."""
    fs, local = fsspec.core.url_to_fs(name)
    try:
        return fs.open(local, "rb")
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            text = f"No such {what} file"
        elif isinstance(err, IsADirectoryError):
            text = f"Expected a {what} file, found a folder"
        else:
            text = f"Cannot read the {what} file ({err.strerror or _first_line(err)})"
        if err.errno is None:
            raise type(err)(f"{text}: {name!r}") from err
        raise OSError(err.errno, text, name) from err  # OSError picks the subclass from errno


def _torch_error(err: Exception, f: IO[bytes], header: bytes, name: str, what: str, remedy: str | None) -> Exception | None:
    """The error to raise for ``torch.load``'s ``err`` on ``f``; ``None`` to re-raise ``err`` itself."""
    if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):  # the disk failed mid-read
        return OSError(err.errno, f"Cannot read the {what} file ({err.strerror or _first_line(err)})", name)
    if isinstance(err, pickle.UnpicklingError) and _is_weights_only_refusal(err) and _is_torch_file(f, header):
        remedy = remedy or (
            f"If you trust the source of {name!r}, load it with weights_only=False; otherwise allowlist the "
            f"classes it holds with torch.serialization.add_safe_globals([...])."
        )
        return pickle.UnpicklingError(
            f"Cannot load {name!r} with weights_only=True: the {what} file is readable but holds objects that "
            f"weights_only loading does not allow ({_first_line(err)}). {remedy}"
        )
    looks_like_torch = header.startswith(_ZIP_MAGIC) or header.startswith(_LEGACY_MAGICS)
    if looks_like_torch and not isinstance(err, (*_DECODE_ERRORS, OSError)):
        return None
    detail = "the file is empty" if not header else f"torch.load failed: {_first_line(err)}"
    return ValueError(_undecodable(name, what, detail))


def _is_weights_only_refusal(err: pickle.UnpicklingError) -> bool:
    text = str(err)
    return "Weights only load failed" in text or "weights_only" in text


def _is_torch_file(f: IO[bytes], header: bytes) -> bool:
    """Whether ``f`` is a complete ``torch.save`` file (a whole zip archive, or the legacy format)."""
    if header.startswith(_LEGACY_MAGICS):
        return True
    if not header.startswith(_ZIP_MAGIC):
        return False
    try:
        return zipfile.is_zipfile(f)
    except OSError:
        return False


def _undecodable(name: str, what: str, detail: str) -> str:
    return f"Cannot read {name!r}: it is truncated or not a {what} file ({detail})"


def _first_line(err: BaseException) -> str:
    """The first sentence of ``err``'s message (for torch's weights_only errors, of its unpickler's
    reason), or the error's type name when it has no message."""
    text = _ANSI.sub("", str(err))
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.DOTALL)
    if reason is not None:
        text = reason.group(1)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line.split(". ", 1)[0].rstrip(".") if line else type(err).__name__
    return line if len(line) <= _MAX_DETAIL else line[: _MAX_DETAIL - 3] + "..."
