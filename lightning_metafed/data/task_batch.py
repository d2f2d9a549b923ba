"""``TaskBatch``: ``m`` clients' tasks stacked along dim 0."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from lightning_metafed.functional.client_task import ClientTask

__all__ = ["TaskBatch", "stack_tasks"]


@dataclass
class TaskBatch:
    """A batch of ``m`` client tasks.

    Attributes:
        support_x: ``[m, S, ...]`` inputs each client adapts on.
        support_y: ``[m, S, ...]`` their targets.
        query_x: ``[m, Q, ...]`` inputs the adapted model is scored on.
        query_y: ``[m, Q, ...]`` their targets.
        weight: optional ``[m]`` non-negative aggregation weights (e.g. client sample counts).
        client_id: optional ids, a ``[m]`` tensor or a sequence of ``m`` ids.
        support_mask: optional ``[m, S]``: 1 (or ``True``) for real examples, 0 for padding; bool or
            any real dtype holding only 0/1.
        query_mask: optional ``[m, Q]``, likewise.
        num_steps: optional ``[m]`` integer local-step budget per client (heterogeneous compute;
            set by :class:`~lightning_metafed.faults.ClientFaults` during training).

    Checked on construction (a ``ValueError`` naming the field, the shape received and the shape
    expected): one ``m`` for every field; ``S`` shared by ``support_x``/``support_y`` and ``Q`` by
    ``query_x``/``query_y``; support and query of one per-example shape and dtype (inputs, and
    targets); ``weight`` finite, ``>= 0`` and not all zero; masks of shape ``[m, S]``/``[m, Q]``
    holding only 0/1.
    Lightning moves the batch between devices with :meth:`to`; from pinned memory (see
    :meth:`pin_memory`) the copies are asynchronous.

    Example:
        >>> import torch
        >>> from lightning_metafed import TaskBatch
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(3, 8, 2), torch.randn(3, 8, 1)  # 3 clients, 8 examples each
        >>> batch = TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:], weight=torch.tensor([5.0, 5.0, 10.0]))
        >>> batch.num_clients, tuple(batch.support_x.shape), tuple(batch.query_x.shape)
        (3, (3, 5, 2), (3, 3, 2))
        >>> batch[1:].num_clients  # a sub-batch of clients
        2
        >>> TaskBatch.collate([batch[0], batch[2]]).weight
        tensor([ 5., 10.])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    weight: Tensor | None = None
    client_id: Tensor | Sequence[Any] | None = None
    support_mask: Tensor | None = None
    query_mask: Tensor | None = None
    num_steps: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("support_x", "support_y", "query_x", "query_y"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise ValueError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}")
            if value.dim() < 2:
                raise ValueError(
                    f"Expected `{name}` to have shape [m, n, ...] (clients, examples, ...), got shape {tuple(value.shape)}"
                )
        self._check_data_shapes()
        m = self.support_x.shape[0]
        if self.weight is not None:
            self.weight = torch.as_tensor(self.weight)
            if self.weight.shape != (m,):
                raise ValueError(f"Expected `weight` to have shape [{m}], got {tuple(self.weight.shape)}")
        if self.client_id is not None:
            if isinstance(self.client_id, Tensor) and self.client_id.dim() != 1:
                raise ValueError(f"Expected `client_id` to have shape [{m}], got {tuple(self.client_id.shape)}")
            if len(self.client_id) != m:
                raise ValueError(f"Expected `client_id` to hold {m} ids, got {len(self.client_id)}")
        for name, x in (("support_mask", self.support_x), ("query_mask", self.query_x)):
            mask = getattr(self, name)
            if mask is None:
                continue
            if not isinstance(mask, Tensor):
                raise ValueError(f"Expected `{name}` to be a torch.Tensor or None, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"Expected `{name}` to have shape {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            if mask.is_complex():
                raise ValueError(f"Expected `{name}` to be a bool or 0/1 tensor, got dtype {mask.dtype}")
        if self.num_steps is not None and (
            not isinstance(self.num_steps, Tensor) or self.num_steps.shape != (m,) or self.num_steps.is_floating_point()
        ):
            raise ValueError(f"Expected `num_steps` to be an integer tensor of shape ({m},), got {self.num_steps!r}")
        self._check_values()

    def _check_data_shapes(self) -> None:
        """``m`` shared by the four tensors; S and Q shared by x and y; support and query examples
        (and targets) of one shape and dtype."""
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        m = sx.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            value = getattr(self, name)
            if value.shape[0] != m:
                raise ValueError(
                    f"TaskBatch tensors disagree in the number of clients m: `support_x` has {m}, `{name}` has "
                    f"{value.shape[0]} (expected `{name}` of shape [{m}, ...], got {tuple(value.shape)})"
                )
        for y, y_name, x, x_name in ((sy, "support_y", sx, "support_x"), (qy, "query_y", qx, "query_x")):
            if y.shape[1] != x.shape[1]:
                raise ValueError(
                    f"Expected `{y_name}` to have {x.shape[1]} examples per client like `{x_name}`, got {y.shape[1]} "
                    f"(expected shape [{m}, {x.shape[1]}, ...], got {tuple(y.shape)})"
                )
        for q, q_name, s, s_name, what in ((qx, "query_x", sx, "support_x", "inputs"), (qy, "query_y", sy, "support_y", "targets")):
            if q.shape[2:] != s.shape[2:]:
                expected = (m, q.shape[1], *s.shape[2:])
                raise ValueError(
                    f"Expected `{q_name}` to have shape {expected} ([m, Q] and the per-example shape "
                    f"{tuple(s.shape[2:])} of `{s_name}`), got {tuple(q.shape)}: support and query {what} must match"
                )
            if q.dtype != s.dtype:
                raise ValueError(f"Expected `{q_name}` to have the dtype of `{s_name}` ({s.dtype}), got {q.dtype}")

    def _check_values(self) -> None:
        """``weight`` finite, >= 0 and not all zero; masks hold only 0/1 (one device sync for all)."""
        masks = [(name, getattr(self, name)) for name in ("support_mask", "query_mask") if getattr(self, name) is not None]
        checks = [((mask == 0) | (mask == 1)).all() for _, mask in masks]
        w = self.weight
        if w is not None:
            checks += [torch.isfinite(w).all() & (w >= 0).all() & (w.sum() > 0)]
        if not checks or bool(torch.stack([c.to(checks[0].device) for c in checks]).all()):
            return
        for name, mask in masks:
            if not bool(((mask == 0) | (mask == 1)).all()):
                bad = mask[(mask != 0) & (mask != 1)]
                raise ValueError(f"Expected `{name}` to hold only 0/1 (1: a real example, 0: padding), got {bad[0].item()}")
        raise ValueError(f"Expected `weight` to be finite, >= 0 and not all zero, got {w.tolist()}")

    @property
    def num_clients(self) -> int:
        """``m``, the number of clients in the batch."""
        return self.support_x.shape[0]

    def tasks(self) -> ClientTask:
        """The stacked tensors as a :class:`~lightning_metafed.functional.ClientTask`."""
        return ClientTask(
            self.support_x, self.support_y, self.query_x, self.query_y, self.support_mask, self.query_mask, self.num_steps
        )

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> TaskBatch:
        """A new batch with ``fn`` applied to every tensor field."""
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(self, **changes)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool | None = None
    ) -> TaskBatch:
        """Move every tensor to ``device``; cast floating-point tensors (not integer labels) to
        ``dtype``. ``non_blocking`` (default: for tensors in pinned memory) copies asynchronously."""

        def move(t: Tensor) -> Tensor:
            asynchronous = t.is_pinned() if non_blocking is None else non_blocking
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=asynchronous)

        return self.map_tensors(move)

    def pin_memory(self) -> TaskBatch:
        """A new batch with every tensor field in page-locked (pinned) host memory, from which
        copies to a CUDA device can run asynchronously. Needs CUDA: ``Tensor.pin_memory`` raises on
        a machine without it, so call this only for batches bound for a CUDA device. Also what
        ``DataLoader(pin_memory=True)`` calls on each batch."""
        return self.map_tensors(lambda t: t.pin_memory())

    def __getitem__(self, index: int | slice | Tensor) -> TaskBatch:
        """The sub-batch of clients ``index``: an int (keeps a client dim of 1), a slice, or a
        tensor of client positions or a boolean ``[m]`` mask."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        if isinstance(index, Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        client_id = self.client_id
        if client_id is not None:
            if isinstance(client_id, Tensor):
                client_id = client_id[index.to(client_id.device) if isinstance(index, Tensor) else index]
            elif isinstance(index, Tensor):
                client_id = [client_id[i] for i in index.tolist()]
            else:
                client_id = client_id[index]

        def take(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t[index.to(t.device)] if isinstance(index, Tensor) else t[index]

        return replace(self, **{f.name: take(getattr(self, f.name)) for f in fields(self) if f.name != "client_id"}, client_id=client_id)

    @staticmethod
    def collate(tasks: Sequence[TaskBatch]) -> TaskBatch:
        """Concatenate batches (e.g. single-client batches from a Dataset) along the client dim."""
        if len(tasks) == 0:
            raise ValueError("Expected at least one TaskBatch to collate, got an empty sequence")

        def cat(name: str) -> Tensor | None:
            values = [getattr(t, name) for t in tasks]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"Cannot collate TaskBatches where only some have `{name}`")
            return torch.cat(values, dim=0)

        ids = [t.client_id for t in tasks]
        client_id: Any = None
        if all(i is not None for i in ids):
            client_id = torch.cat(ids) if all(isinstance(i, Tensor) for i in ids) else [c for i in ids for c in i]
        return TaskBatch(
            cat("support_x"),
            cat("support_y"),
            cat("query_x"),
            cat("query_y"),
            cat("weight"),
            client_id,
            cat("support_mask"),
            cat("query_mask"),
            cat("num_steps"),
        )


def stack_tasks(
    tasks: list[tuple[Tensor, Tensor, Tensor, Tensor]], weights: list[float], ids: list[int]
) -> TaskBatch:
    """Stack per-client ``(support_x, support_y, query_x, query_y)`` into a TaskBatch, padding
    clients of different sizes to the largest and marking real examples in the masks.

    Args:
        tasks: each client's ``(support_x, support_y, query_x, query_y)``.
        weights: each client's aggregation weight (e.g. its sample count).
        ids: each client's id.
    """

    def pad(tensors: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        longest = max(t.shape[0] for t in tensors)
        if all(t.shape[0] == longest for t in tensors):
            return torch.stack(tensors), None
        out = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
        mask = torch.zeros(len(tensors), longest)
        for i, t in enumerate(tensors):
            out[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = 1.0
        return out, mask

    sx, s_mask = pad([t[0] for t in tasks])
    sy, _ = pad([t[1] for t in tasks])
    qx, q_mask = pad([t[2] for t in tasks])
    qy, _ = pad([t[3] for t in tasks])
    return TaskBatch(
        sx, sy, qx, qy, torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.long), s_mask, q_mask
    )
