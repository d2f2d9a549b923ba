"""Pure Python, no CLI and no Trainer: one communication round by hand, then personalization.

Run:  python examples/pure_python.py

Shows the pieces a round is made of: a TaskBatch of sampled clients, the per-client uploads
(``client_updates``), their aggregation, the server step, and a held-out client's adaptation.
"""

from __future__ import annotations

import torch

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.inner import SGD
from lightning_metafed.nets import MLP


def main(rounds: int = 300) -> dict[str, float]:
    torch.manual_seed(0)
    data = SinusoidClients(num_clients=5000, clients_per_round=25)
    data.setup()
    model = lm.MAML(MLP(1, [40, 40], 1), inner_optimizer=SGD(lr=0.01), eval_inner_steps=10)
    server = torch.optim.Adam(model.parameters(), lr=1e-3)
    for r in range(rounds):
        batch = data.round_batch(r)                      # 25 clients' support/query sets
        updates = model.client_updates(batch)            # what each client uploads: {name: [25, *shape]}
        aggregate = model.aggregator(updates, batch.weight)
        for name, p in model.named_parameters():
            p.grad = aggregate[name]
        server.step()                                    # FedAdam on the meta-parameters
    held_out = data.eval_batch("test", range(len(data.population("test"))))
    curves = model.adaptation_curves(held_out)           # query MSE after 0..10 steps, per client
    results = {"test/loss_pre": float(curves["loss"][:, 0].mean()), "test/loss_post": float(curves["loss"][:, -1].mean())}
    print(results)
    return results


if __name__ == "__main__":
    main()
