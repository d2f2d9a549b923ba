"""A per-client state store whose resident memory is bounded: rows beyond the bound spill to disk.

:class:`SpillingClientState` keeps at most ``max_resident_rows`` rows in memory (the most recently
written or gathered ones) and the others in one scratch file of fixed-size records, so a long run
over a large population holds only a bounded number of rows in RAM. Like
:class:`~lightning_metafed.round.state.InMemoryClientState` it takes space only for visited clients
(a dict from client key to record slot), and its :meth:`~SpillingClientState.state_dict` has the same
format, so checkpoints move freely between the two stores.

On-disk layout: one file ``metafed-client-state-*.rows`` per store, created in ``directory`` with a
unique name on the first eviction. Record ``slot`` starts at byte ``slot * record_bytes``; a record is
the row's entries in the order of the first initial row, each the raw bytes of its C-contiguous
values in the store's dtype (host byte order), so a round trip through disk is bitwise exact. A
client's slot is fixed at its first write, so the file never exceeds ``visited clients *
record_bytes`` bytes. The file is scratch, not a durable copy: it is removed by
:meth:`~SpillingClientState.close` or when the store is garbage collected, and files left in
``directory`` by other stores are never read.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import Params
from lightning_metafed.round.state import _checked_rows, client_keys

__all__ = ["SpillingClientState"]


@dataclass(frozen=True)
class _Entry:
    """One named tensor of a row: its shape, dtype, device and place in a record."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    offset: int
    nbytes: int


class _ScratchFile:
    """An open scratch file of fixed-size records, removed by :meth:`remove` or garbage collection."""

    def __init__(self, directory: Path, owner: object):
        fd, path = tempfile.mkstemp(prefix="metafed-client-state-", suffix=".rows", dir=directory)
        self.fd, self.path = fd, path
        self._finalizer = weakref.finalize(owner, _remove_file, fd, path)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``."""
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"Short read from the client-state scratch file {self.path!r} at byte {offset}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (the file grows as needed)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def remove(self) -> None:
        """Close and delete the file (idempotent)."""
        self._finalizer()


def _remove_file(fd: int, path: str) -> None:
    """Close and delete a scratch file (idempotent through :class:`weakref.finalize`)."""
    os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SpillingClientState:
    """Per-client rows with at most ``max_resident_rows`` in memory; the rest in a scratch file.

    Implements :class:`~lightning_metafed.round.state.ClientStateStore`. The row layout (entry names,
    shapes, dtypes, device) is fixed by the first ``initial(key)`` call; written rows must have the
    same entries and shapes and a dtype that casts to the layout's without loss (e.g. float32 into a
    float64 entry); they are stored in the layout's dtype. Rows read back from disk are placed on the
    initial row's device.

    The checkpoint (:meth:`state_dict`) is the durable copy and holds every visited client's row,
    those in memory and those on disk: for a very large store it is as large as the spill file.

    Args:
        initial: ``initial(client_key) -> {name: tensor}``, the state of a client never seen.
        directory: where the scratch file is created (on the first eviction).
        max_resident_rows: how many rows may be held in memory at once (``0``: every row on disk).
    """

    def __init__(self, initial: Callable[[Any], Mapping[str, Tensor]], directory: str | os.PathLike[str], max_resident_rows: int):
        if not isinstance(max_resident_rows, int) or isinstance(max_resident_rows, bool) or max_resident_rows < 0:
            raise ValueError(f"Expected `max_resident_rows` to be an int >= 0, got {max_resident_rows!r}")
        if not Path(directory).is_dir():
            raise ValueError(f"Expected `directory` to be an existing directory for the scratch file, got {str(directory)!r}")
        self.initial = initial
        self.directory = Path(directory)
        self.max_resident_rows = max_resident_rows
        self._entries: list[_Entry] | None = None
        self._record_bytes = 0
        self._slots: dict[Any, int] = {}
        self._resident: OrderedDict[Any, Params] = OrderedDict()
        self._file: _ScratchFile | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def num_resident(self) -> int:
        """How many rows are held in memory now (never more than ``max_resident_rows``)."""
        return len(self._resident)

    @property
    def path(self) -> str | None:
        """The scratch file, or ``None`` before the first eviction and after :meth:`close`."""
        return None if self._file is None else self._file.path

    def gather(self, client_id: Any) -> Params:
        """The clients' rows stacked: ``{name: [m, ...]}`` (initial rows for unseen clients; copies)."""
        self._check_open()
        rows = [self._row(key) for key in client_keys(client_id)]
        if not rows:
            entries = self._entries or []
            return {e.name: torch.empty((0, *e.shape), dtype=e.dtype, device=e.device) for e in entries}
        return {entry.name: torch.stack([row[entry.name] for row in rows]) for entry in self._entries}

    def write(self, client_id: Any, rows: Mapping[str, Tensor]) -> None:
        """Store ``rows`` (``{name: [m, ...]}``, detached copies) as the state of these clients.

        Raises:
            ValueError: naming the client and entry whose name, shape or dtype does not fit the
                layout; then no row of the call is stored.
        """
        self._check_open()
        keys = client_keys(client_id)
        conformed = [self._conformed(key, {name: value[i] for name, value in rows.items()}) for i, key in enumerate(keys)]
        for key, row in zip(keys, conformed):
            self._put(key, row)

    def state_dict(self) -> dict[str, Any]:
        """``{"rows": {client key: {name: tensor}}}`` for every stored client (memory and disk), the
        format of :meth:`InMemoryClientState.state_dict`; self-contained (no reference to the file)."""
        self._check_open()
        return {"rows": {key: self._stored(key, slot) for key, slot in self._slots.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace every row by those of ``state`` (what :meth:`state_dict` of either store returned).

        Raises:
            ValueError: naming the malformed entry (as :meth:`InMemoryClientState.load_state_dict`,
                or a dtype that does not cast to the layout's without loss); the store is left unchanged.
        """
        self._check_open()
        rows = _checked_rows(state, self.initial)
        conformed = [(key, self._conformed(key, row)) for key, row in rows.items()]
        self._clear()
        for key, row in conformed:
            self._put(key, row)

    def close(self) -> None:
        """Forget every row and remove the scratch file; the store refuses further use."""
        self._clear()
        self._closed = True

    def __getstate__(self) -> dict[str, Any]:
        """A pickle (or deep copy) carries the rows themselves, never the scratch file."""
        rows = None if self._closed else self.state_dict()
        return {"initial": self.initial, "directory": self.directory, "max_resident_rows": self.max_resident_rows, "rows": rows}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A store of its own (a new scratch file on its first eviction) holding the pickled rows."""
        self.__init__(state["initial"], state["directory"], state["max_resident_rows"])
        if state["rows"] is None:
            self._closed = True
        elif state["rows"]["rows"]:
            self.load_state_dict(state["rows"])

    # ------------------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        """Refuse use after :meth:`close`."""
        if self._closed:
            raise ValueError("This SpillingClientState was closed (its rows were discarded); use a new store")

    def _clear(self) -> None:
        """Forget every row and remove the scratch file (the layout is kept)."""
        self._slots.clear()
        self._resident.clear()
        if self._file is not None:
            self._file.remove()
            self._file = None

    def _row(self, key: Any) -> Params:
        """A client's row for :meth:`gather`: resident (marked recently used), on disk, or initial."""
        if key in self._resident:
            self._resident.move_to_end(key)
            return self._resident[key]
        slot = self._slots.get(key)
        if slot is not None:
            return self._read(slot)
        initial = self.initial(key)
        self._layout(key, initial)
        return self._conformed(key, initial, clone=False)

    def _stored(self, key: Any, slot: int) -> Params:
        """A copy of a stored client's row."""
        row = self._resident.get(key)
        return {name: value.clone() for name, value in row.items()} if row is not None else self._read(slot)

    def _put(self, key: Any, row: Params) -> None:
        """Make ``row`` the client's resident row, evicting least recently used rows to disk."""
        self._slots.setdefault(key, len(self._slots))
        self._resident[key] = row
        self._resident.move_to_end(key)
        while len(self._resident) > self.max_resident_rows:
            old, old_row = self._resident.popitem(last=False)
            self._spill(self._slots[old], old_row)

    def _layout(self, key: Any, first: Mapping[str, Tensor] | None = None) -> list[_Entry]:
        """The row layout, fixed by the first initial row (``first``, else ``initial(key)``, if not yet known)."""
        if self._entries is None:
            first = self.initial(key) if first is None else first
            entries, offset = [], 0
            for name, value in first.items():
                nbytes = math.prod(value.shape) * value.element_size()
                entries.append(_Entry(name, tuple(value.shape), value.dtype, value.device, offset, nbytes))
                offset += nbytes
            self._entries, self._record_bytes = entries, offset
        return self._entries

    def _conformed(self, key: Any, row: Mapping[str, Tensor], clone: bool = True) -> Params:
        """``row`` checked against the layout (entries, shapes, lossless dtype) in the layout's dtype."""
        entries = self._layout(key)
        names = [entry.name for entry in entries]
        if set(row) != set(names):
            raise ValueError(
                f"Per-client state of client {key!r}: expected the entries {sorted(map(str, names))}, got {sorted(map(str, row))}"
            )
        out: Params = {}
        for entry in entries:
            value = row[entry.name]
            if tuple(value.shape) != entry.shape:
                raise ValueError(
                    f"Per-client state of client {key!r}: expected entry {entry.name!r} of shape {list(entry.shape)}, "
                    f"got shape {list(value.shape)}"
                )
            if torch.promote_types(value.dtype, entry.dtype) != entry.dtype:
                raise ValueError(
                    f"Per-client state of client {key!r}: expected entry {entry.name!r} of dtype {entry.dtype} "
                    f"(or one that casts to it without loss), got {value.dtype}"
                )
            out[entry.name] = value.detach().to(entry.dtype, copy=clone)
        return out

    def _spill(self, slot: int, row: Params) -> None:
        """Write a row to its record in the scratch file (created on first use)."""
        if self._file is None:
            self._file = _ScratchFile(self.directory, self)
        parts = [_to_bytes(row[entry.name]) for entry in self._entries]
        self._file.write(slot * self._record_bytes, b"".join(parts))

    def _read(self, slot: int) -> Params:
        """A row read back from its record (fresh tensors, bitwise equal to what was written)."""
        data = self._file.read(slot * self._record_bytes, self._record_bytes) if self._record_bytes else b""
        return {entry.name: _from_bytes(data[entry.offset : entry.offset + entry.nbytes], entry) for entry in self._entries}


def _to_bytes(value: Tensor) -> bytes:
    """The raw bytes of a tensor's values in C order."""
    flat = value.detach().resolve_conj().resolve_neg().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _from_bytes(data: bytes, entry: _Entry) -> Tensor:
    """A tensor of ``entry``'s shape, dtype and device holding ``data``."""
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype, device=entry.device)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(entry.dtype).reshape(entry.shape).to(entry.device)
