"""Memory of a lazily generated client population: 10^6 vs 10^3 sinusoid clients.

Run:  python benchmarks/population.py

Each size runs in a fresh subprocess that builds SinusoidClients, runs setup() (train/val/test
split) and samples 20 rounds; it reports the growth of the resident set over the process's
baseline after imports.
"""

from __future__ import annotations

import json
import subprocess
import sys


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def child(num_clients: int) -> None:
    from lightning_metafed.data import SinusoidClients

    before = rss()
    data = SinusoidClients(num_clients=num_clients, clients_per_round=32)
    data.setup()
    for r in range(20):
        data.round_batch(r)
    data.eval_batch("val", range(32))
    print(json.dumps({"mb": (rss() - before) / 2**20}))


def measure(num_clients: int) -> float:
    out = subprocess.run([sys.executable, __file__, str(num_clients)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mb"]


def main() -> None:
    small, large = measure(10**3), measure(10**6)
    print(f"RSS growth: 10^3 clients {small:6.1f} MB, 10^6 clients {large:6.1f} MB, difference {large - small:6.1f} MB")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].isdigit():
        child(int(sys.argv[1]))
    else:
        main()
