"""Running a function over a round's clients: vmap, a loop, chunks or a compiled vmap; DDP shares.

:class:`ClientRunner` maps a one-client function over stacked clients; :class:`World` says which
share of a round's clients this process computes and how per-client rows and sums are gathered
across processes (one process outside DDP). Neither knows about Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import warnings

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_metafed.functional.client_task import ClientTask, Params

__all__ = ["ClientRunner", "World", "client_slice", "stack_outputs"]


def stack_outputs(outputs: Sequence[Any]) -> Any:
    """Per-client outputs (same pytree structure each) stacked along a new dim 0."""
    flat = [tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    leaves = [torch.stack(column) for column in zip(*(f[0] for f in flat))]
    return tree_unflatten(leaves, spec)


def client_slice(values: Any, index: int | slice) -> Any:
    """Client ``index`` (or a range of clients) of stacked per-client inputs (``None`` leaves stay).

    For one client, a task's step budget becomes a Python int, so a loop runs exactly that many steps.
    """
    if isinstance(values, ClientTask):
        one = ClientTask(*(None if t is None else t[index] for t in values))
        if isinstance(index, int) and one.num_steps is not None:
            one = one._replace(num_steps=int(one.num_steps))
        return one
    return tree_map(lambda t: t[index], values)


def _in_dims(values: Any) -> Any:
    if isinstance(values, ClientTask):
        return ClientTask(*(None if t is None else 0 for t in values))
    return 0


#: ``torch.compile`` modes ``compile_clients`` accepts (``"reduce-overhead"`` uses CUDA graphs on a GPU).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ClientRunner:
    """``fn(*shared, *per_client_i)`` for every client ``i``, outputs stacked along dim 0.

    Vectorized with ``torch.func.vmap`` (``randomness="different"``; at most ``chunk_size`` clients
    at a time) unless ``vectorize=False``; ``compile`` (``True`` or a ``torch.compile`` mode) wraps
    the vmapped function in ``torch.compile`` where the caller asks for it. If vmap fails and a loop succeeds, the runner
    warns once with vmap's error and keeps using the loop (same results, slower).

    Args:
        owner: the name used in the fallback warning (the algorithm's class name).
        warn: how the fallback warning is given (default: ``warnings.warn``).
    """

    def __init__(
        self,
        owner: str,
        vectorize: bool = True,
        chunk_size: int | None = None,
        compile: bool | str = False,
        warn: Callable[[str], None] | None = None,
    ):
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(f"Expected `compile_clients` to be True, False or a torch.compile mode in {COMPILE_MODES}, got {compile!r}")
        self.owner = owner
        self.warn = warn if warn is not None else (lambda message: warnings.warn(message, UserWarning, stacklevel=4))
        self.vectorize = vectorize
        self.chunk_size = chunk_size
        self.compile = compile
        #: vmap's error once it failed and the loop took over (``None`` while vmap works).
        self.vmap_error: str | None = None
        self._compiled: dict[Any, Callable[..., Any]] = {}

    @property
    def vectorized(self) -> bool:
        return self.vectorize and self.vmap_error is None

    def _vmapped(self, fn: Callable[..., Any], in_dims: tuple[Any, ...], chunked: bool, compiled: bool) -> Callable[..., Any]:
        chunk_size = self.chunk_size if chunked else None
        if not (compiled and self.compile):
            return torch.func.vmap(fn, in_dims=in_dims, randomness="different", chunk_size=chunk_size)
        key = (getattr(fn, "__func__", fn), repr(in_dims), chunk_size)
        if key not in self._compiled:
            mode = None if self.compile is True else self.compile
            vmapped = torch.func.vmap(fn, in_dims=in_dims, randomness="different", chunk_size=chunk_size)
            self._compiled[key] = torch.compile(vmapped, mode=mode)
        return self._compiled[key]

    def map(
        self,
        fn: Callable[..., Any],
        shared: Sequence[Any],
        per_client: Sequence[Any],
        chunked: bool = True,
        compiled: bool = False,
    ) -> Any:
        """``fn(*shared, *client_i)`` for every client; ``per_client`` holds stacked inputs (a
        :class:`~lightning_metafed.functional.ClientTask`, dicts of ``[m, ...]`` tensors)."""
        m = tree_flatten(per_client[0])[0][0].shape[0]
        vmap_error = None
        if self.vectorized:
            in_dims = (None,) * len(shared) + tuple(_in_dims(v) for v in per_client)
            try:
                return self._vmapped(fn, in_dims, chunked, compiled)(*shared, *per_client)
            except Exception as err:  # noqa: BLE001 - the loop below re-raises real errors
                vmap_error = f"{type(err).__name__}: {err}"
        outputs = stack_outputs([fn(*shared, *(client_slice(v, i) for v in per_client)) for i in range(m)])
        if vmap_error is not None:
            self.vmap_error = vmap_error
            self.warn(
                f"torch.func.vmap could not vectorize {self.owner}'s clients ({vmap_error.splitlines()[0]}); "
                "falling back to a per-client loop, which gives the same results more slowly."
            )
        return outputs


@dataclass(frozen=True)
class World:
    """The processes sharing a round: ``size``, this process's ``rank`` and its collectives.

    The collectives are needed only when ``size > 1`` (Lightning's ``LightningModule.all_gather``
    and the strategy's ``reduce(..., reduce_op="sum")``).

    Attributes:
        size: the number of processes.
        rank: this process's rank.
        all_gather: ``all_gather(dict of tensors) -> dict of [size, ...]`` (``None`` on one process).
        all_reduce_sum: ``all_reduce_sum(tensor) -> tensor``, the sum over processes (``None`` on one
            process).
    """

    size: int = 1
    rank: int = 0
    all_gather: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None

    def check_round(self, sampled: int) -> None:
        if sampled < self.size:
            raise ValueError(
                f"Expected `clients_per_round` >= the {self.size} DDP processes (each takes a share of the round's "
                f"clients), got a round of {sampled} clients"
            )

    def splits(self, m: int) -> bool:
        """Whether ``m`` clients are split into shares (else every process computes all of them)."""
        return self.size > 1 and m >= self.size

    def share(self, m: int) -> tuple[int, int]:
        """This process's contiguous share ``[lo, hi)`` of ``m`` clients (all of them when not split)."""
        if not self.splits(m):
            return 0, m
        return m * self.rank // self.size, m * (self.rank + 1) // self.size

    def gather_rows(self, values: Mapping[str, Tensor], m: int) -> Params:
        """Every process's share of per-client rows, in client order: ``{name: [m, ...]}`` everywhere."""
        if not self.splits(m):
            return dict(values)
        bounds = [m * r // self.size for r in range(self.size + 1)]
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        padded = {k: torch.cat([v, v.new_zeros((longest - v.shape[0], *v.shape[1:]))]) for k, v in values.items()}
        gathered = self.all_gather(padded)  # {name: [size, longest, ...]}
        return {k: torch.cat([g[r, : bounds[r + 1] - bounds[r]] for r in range(self.size)]) for k, g in gathered.items()}

    def sum_shares(self, values: Mapping[str, Tensor], m: int) -> Params:
        """The sum over processes of each process's partial sums (one collective for all tensors)."""
        if not self.splits(m):
            return dict(values)
        names = list(values)
        if len({(v.dtype, v.device) for v in values.values()}) > 1:  # one collective per tensor then
            return {k: self.all_reduce_sum(v) for k, v in values.items()}
        flat = self.all_reduce_sum(torch.cat([values[k].reshape(-1) for k in names]))
        sizes = [values[k].numel() for k in names]
        return {k: chunk.view_as(values[k]) for k, chunk in zip(names, torch.split(flat, sizes))}
