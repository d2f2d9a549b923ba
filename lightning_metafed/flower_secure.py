"""Secure aggregation on Flower with Flower's own SecAgg+ protocol (Bell, Bonawitz, Gascón,
Lepoint & Raykova, 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead").

The server runs :class:`flwr.server.workflow.SecAggPlusWorkflow` each round and the ClientApp
carries :func:`flwr.client.mod.secaggplus_mod`: every client quantizes its upload to integers,
masks it with pairwise and private masks, and the server unmasks only the sum of the surviving
clients' vectors. Nothing else about an individual upload reaches the server.

What crosses the wire here, beside Flower's protocol messages:

- server → client (the workflow's legacy ``FitIns``): the meta-parameters (in the module's
  ``named_parameters`` order) and the round's config :meth:`FlowerServer.secure_config
  <lightning_metafed.flower_server.FlowerServer.secure_config>`: ``round``, ``clipping-range`` and
  one of ``clip-norm`` (client-level DP: the client clips to it, plus ``report-unclipped`` under
  adaptive clipping) or ``weight-scale`` (``Mean(weighted=True)``);
- client → server (``FitRes``, masked by the mod): the float64 arrays to sum, ``num_examples = 1``
  and, in the clear, only the arrays' names (``metrics["arrays"]``: public architecture).

Every client sends ``num_examples = 1`` and the workflow runs with ``max_weight = 1``, so the
workflow's weighted average times the number of survivors is the exact sum (up to quantization):
:class:`SumStrategy` hands that sum to the server step. Whatever else the server needs travels
*inside* the summed arrays: under ``Mean(weighted=True)`` client ``i`` uploads ``(w_i/W)·Δ_i`` and
``w_i/W`` (``W`` = ``secagg-max-weight`` ≥ every client's weight), so the server gets
``Σ w_iΔ_i / Σ w_i``; under adaptive clipping each client adds ``b_i = 1[‖Δ_i‖ ≤ C]``.

Quantization: each coordinate (which must lie in ``[-c, c]``, ``c`` = ``clipping-range``; a client
refuses to upload one beyond it, instead of letting SecAgg+ clamp it) is mapped to ``[0, Q]``
(``Q`` = ``quantization-range``) and stochastically rounded, an error below one step ``2c/Q``. The
sum of ``n`` uploads is therefore within ``n·2c/Q`` of the exact sum, coordinate by coordinate
(:meth:`SecureAggregation.sum_error_bound`); the mean of ``n`` within ``2c/Q`` (the weighted mean
within ``n·2c/Q / Σ_i w_i/W``, larger when the weights are far below ``W``). The integers must not
wrap around: ``n·Q < modulus-range``. Under DP the quantization moves a clipped upload's norm by
less than ``√d·2c/Q`` (``d`` coordinates): the server's noise is calibrated to the clip norm plus
that much. An adaptive clip norm is capped at ``clipping-range`` (a clipped update has no coordinate
beyond its norm), a fixed one above it is refused.

A client whose update holds NaN/inf refuses to upload (it raises; Flower reports the error and the
workflow treats the client as a dropout, which SecAgg+ tolerates): the server cannot screen
individual uploads it never sees.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_metafed.aggregators import Mean
from lightning_metafed.flower import (
    client_batch,
    client_computation,
    keep_state_row,
    load_parameters,
    require_flwr,
    with_node_state,
)
from lightning_metafed.flower_aggregation import check_flower_module
from lightning_metafed.functional.aggregate import finite_clients

require_flwr()  # a clear ImportError without the optional extra, before Flower's own imports

from flwr.app import ConfigRecord  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.compat.legacy_context import LegacyContext  # noqa: E402
from flwr.server.strategy import Strategy  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from flwr.app import RecordDict

    from lightning_metafed.algorithms.base import MetaFedModule
    from lightning_metafed.data.datamodule import FederatedDataModule
    from lightning_metafed.functional.client_task import Params

__all__ = [
    "UNCLIPPED",
    "WEIGHT",
    "SecureAggregation",
    "SecureRounds",
    "SumStrategy",
    "check_clipping_range",
    "check_secure_module",
    "node_secure_fit",
    "secure_fit",
    "secure_upload",
]

LOG = logging.getLogger(__name__)

UNCLIPPED = ":unclipped"
"""The name of the extra summed array ``b_i`` (1 when the client's update norm is within the clip norm)."""
WEIGHT = ":weight"
"""The name of the extra summed array ``w_i / W`` under ``Mean(weighted=True)``."""
ARRAY_NAMES = "arrays"
"""The ``FitRes`` metric that names the uploaded arrays (comma-separated, in upload order)."""


def _check_share(key: str, value: Any, low: int) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Expected `{key}` to be an int (a count) or a float (a fraction), got {value!r}")
    if isinstance(value, int) and value != 1 and value < low:
        raise ValueError(f"Expected `{key}` as an int to be >= {low} (or a float fraction in (0, 1]), got {value}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"Expected `{key}` as a float to be a fraction in (0, 1], got {value}")
    return value


@dataclass(frozen=True)
class SecureAggregation:
    """The SecAgg+ settings of a deployment (run-config keys in brackets).

    Args:
        num_shares: ``[secagg-num-shares]`` shares of each client's secrets: an int (> 2), or a float
            fraction of the round's clients (``1.0``: every client is every client's neighbour).
        threshold: ``[secagg-threshold]`` shares needed to rebuild a secret: an int, or a float
            fraction of ``num_shares``. Higher is more private, lower tolerates more dropouts.
        clipping_range: ``[clipping-range]`` ``c``: every uploaded coordinate must lie in ``[-c, c]``.
        quantization_range: ``[quantization-range]`` ``Q``: coordinates become integers in ``[0, Q]``.
        modulus_range: ``[modulus-range]`` the masks' modulus, a power of 2 above ``n·Q``.
        max_weight: ``[secagg-max-weight]`` ``W`` ≥ every client's weight (``Mean(weighted=True)``).
        timeout: ``[secagg-timeout]`` seconds the workflow waits for each stage's replies (``None``:
            no limit; the run config's ``0`` means ``None``).
    """

    num_shares: int | float = 1.0
    threshold: int | float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    timeout: float | None = 600.0

    def __post_init__(self) -> None:
        _check_share("secagg-num-shares", self.num_shares, 3)
        _check_share("secagg-threshold", self.threshold, 2)
        if isinstance(self.num_shares, int) and isinstance(self.threshold, int) and 1 < self.num_shares <= self.threshold:
            raise ValueError(f"Expected `secagg-threshold` < `secagg-num-shares` = {self.num_shares}, got {self.threshold}")
        for key, value in (("clipping-range", self.clipping_range), ("secagg-max-weight", self.max_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"Expected `{key}` to be a finite number > 0, got {value!r}")
        q, m = self.quantization_range, self.modulus_range
        if isinstance(q, bool) or not isinstance(q, int) or q < 2:
            raise ValueError(f"Expected `quantization-range` to be an int >= 2, got {q!r}")
        if isinstance(m, bool) or not isinstance(m, int) or m <= q or m > 2**32 or m & (m - 1):
            raise ValueError(f"Expected `modulus-range` to be a power of 2 in (`quantization-range` = {q}, 2**32], got {m!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"Expected `secagg-timeout` to be > 0 seconds (or 0 in the run config: no limit), got {self.timeout!r}")

    @classmethod
    def from_run_config(cls, config: Any) -> SecureAggregation | None:
        """The settings from a Flower run config; ``None`` unless ``secure-aggregation`` is true."""
        if not config.get("secure-aggregation", False):
            return None
        d = cls()
        timeout = float(config.get("secagg-timeout", d.timeout))
        return cls(
            num_shares=config.get("secagg-num-shares", d.num_shares),
            threshold=config.get("secagg-threshold", d.threshold),
            clipping_range=float(config.get("clipping-range", d.clipping_range)),
            quantization_range=config.get("quantization-range", d.quantization_range),
            modulus_range=config.get("modulus-range", d.modulus_range),
            max_weight=float(config.get("secagg-max-weight", d.max_weight)),
            timeout=None if timeout == 0 else timeout,
        )

    def step(self) -> float:
        """One quantization step ``2c/Q``: the most a stochastically rounded coordinate moves."""
        return 2 * self.clipping_range / self.quantization_range

    def sum_error_bound(self, num_clients: int) -> float:
        """The largest difference, per coordinate, between the securely aggregated sum of
        ``num_clients`` uploads and their exact sum: ``n·2c/Q`` (stochastic rounding of each upload,
        below one step), plus the float64 rounding of the dequantization (``~n·c·1e-15``)."""
        return num_clients * (self.step() + 8 * self.clipping_range * float(np.finfo(np.float64).eps))

    def check_round_size(self, clients: int) -> None:
        """Refuse rounds too small for SecAgg+ (< 2 clients) or whose sum would wrap around the modulus."""
        if clients < 2:
            raise ValueError(f"Expected at least 2 clients per round under secure aggregation, got {clients}")
        if clients * self.quantization_range >= self.modulus_range:
            raise ValueError(
                f"Expected `quantization-range` * clients < `modulus-range` = {self.modulus_range} (the summed integers "
                f"must not wrap around), got {self.quantization_range} * {clients}; lower `quantization-range`"
            )

    def check_clip_norm(self, privacy: Any) -> None:
        """Refuse a fixed DP clip norm above ``clipping-range`` (clipped clients would refuse to upload:
        dropouts that depend on their data). An adaptive clip norm is capped at it each round."""
        if privacy is not None and not privacy.adaptive and privacy.clip_norm > self.clipping_range:
            raise ValueError(
                f"Expected `privacy.clip_norm` <= `clipping-range` = {self.clipping_range:g} under secure aggregation "
                f"(a clipped update has no coordinate beyond its norm), got {privacy.clip_norm:g}; raise `clipping-range`"
            )

    def workflow(self) -> Any:
        """Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` for one round (``max_weight = 1``:
        every client sends ``num_examples = 1``, so the workflow returns the plain average)."""
        return SecAggPlusWorkflow(
            self.num_shares, self.threshold, max_weight=1.0, clipping_range=float(self.clipping_range),
            quantization_range=self.quantization_range, modulus_range=self.modulus_range, timeout=self.timeout,
        )


def check_secure_module(model: MetaFedModule) -> None:
    """Refuse, before any round, what secure aggregation cannot run: server state for the clients
    (SCAFFOLD), a ``compressor`` and any aggregator other than :class:`~lightning_metafed.aggregators.Mean`."""
    check_flower_module(model)
    if model.compressor is not None:
        raise ValueError(
            f"Expected `compressor` to be None under secure aggregation, got {model.compressor!r}: SecAgg+ sums dense "
            "masked vectors (it quantizes them itself, see `quantization-range`), so sparse or scaled encodings cannot "
            "be summed, and a client's clip norm would not bound its decoded upload; remove `compressor` or turn "
            "`secure-aggregation` off"
        )
    if not isinstance(model.aggregator, Mean):
        raise ValueError(
            f"Expected `aggregator` to be lightning_metafed.aggregators.Mean() under secure aggregation, got "
            f"{model.aggregator!r}: the server holds only the sum of the clients' uploads, so it can compute a "
            "(weighted) mean and no other rule; use Mean() or turn `secure-aggregation` off"
        )


def check_clipping_range(values: Params, clipping_range: float, partition: int) -> None:
    """Raise where SecAgg+'s quantizer would clamp a coordinate silently (beyond ``±clipping_range``).

    The error's message reaches the server (Flower forwards it), so it names no value of the
    update; the parameter and the magnitude go to the client's own log only."""
    for name, value in values.items():
        peak = float(value.abs().max()) if value.numel() else 0.0
        if peak > clipping_range:
            LOG.error("client %s: upload %r has a coordinate of magnitude %.6g > clipping-range %g", partition, name, peak, clipping_range)
            raise ValueError(
                f"Client {partition}'s upload has a coordinate beyond the secure aggregation's `clipping-range` = "
                f"{clipping_range:g}, where SecAgg+ would clamp it silently; raise `clipping-range` in the run config "
                "(or bound the updates with `privacy`). The client's log names the parameter and the value."
            )


def secure_upload(
    model: MetaFedModule, updates: Params, weight: float, config: Any, partition: int
) -> tuple[list[str], list[np.ndarray]]:
    """The names and float64 arrays client ``partition`` hands to SecAgg+, from its update
    ``{name: [1, *shape]}`` and the round's ``config`` (see the module docstring)."""
    if not bool(finite_clients(updates).all()):
        raise ValueError(
            f"Client {partition}'s update holds NaN/inf; under secure aggregation the server cannot screen single "
            "uploads, so the client does not upload (the SecAgg+ workflow counts it as a dropout)"
        )
    values = {k: u[0] for k, u in updates.items()}
    if "clip-norm" in config:
        if model.privacy is None:
            raise ValueError(
                f"Expected `privacy` (ClientDP) in client {partition}'s config, as the server's has: it sent `clip-norm` = "
                f"{config['clip-norm']}; got privacy=None (the server and the clients must load the same config)"
            )
        clip = float(config["clip-norm"])
        clipped, norms = model.privacy.clip(updates, clip)
        values = {k: u[0] for k, u in clipped.items()}
        if config.get("report-unclipped", False):
            values[UNCLIPPED] = torch.ones(1, dtype=torch.float64) * float(norms[0] <= clip)
    elif "weight-scale" in config:
        scale = weight / float(config["weight-scale"])
        if scale > 1:
            raise ValueError(
                f"Expected `secagg-max-weight` >= every client's weight, got {float(config['weight-scale']):g} "
                f"below client {partition}'s weight {weight:g}; raise `secagg-max-weight` in the run config"
            )
        values = {k: v.double() * scale for k, v in values.items()}
        values[WEIGHT] = torch.full((1,), scale, dtype=torch.float64)
    values = {k: v.detach().cpu().double() for k, v in values.items()}
    check_clipping_range(values, float(config["clipping-range"]), partition)
    return list(values), [v.numpy() for v in values.values()]


def _named_parameters(model: MetaFedModule, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The workflow's unnamed parameter arrays, named in the module's ``named_parameters`` order."""
    params = dict(model.named_parameters())
    shapes = [tuple(p.shape) for p in params.values()]
    if [tuple(a.shape) for a in arrays] != shapes:
        raise ValueError(f"Expected the server's parameter arrays of shapes {shapes}, got {[tuple(a.shape) for a in arrays]}")
    return {name: torch.from_numpy(np.array(a)) for name, a in zip(params, arrays)}


def secure_fit(model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict) -> RecordDict:
    """Client ``partition``'s reply to the SecAgg+ workflow's fit instruction (a legacy ``FitIns``
    in ``content``): a legacy ``FitRes`` whose arrays the ClientApp's ``secaggplus_mod`` masks."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    load_parameters(model, _named_parameters(model, parameters_to_ndarrays(fitins.parameters)))
    batch = client_batch(data, partition, int(fitins.config["round"]))
    updates, _, state = client_computation(model, batch)
    names, arrays = secure_upload(model, updates, float(batch.weight[0]), fitins.config, partition)
    keep_state_row(model, batch, state)  # only once the client does upload
    metrics = {ARRAY_NAMES: ",".join(names)}
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples=1, metrics=metrics)
    return compat.fitres_to_recorddict(reply, keep_input=False)


def node_secure_fit(
    model: MetaFedModule, data: FederatedDataModule, partition: int, content: RecordDict, state: RecordDict
) -> RecordDict:
    """A SuperNode's secure fit message: :func:`secure_fit` with the client's state row restored
    from the node-local ``state`` before and kept there after (see :func:`~lightning_metafed.flower.node_train`)."""
    return with_node_state(secure_fit, model, data, partition, content, state)


class SumStrategy(Strategy):
    """The legacy Flower ``Strategy`` that the SecAgg+ workflow drives.

    ``configure_fit`` sends every node of ``nodes`` the round's ``FitIns`` (the parameters the
    workflow holds, the ``server``'s
    :meth:`~lightning_metafed.flower_server.FlowerServer.secure_config`); ``aggregate_fit`` receives the
    workflow's average of the survivors' arrays, multiplies it by their number (every client sent
    ``num_examples = 1`` under ``max_weight = 1``) and hands the named sum to the ``server``'s
    ``update_from_sum``, which takes the module's server step. ``metrics`` holds the last round's
    server metrics, ``None`` until ``aggregate_fit`` runs (the workflow halts before it when too
    few clients survive); ``failures`` the failed clients' errors it was given.
    """

    def __init__(self, server: Any, grid: Any, nodes: list[int], run_id: int = 0):
        self.server, self.grid, self.nodes, self.run_id = server, grid, list(nodes), run_id
        self.metrics: dict[str, float] | None = None
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        """The parameters come from the module, not from the strategy."""

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        """Every node trains: the same ``FitIns`` (parameters and round config) for all of them."""
        ins = FitIns(parameters, self.server.secure_config(server_round - 1))
        return [(GridClientProxy(node, self.grid, self.run_id), ins) for node in self.nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple[Any, dict]:
        """The survivors' sum (average × survivors) through the server step; returns the new parameters."""
        self.failures = list(dict.fromkeys(str(f) for f in failures))  # the workflow may list one failure twice
        names = {str(res.metrics.get(ARRAY_NAMES, "")) for _, res in results}
        if len(names) != 1:
            raise ValueError(f"Expected every client to upload the same arrays, got the names {sorted(names)}")
        names_list = names.pop().split(",")
        average = parameters_to_ndarrays(results[0][1].parameters)
        if len(average) != len(names_list):
            raise ValueError(f"Expected {len(names_list)} summed arrays ({names_list}), got {len(average)}")
        total = {name: torch.from_numpy(np.asarray(a, dtype=np.float64) * len(results)) for name, a in zip(names_list, average)}
        self.metrics = self.server.update_from_sum(total, len(results), server_round - 1)
        return ndarrays_to_parameters(self.server.parameter_arrays()), dict(self.metrics)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        """No federated evaluation inside the workflow (the app evaluates after training)."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        """No centralized evaluation."""


class SecureRounds:
    """Training rounds through Flower's SecAgg+ workflow: ``rounds(r)`` runs round ``r`` on
    ``grid`` with every node of ``nodes`` and returns the server's metrics (with ``survivors``)."""

    def __init__(self, grid: Any, context: Any, server: Any, nodes: list[int], secure: SecureAggregation):
        self.grid, self.server = grid, server
        self.workflow = secure.workflow()  # Flower checks its settings here, before any round
        self.strategy = SumStrategy(server, grid, nodes, context.run_id)
        self.context = LegacyContext(context, strategy=self.strategy)

    @property
    def failures(self) -> list[str]:
        """Why clients failed in the last round's aggregated stages (e.g. a client's refusal)."""
        return self.strategy.failures

    def __call__(self, round_idx: int) -> dict[str, float]:
        state = self.context.state
        state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_idx + 1})
        parameters = ndarrays_to_parameters(self.server.parameter_arrays())
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=False)
        self.strategy.metrics, self.strategy.failures = None, []
        self.workflow(self.grid, self.context)
        if self.strategy.metrics is None:  # the workflow halted: too few clients survived to unmask the sum
            return self.server.skip_round(round_idx)
        return self.strategy.metrics
