"""``FederatedDataModule``: turns a client population into per-round ``TaskBatch``es.

Training: round ``r`` samples ``clients_per_round`` train clients and, from each, disjoint
``support_size`` and ``query_size`` examples. Every draw is a pure function of
``(seed, r, client id)``, and the round index of the next batch is the trainer's ``global_step``
(one optimizer step per round), so a run resumed from any checkpoint sees exactly the clients and
examples an uninterrupted run would.

Evaluation protocols:

- ``"unseen"`` (FedMeta): clients are split into train/val/test clients (``client_split``); a
  held-out client's data is split once into ``eval_support_size`` support examples and a query set
  holding all the rest.
- ``"local"`` (Per-FedAvg, pFedMe): every client's data is split into local train/val/test parts
  (``local_split``); rounds draw from the train parts; evaluation adapts on a client's whole local
  train part and scores its val (or test) part.

Support and query never overlap. Validation/test batches hold ``eval_clients_per_batch`` clients
each, cover every held-out client and all of its query examples, and pad clients of different
sizes with masks (``TaskBatch.support_mask``/``query_mask``).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_metafed._validation import check_int
from lightning_metafed.data.assemble import (
    Fetch,
    assemble,
    eval_positions,
    make_fetch,
    resolve_sizes,
)
from lightning_metafed.data.draws import sample_clients, train_indices
from lightning_metafed.data.loaders import EvalBatches, Rounds, RoundsLoader
from lightning_metafed.data.local_parts import LocalPartPopulation
from lightning_metafed.data.population import (
    ClientData,
    Population,
    SubsetPopulation,
)
from lightning_metafed.data.seeding import (
    CLIENTS,
    EVAL,
    POPULATION,
    TRAIN,
    generator,
    hash_state,
)
from lightning_metafed.data.size_checks import check_eval_sizes, check_train_sizes, round_sizes
from lightning_metafed.data.sizes import Size, check_fractions, check_size
from lightning_metafed.data.task_batch import TaskBatch, stack_tasks
from lightning_metafed.data.validation import ClientChecks, DataSpec

__all__ = ["FederatedDataModule", "stack_tasks"]

SPLITS = ("train", "val", "test")
#: Populations larger than this are validated lazily, client by client, instead of up front
#: (their sizes; and, for populations held in memory, their data).
EAGER_CHECK_LIMIT = 100_000


class FederatedDataModule(pl.LightningDataModule):
    """Base LightningDataModule for federated client populations; subclasses implement
    :meth:`build_population` (or :meth:`populations` for their own train/val/test clients).

    Args:
        clients_per_round: clients sampled per training round.
        support_size: support examples per sampled client (int, or a fraction of its data).
        query_size: query examples per sampled client (int, or a fraction).
        protocol: ``"unseen"`` (held-out clients) or ``"local"`` (each client's local test part).
        client_split: ``"unseen"``: fractions of clients for (train, val, test).
        local_split: ``"local"``: fractions of each client's examples for (train, val, test).
        eval_support_size: ``"unseen"``: support examples of a held-out client (default
            ``support_size``); its query set is all the rest.
        client_sampling: ``"uniform"``, or ``"size"`` (probability proportional to sample count).
        rounds_per_epoch: training rounds (batches) per epoch.
        eval_clients_per_batch: held-out clients per validation/test batch.
        replacement: allow sampling with replacement when a client has fewer examples than
            ``support_size + query_size`` (support and query still come from disjoint examples).
        seed: the seed of every split and draw.
        prefetch: training rounds built ahead by a background thread while the current one trains
            (``0``: built in the training loop); ``None`` (default): one when the trainer runs on
            an accelerator such as a GPU, none on a CPU (where the thread would compete with the
            round for the cores). The batches are the same either way.

    Example:
        A source only builds its clients; the module splits them and draws every round's
        :class:`~lightning_metafed.data.TaskBatch`:

        >>> import torch
        >>> from lightning_metafed.data import ClientData, FederatedDataModule
        >>> from lightning_metafed.data.population import ListPopulation
        >>> class Lines(FederatedDataModule):  # client k fits y = k·x
        ...     def build_population(self):
        ...         x = torch.linspace(-1, 1, 30).unsqueeze(-1)
        ...         return ListPopulation([ClientData(x, k * x) for k in range(20)])
        >>> data = Lines(clients_per_round=4, support_size=5, query_size=5, seed=0)
        >>> data.setup("fit")
        >>> [len(data.population(split)) for split in ("train", "val", "test")]
        [16, 2, 2]
        >>> batch = data.round_batch(0)  # what training round 0 sees
        >>> batch.num_clients, tuple(batch.support_x.shape), tuple(batch.query_x.shape)
        (4, (4, 5, 1), (4, 5, 1))
        >>> tuple(data.eval_batch("val", range(2)).query_x.shape)  # held out: all 25 other examples
        (2, 25, 1)
    """

    #: Number of classes for classification sources (labels are checked against it); ``None`` for regression.
    num_classes: int | None = None
    #: Constructor arguments left out of the saved hyperparameters (data, datasets).
    hparams_ignore: tuple[str, ...] = ()

    def __init__(
        self,
        clients_per_round: int = 10,
        support_size: Size = 10,
        query_size: Size = 10,
        protocol: Literal["unseen", "local"] = "unseen",
        client_split: tuple[float, float, float] = (0.8, 0.1, 0.1),
        local_split: tuple[float, float, float] = (0.7, 0.1, 0.2),
        eval_support_size: Size | None = None,
        client_sampling: Literal["uniform", "size"] = "uniform",
        rounds_per_epoch: int = 100,
        eval_clients_per_batch: int = 32,
        replacement: bool = False,
        seed: int = 0,
        prefetch: int | None = None,
    ):
        super().__init__()
        # Arguments that hold data or datasets are not hyperparameters (nor safe to pickle into checkpoints).
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        check_int("clients_per_round", clients_per_round, minimum=1)
        check_size("support_size", support_size)
        check_size("query_size", query_size)
        check_size("eval_support_size", eval_support_size, allow_none=True)
        if protocol not in ("unseen", "local"):
            raise ValueError(f"Expected `protocol` to be 'unseen' or 'local', got {protocol!r}")
        if client_sampling not in ("uniform", "size"):
            raise ValueError(f"Expected `client_sampling` to be 'uniform' or 'size', got {client_sampling!r}")
        check_int("rounds_per_epoch", rounds_per_epoch, minimum=1)
        check_int("eval_clients_per_batch", eval_clients_per_batch, minimum=1)
        check_int("seed", seed)
        if prefetch is not None:
            check_int("prefetch", prefetch, minimum=0)
        self.clients_per_round = clients_per_round
        self.support_size = support_size
        self.query_size = query_size
        self.protocol = protocol
        self.client_split = check_fractions("client_split", client_split)
        self.local_split = check_fractions("local_split", local_split)
        self.eval_support_size = support_size if eval_support_size is None else eval_support_size
        self.client_sampling = client_sampling
        self.rounds_per_epoch = rounds_per_epoch
        self.eval_clients_per_batch = eval_clients_per_batch
        self.replacement = bool(replacement)
        self.seed = seed
        self.prefetch = prefetch
        self._populations: dict[str, Population] | None = None
        self._train_weights: Tensor | None = None
        self._checks: ClientChecks | None = None
        self._checked: set[int] = set()  # ids of populations whose every client was checked at setup

    # ----------------------------------------------------------------------------- to implement

    def build_population(self) -> Population:
        """All clients of the federation; the protocol splits them into train/val/test."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_population() or populations()")

    def populations(self) -> dict[str, Population]:
        """The train/val/test client populations under ``protocol``."""
        population = self.build_population()
        n = len(population)
        if n == 0:
            raise ValueError(f"{type(self).__name__} has no clients")
        if self.protocol == "local":
            return {
                split: LocalPartPopulation(population, split, self.local_split, self.seed)
                if fraction > 0
                else SubsetPopulation(population, torch.empty(0, dtype=torch.long))
                for split, fraction in zip(SPLITS, self.local_split)
            }
        counts = {"val": int(round(n * self.client_split[1])), "test": int(round(n * self.client_split[2]))}
        for split, fraction in zip(("val", "test"), self.client_split[1:]):
            if fraction > 0 and counts[split] == 0:
                raise ValueError(
                    f"`client_split` {self.client_split} of {n} clients leaves no {split} clients; "
                    f"use more clients or a larger {split} fraction"
                )
        n_train = n - counts["val"] - counts["test"]
        if n_train < 1:
            raise ValueError(f"`client_split` {self.client_split} of {n} clients leaves no train clients")
        perm = torch.randperm(n, generator=generator(self.seed, POPULATION))
        return {
            "train": SubsetPopulation(population, perm[:n_train]),
            "val": SubsetPopulation(population, perm[n_train : n_train + counts["val"]]),
            "test": SubsetPopulation(population, perm[n_train + counts["val"] :]),
        }

    # ------------------------------------------------------------------------------- lifecycle

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test populations and check them: argument sizes against every client,
        and the data of every client held in memory (clients loaded on demand are checked as loaded)."""
        if self._populations is not None:
            return
        populations = self.populations()
        train = populations["train"]
        if self.clients_per_round > len(train):
            raise ValueError(
                f"Expected `clients_per_round` <= the {len(train)} train clients, got {self.clients_per_round}"
            )
        checks = ClientChecks(self.num_classes)
        checked = checks.check_populations(populations, EAGER_CHECK_LIMIT)
        check_train_sizes(train, EAGER_CHECK_LIMIT, self.support_size, self.query_size, self.replacement)
        for split in ("val", "test"):
            check_eval_sizes(populations[split], EAGER_CHECK_LIMIT, self.eval_support_size)
        if self.client_sampling == "size" and train.uniform is None:
            self._train_weights = train.sizes(torch.arange(len(train))).double()
        self._checks, self._checked = checks, checked
        self._populations = populations  # only once every check passed: a failed setup can be retried

    def data_spec(self) -> DataSpec:
        """What every client's data looks like: per-example feature and target shapes and dtypes,
        ``num_classes``, and whether targets are integer labels (see :class:`DataSpec`).

        Taken from the first client checked: at :meth:`setup` for clients held in memory; for a
        source that loads clients on demand, from the first client loaded (one is loaded now if
        none has been). Every other client is checked to match it.
        """
        self.setup()
        if self._checks.spec is None:
            split = next(split for split in SPLITS if len(self._populations[split]))
            self.load_client(self._populations[split], 0)
        return self._checks.spec

    def population(self, split: str) -> Population:
        """The ``"train"``, ``"val"`` or ``"test"`` clients (after :meth:`setup`)."""
        if self._populations is None:
            self.setup()
        return self._populations[split]

    def state_dict(self) -> dict[str, Any]:
        # Sampling is a pure function of (seed, round, client); the round is the trainer's global step.
        return {"seed": self.seed, "protocol": self.protocol}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed or state_dict.get("protocol") != self.protocol:
            rank_zero_warn(
                f"The checkpoint's data came from seed={state_dict.get('seed')!r}, protocol={state_dict.get('protocol')!r}; "
                f"this data module has seed={self.seed!r}, protocol={self.protocol!r}: the resumed run will see "
                "different clients than the original."
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return RoundsLoader(Rounds(self))

    def _eval_loader(self, split: str) -> DataLoader | list:
        if len(self.population(split)) == 0:
            return []
        return DataLoader(EvalBatches(self, split), batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    # -------------------------------------------------------------------------------- sampling

    def load_client(self, population: Population, i: int) -> ClientData:
        """Client ``i`` of ``population``, checked (unless :meth:`setup` checked all of its clients):
        tensors of matching lengths, non-empty, finite features and targets, integer labels in
        ``[0, num_classes)`` for classification, and shapes and dtypes equal to the first client's."""
        data = population.client(i)
        if id(population) not in self._checked:
            self._client_checks().check(population.name(i), data)
        return data

    def _client_checks(self) -> ClientChecks:
        if self._checks is None:
            self._checks = ClientChecks(self.num_classes)
        return self._checks

    def _sample_clients(self, round_idx: int) -> Tensor:
        """Positions of round ``round_idx``'s clients in the train population: uniformly
        (:func:`~lightning_metafed.data.draws.sample_clients`) or in proportion to their sizes."""
        m, train = self.clients_per_round, self.population("train")  # sets up the size weights
        if self._train_weights is not None:
            return torch.multinomial(
                self._train_weights, m, replacement=False, generator=generator(self.seed, CLIENTS, round_idx)
            )
        return sample_clients(hash_state(self.seed, CLIENTS, round_idx), len(train), m)

    def _fetch(self, population: Population) -> Fetch:
        """How a batch reads ``population``; what is read is checked unless :meth:`setup` checked
        every client of it."""
        return make_fetch(population, None if id(population) in self._checked else self._client_checks)

    def _train_batch(self, population: Population, rows: Tensor, round_idx: int) -> TaskBatch:
        n, end, ids = population.sizes(rows), population.support_ends(rows), population.global_ids(rows)
        S, Q = round_sizes(population, rows, n, end, self.support_size, self.query_size, self.replacement)
        support, query = train_indices(hash_state(self.seed, TRAIN, round_idx, ids), n, end, S, Q)
        return assemble(self._fetch(population), rows, (support, S), (query, Q), n, ids)

    def round_batch(self, round_idx: int) -> TaskBatch:
        """The TaskBatch of training round ``round_idx`` (a pure function of seed and round; the
        draws are those of ``lightning_metafed.data.draws``)."""
        rows = self._sample_clients(round_idx)
        return self._train_batch(self.population("train"), rows, round_idx)

    def train_task(self, population: Population, i: int, round_idx: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Disjoint support and query examples of train client ``i`` for round ``round_idx`` (its
        row of :meth:`round_batch` when the round samples it)."""
        b = self._train_batch(population, torch.tensor([i]), round_idx)
        return b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0]

    def _eval_batch(self, population: Population, rows: Tensor) -> TaskBatch:
        n, end, ids = population.sizes(rows), population.support_ends(rows), population.global_ids(rows)
        S = resolve_sizes(self.eval_support_size, n)
        s_idx, S, q_idx, Q = eval_positions(hash_state(self.seed, EVAL, ids), n, end, S)
        return assemble(self._fetch(population), rows, (s_idx, S), (q_idx, Q), n, ids)

    def eval_task(self, population: Population, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Held-out client ``i``'s support set and its whole query set (fixed for the run)."""
        b = self._eval_batch(population, torch.tensor([i]))
        return b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0]

    def eval_batch(self, split: str, indices: range | list[int]) -> TaskBatch:
        """A padded TaskBatch of the held-out clients ``indices`` of ``split``."""
        return self._eval_batch(self.population(split), torch.as_tensor(list(indices), dtype=torch.long))
