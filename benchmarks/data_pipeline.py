"""Data-pipeline speed: µs per client of `round_batch` per source, data vs compute, `Trainer.fit` vs a bare loop.

Run:  python benchmarks/data_pipeline.py [--clients 32 1024 4096] [--repeats 10] [--compute-clients 32 1024 4096]
          [--fit-clients 1000] [--fit-rounds 30] [--fit-repeats 3] [--tensor-clients 100000] [--device cpu] [--threads 0]

1. Round building, one row per source and m (clients per round). Every source is built once per m;
   `setup()` (client generation, partitioning, checks) is outside the timing. Each repeat builds a
   fresh round index (medians). A row is "—" when the source has fewer train clients than m; the
   plain-Dataset source runs only up to m = 1024.
     setup_s      one `setup()` of the source, seconds (excluded from every other column)
     round_ms     `round_batch(r)`: the batched path (draws, one gather, assembly)
     us/client    round_ms / m, in microseconds
     +to_dev      us/client including `batch.to(device)` (only with --device cuda)
     previous     us/client of the previous per-client path, re-implemented here (SinusoidClients and
                  TensorClients only): clients drawn with random.Random.sample, then per client its data
                  (the previous sinusoid generator; `population.client(i)`), the per-client checks where
                  setup did not check it, a torch.randperm from a seeded Generator, indexing; `stack_tasks`
     prev/batched previous / us/client: the speed-up of the batched path
2. Data vs compute: the round_ms above (with the transfer on cuda) vs one 5-step second-order MAML round on that batch (zero_grad,
   `round_gradients`, Adam step; MLP 1-40-40-1 for the sinusoid, an 8-40-40-10 classifier for the
   TensorClients labels), and their ratio data/compute.
3. `Trainer.fit` (SinusoidClients, prefetch 0 and 1) vs a bare loop over pre-built round batches of
   the same data module (building them not timed): rounds/s and the ratio fit/bare, for fit's
   training loop (first round to the end) and, in brackets, with fit's start-up included.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import time

import lightning.pytorch as pl
import torch
from common import median_ms, mlp
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import lightning_metafed as lm
from lightning_metafed.data import (
    IID,
    DatasetClients,
    DigitsClients,
    EpisodicClients,
    SinusoidClients,
    SyntheticClients,
    TensorClients,
    stack_tasks,
)
from lightning_metafed.data.population import ClientData
from lightning_metafed.data.seeding import CLIENTS, POPULATION, TRAIN, mix
from lightning_metafed.data.validation import ClientChecks
from lightning_metafed.inner import SGD

CLIENT_CAP = {"DatasetClients (plain Dataset)": 1024}
PREVIOUS = ("SinusoidClients", "TensorClients")


class ItemDataset(Dataset):
    """A plain map-style dataset: items are loaded one by one (labels from `targets`, as in torchvision)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.targets = x, y, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def factories(tensor_clients: int) -> dict:
    """Name -> (clients per round -> a fresh data module)."""
    g = torch.Generator().manual_seed(0)
    tx, ty = torch.randn(tensor_clients, 20, 8, generator=g), torch.randint(0, 10, (tensor_clients, 20), generator=g)
    clients = list(zip(tx.unbind(0), ty.unbind(0)))
    dx, dy = torch.randn(200_000, 8, generator=g), torch.randint(0, 10, (200_000,), generator=g)
    episodes = TensorDataset(torch.randn(2000, 16, generator=g), torch.arange(100).repeat_interleave(20))
    small = {"support_size": 5, "query_size": 10}
    parted = {"num_clients": 10_000, "partitioner": IID(), "num_classes": 10, **small}
    return {
        "SinusoidClients": lambda m: SinusoidClients(num_clients=100_000, support_size=10, query_size=10, clients_per_round=m),
        "TensorClients": lambda m: TensorClients(clients, num_classes=10, clients_per_round=m, **small),
        "SyntheticClients": lambda m: SyntheticClients(num_clients=5_000, max_samples=100, protocol="local", clients_per_round=m, **small),
        "DigitsClients": lambda m: DigitsClients(num_clients=100, clients_per_round=m, **small),
        "DatasetClients (TensorDataset)": lambda m: DatasetClients(TensorDataset(dx, dy), clients_per_round=m, **parted),
        "DatasetClients (plain Dataset)": lambda m: DatasetClients(ItemDataset(dx, dy), clients_per_round=m, **parted),
        "EpisodicClients": lambda m: EpisodicClients(episodes, ways=5, shots=1, queries=5, clients_per_round=m),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def previous_client(dm, train, i: int, checks: ClientChecks) -> ClientData:
    """Client ``i`` as the previous path loaded it: SinusoidClients' previous generator (torch.rand
    from seeded Generators, one client at a time), else ``population.client(i)``; checked on load
    unless setup checked the population (in memory), as the previous ``load_client`` did."""
    if isinstance(dm, SinusoidClients):
        k, (a0, a1), (p0, p1), (low, high) = train.global_id(i), dm.amplitude, dm.phase, dm.x_range
        u = torch.rand(2, generator=torch.Generator().manual_seed(mix(dm.seed, POPULATION, k)), dtype=torch.float64)
        g = torch.Generator().manual_seed(mix(dm.seed, POPULATION, k, 1))
        x = low + (high - low) * torch.rand(dm.examples_per_client, 1, generator=g)
        data = ClientData(x, (a0 + (a1 - a0) * float(u[0])) * torch.sin(x + p0 + (p1 - p0) * float(u[1])))
    else:
        data = train.client(i)
    if not train.in_memory:
        checks.check(train.name(i), data)
    return data


def previous_round(dm, r: int, checks: ClientChecks):
    """The previous per-client path: one Python call chain per sampled client, then `stack_tasks`."""
    train, S, Q = dm.population("train"), dm.support_size, dm.query_size
    rows = random.Random(mix(dm.seed, CLIENTS, r)).sample(range(len(train)), dm.clients_per_round)
    tasks, weights, ids = [], [], []
    for i in rows:
        data, gid = previous_client(dm, train, i, checks), train.global_id(i)
        perm = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(mix(dm.seed, TRAIN, r, gid)))
        tasks.append((data.x[perm[:S]], data.y[perm[:S]], data.x[perm[S : S + Q]], data.y[perm[S : S + Q]]))
        weights.append(float(len(data.x)))
        ids.append(gid)
    return stack_tasks(tasks, weights, ids)


class DataTimes:
    """Builds each (source, m) once and keeps its round time, so the compute part reuses it."""

    def __init__(self, args, device: torch.device):
        self.make, self.args, self.device = factories(args.tensor_clients), args, device
        self.rounds = itertools.count()  # a fresh round index for every call
        self.cache: dict = {}

    def measure(self, name: str, m: int):
        """``(setup_s, round_ms, to_dev_ms, previous_ms, batch)``; ``None`` when the source has too few clients."""
        if (name, m) in self.cache:
            return self.cache[name, m]
        result = None
        if m <= CLIENT_CAP.get(name, m):
            dm, start = self.make[name](m), time.perf_counter()
            try:
                dm.setup()
                result = self._time(name, dm, time.perf_counter() - start)
            except ValueError as err:  # setup refuses more clients per round than train clients
                if "clients_per_round" not in str(err):
                    raise
        self.cache[name, m] = result
        return result

    def _time(self, name: str, dm, setup_s: float):
        reps, warm, dev = self.args.repeats, 1, self.device
        round_ms = median_ms(lambda: dm.round_batch(next(self.rounds)), reps, warm)
        to_dev_ms = None
        if dev.type == "cuda":
            to_dev_ms = median_ms(lambda: (dm.round_batch(next(self.rounds)).to(dev), sync(dev)), reps, warm)
        previous_ms = None
        if name in PREVIOUS:
            checks = ClientChecks(dm.num_classes)
            previous_ms = median_ms(lambda: previous_round(dm, next(self.rounds), checks), reps, warm)
        return setup_s, round_ms, to_dev_ms, previous_ms, dm.round_batch(next(self.rounds))


def fmt(value, spec: str, width: int) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_data_table(times: DataTimes, ms: list[int]) -> None:
    cuda = times.device.type == "cuda"
    print("\n1. round_batch, µs per client (setup() excluded: e.g. SyntheticClients generates its clients there)")
    head = f"{'source':<31} {'m':>5} {'setup_s':>8} {'round_ms':>9} {'us/client':>10}"
    print(head + (f" {'+to_dev':>8}" if cuda else "") + f" {'previous':>9} {'prev/batched':>12}")
    for name in times.make:
        for m in ms:
            setup_s, round_ms, to_dev_ms, prev_ms, _ = times.measure(name, m) or (None,) * 5
            per = [None if t is None else 1000 * t / m for t in (round_ms, to_dev_ms, prev_ms)]  # us/client
            cells = [fmt(setup_s, ".2f", 8), fmt(round_ms, ".2f", 9), fmt(per[0], ".1f", 10)]
            cells += [fmt(per[1], ".1f", 8)] if cuda else []
            cells += [fmt(per[2], ".1f", 9), fmt(None if prev_ms is None else prev_ms / round_ms, ".1f", 12)]
            print(f"{name:<31} {m:>5} " + " ".join(cells))


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 10))


def compute_ms(net: nn.Module, task: str, batch, repeats: int, device: torch.device) -> float:
    """One 5-step second-order MAML round on `batch` (already on the device): zero_grad, round_gradients, step."""
    model = lm.MAML(net, inner_optimizer=SGD(lr=0.01), inner_steps=5, task=task).to(device)
    server = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = batch.to(device)

    def step():
        server.zero_grad()
        model.round_gradients(batch)
        server.step()
        sync(device)

    return median_ms(step, repeats, warmup=1)


def print_compute_table(times: DataTimes, ms: list[int]) -> None:
    nets = {"SinusoidClients": (mlp, "regression"), "TensorClients": (classifier, "classification")}
    print("\n2. Data vs compute: round_batch ms vs a 5-step second-order MAML round ms (+ Adam step)")
    print(f"{'m':>5} | " + " | ".join(f"{name + ' data':>20} {'compute':>8} {'data/compute':>12}" for name in nets))
    for m in ms:
        cells = []
        for name, (make_net, task) in nets.items():
            r = times.measure(name, m)
            if r is None:
                cells.append(f"{'—':>20} {'—':>8} {'—':>12}")
                continue
            data = r[1] if r[2] is None else r[2]
            reps = times.args.repeats if m < 1024 else max(1, times.args.repeats // 4)
            compute = compute_ms(make_net(), task, r[4], reps, times.device)
            cells.append(f"{data:>20.2f} {compute:>8.2f} {data / compute:>12.3f}")
        print(f"{m:>5} | " + " | ".join(cells))


def sinusoid_fit_data(clients: int, rounds: int, prefetch: int) -> SinusoidClients:
    return SinusoidClients(num_clients=100_000, clients_per_round=clients, rounds_per_epoch=rounds, prefetch=prefetch)


def bare_loop(clients: int, rounds: int, device: torch.device) -> float:
    """Rounds/s of zero_grad / round_gradients / step over pre-built batches (building them not timed)."""
    data = sinusoid_fit_data(clients, rounds, 0)
    data.setup()
    batches = [data.round_batch(r).to(device) for r in range(rounds)]
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), inner_steps=5).to(device)
    server = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        server.zero_grad()
        model.round_gradients(batch)
        server.step()
    sync(device)
    return rounds / (time.perf_counter() - start)


class RoundClock(pl.Callback):
    """Times the training loop itself: from the first round's start to the end of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.stop = time.perf_counter()


def trainer_fit(clients: int, rounds: int, prefetch: int, device: torch.device) -> tuple[float, float]:
    """``(rounds/s of the training loop, rounds/s including fit's start-up)``."""
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), inner_steps=5)
    data = sinusoid_fit_data(clients, rounds, prefetch)
    clock = RoundClock()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    sync(device)
    return rounds / (clock.stop - clock.start), rounds / (time.perf_counter() - start)


def print_fit_table(clients: int, rounds: int, repeats: int, device: torch.device) -> None:
    """Bare loop and fit interleaved ``repeats`` times (medians), so drifts of a shared machine hit both."""
    bare_loop(clients, 2, device)  # warm-up
    trainer_fit(clients, 2, 0, device)
    runs: dict[str, list] = {"bare": [], 0: [], 1: []}
    for _ in range(repeats):
        runs["bare"].append(bare_loop(clients, rounds, device))
        for prefetch in (0, 1):
            runs[prefetch].append(trainer_fit(clients, rounds, prefetch, device))
    bare = statistics.median(runs["bare"])
    print(f"\n3. Trainer.fit vs a bare loop over pre-built batches: {rounds} rounds of {clients} clients (SinusoidClients),")
    print(f"   medians of {repeats} interleaved runs (fit: its training loop; in brackets with fit's start-up)")
    print(f"{'bare loop (batches pre-built)':<31} {bare:8.2f} rounds/s")
    for prefetch in (0, 1):
        loop = statistics.median(r[0] for r in runs[prefetch])
        whole = statistics.median(r[1] for r in runs[prefetch])
        print(f"{f'Trainer.fit, prefetch={prefetch}':<31} {loop:8.2f} rounds/s   ratio fit/bare {loop / bare:.2f}"
              f"   ({whole:.2f} rounds/s, {whole / bare:.2f} with start-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--compute-clients", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--fit-clients", type=int, default=1000)
    parser.add_argument("--fit-rounds", type=int, default=30)
    parser.add_argument("--fit-repeats", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tensor-clients", type=int, default=100_000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (compute and fit run there; batches are moved)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available, running on cpu")
        device = torch.device("cpu")
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}{gpu}")
    start = time.perf_counter()
    times = DataTimes(args, device)
    print_data_table(times, args.clients)
    print_compute_table(times, args.compute_clients)
    print_fit_table(args.fit_clients, args.fit_rounds, args.fit_repeats, device)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
