"""Checks of client data where it enters the data module, and the :class:`DataSpec` they establish.

Every client is checked by one function, :meth:`ClientChecks.check`: ``x`` and ``y`` are tensors
with a leading example dimension of one length ``n >= 1``; floating-point features and targets are
finite; classification targets (the source has ``num_classes``) are integers in
``[0, num_classes)``; and every client's per-example feature shape and dtype, and target shape and
dtype, equal those of the first client checked (the reference). A failure is a ``ValueError`` naming
the client, the field, the offending value and what is allowed.

Populations already in memory are checked in full when the data module is set up
(:meth:`ClientChecks.check_population`: the same checks, with the value checks run over chunks of
concatenated clients); clients loaded on demand are checked as they are loaded (the examples a
round reads from them, all of a round's clients at once: :meth:`ClientChecks.check_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_metafed.data.local_parts import LocalPartPopulation
from lightning_metafed.data.packed import Packed
from lightning_metafed.data.population import (
    ClientData,
    Population,
    SubsetPopulation,
)

__all__ = ["ClientChecks", "DataSpec", "root_population"]

#: Values (features plus targets) concatenated per vectorized check at setup.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class DataSpec:
    """What every client's data looks like: one example's feature and target shapes and dtypes.

    Computed by the data module from its clients (see
    :meth:`~lightning_metafed.data.FederatedDataModule.data_spec`), so a model can check its ``task``
    and net against the data before its first step.

    Attributes:
        feature_shape: ``x.shape[1:]``, the shape of one example's features.
        feature_dtype: the features' dtype.
        target_shape: ``y.shape[1:]`` (``()`` for class labels).
        target_dtype: the targets' dtype.
        num_classes: the source's number of classes; ``None`` when the source does not know it
            (regression, or integer labels given without ``num_classes``).
        integral_targets: the targets have an integer (or bool) dtype, i.e. they are class labels.
    """

    feature_shape: tuple[int, ...]
    feature_dtype: torch.dtype
    target_shape: tuple[int, ...]
    target_dtype: torch.dtype
    num_classes: int | None
    integral_targets: bool

    @property
    def classification(self) -> bool:
        """Whether the data is classification data (``num_classes`` known, or integer targets)."""
        return self.num_classes is not None or self.integral_targets


def root_population(population: Population) -> Population:
    """The population that ``population`` selects from (itself unless it is a split of another)."""
    while isinstance(population, (SubsetPopulation, LocalPartPopulation)):
        population = population.base
    return population


def _first_bad(bad: Tensor, values: Tensor) -> tuple[int, float | int]:
    """``(example index, value)`` of the first true entry of ``bad`` (same shape as ``values``)."""
    flat = int(bad.reshape(-1).nonzero()[0])
    per_example = max(1, values[0].numel()) if values.dim() > 0 and values.shape[0] else 1
    return flat // per_example, values.reshape(-1)[flat].item()


def _values_ok(x: Tensor, y: Tensor, num_classes: int | None) -> bool:
    """Features and targets finite; labels in ``[0, num_classes)`` when ``num_classes`` is known."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        return False
    if y.is_floating_point():
        return bool(torch.isfinite(y).all())
    return num_classes is None or y.numel() == 0 or bool(((y >= 0) & (y < num_classes)).all())


def _value_error(name: str, x: Tensor, y: Tensor, num_classes: int | None) -> ValueError:
    """The message of the first value :func:`_values_ok` rejects."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        row, value = _first_bad(~torch.isfinite(x), x)
        return ValueError(f"Client {name!r}: expected finite features `x` (no NaN or inf), got {value} in example {row}")
    if y.is_floating_point():
        row, value = _first_bad(~torch.isfinite(y), y)
        return ValueError(f"Client {name!r}: expected finite targets `y` (no NaN or inf), got {value} in example {row}")
    row, value = _first_bad((y < 0) | (y >= num_classes), y)
    return ValueError(
        f"Client {name!r}: expected integer labels `y` in [0, {num_classes}) (`num_classes`={num_classes}), "
        f"got {value} in example {row}"
    )


def _float_labels_error(name: str, y: Tensor, num_classes: int) -> ValueError:
    """A float target given to a classification source (``num_classes`` set)."""
    finite = y[torch.isfinite(y)]
    fractional = finite[finite != finite.round()]
    found = (
        f"holding non-integer values such as {fractional[0].item()}"
        if fractional.numel()
        else "holding whole numbers"
    )
    return ValueError(
        f"Client {name!r}: expected integer labels `y` for classification (`num_classes`={num_classes}), "
        f"got a float target of dtype {y.dtype} {found}; pass integer labels (e.g. `y.long()`)"
    )


class ClientChecks:
    """Checks clients against the source's ``num_classes`` and against the first client checked.

    Args:
        num_classes: the source's number of classes; ``None`` for regression (or when unknown).
    """

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes
        #: The :class:`DataSpec` of the reference client (the first one checked); ``None`` before.
        self.spec: DataSpec | None = None
        #: The name of the reference client.
        self.reference: str | None = None

    def check(self, name: str, data: ClientData) -> None:
        """Every check of one client (named ``name`` in messages)."""
        self._check_structure(name, data)
        if not _values_ok(data.x, data.y, self.num_classes):
            raise _value_error(name, data.x, data.y, self.num_classes)

    def check_batch(self, x: Tensor, y: Tensor, valid: Tensor, name_of: Callable[[int], str]) -> None:
        """The examples a batch read from clients loaded on demand (``x``/``y`` of shape
        ``[m, k, ...]``, ``valid`` ``[m, k]`` marking real examples): the same checks as :meth:`check`,
        run on the whole batch at once; when one fails, client by client to name the one at fault."""
        if self.spec is None or not self._batch_ok(x, y):
            for k in range(x.shape[0]):
                self.check(name_of(k), ClientData(x[k][valid[k]], y[k][valid[k]]))

    def _batch_ok(self, x: Tensor, y: Tensor) -> bool:
        spec = self.spec
        same = (tuple(x.shape[2:]), x.dtype, tuple(y.shape[2:]), y.dtype)
        if same != (spec.feature_shape, spec.feature_dtype, spec.target_shape, spec.target_dtype):
            return False
        return _values_ok(x, y, self.num_classes)

    def check_population(self, population: Population) -> None:
        """Every client of an in-memory ``population``: shapes and dtypes one by one, values over
        chunks of concatenated clients (a failing chunk is checked client by client to name one)."""
        n = len(population)
        packed = getattr(population, "packed", None)
        if packed is not None and n:
            return self._check_packed(population, packed)
        start, xs, ys, size = 0, [], [], 0
        for i in range(n):
            data = population.client(i)
            self._check_structure(population.name(i), data)
            xs.append(data.x)  # shapes and dtypes now equal the reference's: they concatenate along dim 0
            ys.append(data.y)
            size += data.x.numel() + data.y.numel()
            if size >= CHUNK_ELEMENTS or i == n - 1:
                if not _values_ok(torch.cat(xs), torch.cat(ys), self.num_classes):
                    for j in range(start, i + 1):
                        self.check(population.name(j), population.client(j))
                start, xs, ys, size = i + 1, [], [], 0

    def _check_packed(self, population: Population, packed: Packed) -> None:
        """A packed population (every client of one per-example shape and dtype by construction): the
        first client sets the reference, values are checked over chunks of the packed examples, and
        a failure is traced to its client by offset."""
        self._check_structure(population.name(0), population.client(0))
        empty = (packed.offsets[1:] == packed.offsets[:-1]).nonzero()
        if empty.numel():
            raise ValueError(f"Client {population.name(int(empty[0]))!r} has no examples")
        total = int(packed.offsets[-1])
        step = max(1, CHUNK_ELEMENTS // max(1, packed.x[:1].numel() + packed.y[:1].numel()))
        for start in range(0, total, step):
            pos = torch.arange(start, min(start + step, total))
            rows = pos if packed.order is None else packed.order[pos]
            x, y = packed.x.index_select(0, rows), packed.y.index_select(0, rows)
            if not _values_ok(x, y, self.num_classes):
                bad = torch.zeros(len(x), dtype=torch.bool)
                for t in (x, y):
                    if t.is_floating_point():
                        bad |= ~torch.isfinite(t).reshape(len(t), -1).all(1)
                    elif t is y and self.num_classes is not None:
                        bad |= ((t < 0) | (t >= self.num_classes)).reshape(len(t), -1).any(1)
                for client in torch.searchsorted(packed.offsets, pos[bad], right=True).unique() - 1:
                    self.check(population.name(int(client)), population.client(int(client)))

    def check_populations(self, populations: Mapping[str, Population], limit: int) -> set[int]:
        """Check every client of each population whose clients are in memory
        (``Population.in_memory``) and number at most ``limit``, each underlying population once.
        Returns the ``id``s of the given populations so covered: their clients need no check when loaded."""
        covered: set[int] = set()
        done: set[int] = set()
        for population in populations.values():
            root = root_population(population)
            if not getattr(root, "in_memory", False) or len(root) > limit:
                continue
            if id(root) not in done:
                self.check_population(root)
                done.add(id(root))
            covered.add(id(population))
        return covered

    def _check_structure(self, name: str, data: ClientData) -> None:
        """Types, lengths, label dtype, and shapes and dtypes against the reference client."""
        x, y = data.x, data.y
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError(f"Client {name!r}: expected x and y to be tensors, got {type(x).__name__}, {type(y).__name__}")
        if x.dim() == 0 or y.dim() == 0:
            raise ValueError(
                f"Client {name!r}: expected `x` and `y` of shape [n, ...] (n examples), "
                f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"Client {name!r}: x has {x.shape[0]} examples but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError(f"Client {name!r} has no examples")
        if self.num_classes is not None and y.is_floating_point():
            raise _float_labels_error(name, y, self.num_classes)
        if self.spec is None:
            integral = not (y.is_floating_point() or y.is_complex())
            self.spec = DataSpec(tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype, self.num_classes, integral)
            self.reference = name
            return
        spec = self.spec
        for field, what, value, shape, dtype in (
            ("x", "features", x, spec.feature_shape, spec.feature_dtype),
            ("y", "targets", y, spec.target_shape, spec.target_dtype),
        ):
            if tuple(value.shape[1:]) != shape:
                raise ValueError(
                    f"Client {name!r}: expected {what} `{field}` of per-example shape {shape} like client "
                    f"{self.reference!r}, got {tuple(value.shape[1:])} (`{field}` has shape {tuple(value.shape)}); "
                    f"every client's {what} must have one shape"
                )
            if value.dtype != dtype:
                raise ValueError(
                    f"Client {name!r}: expected {what} `{field}` of dtype {dtype} like client {self.reference!r}, "
                    f"got {value.dtype}; give every client's {what} one dtype"
                )
