"""ServerApp: holds the meta-parameters and the server optimizer (its state kept across rounds);
each round sends the parameters to every client, aggregates their updates with the module's
aggregator (or, with ``secure-aggregation = true``, receives only their sum through Flower's
SecAgg+ workflow) and takes a server step; under the config's ``privacy`` it adds the noise and
prints ``privacy/epsilon`` (see :mod:`lightning_metafed.flower_server`)."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lightning_metafed.flower_server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train, evaluate, print the metrics; save the final meta-parameters to ``output`` if set."""
    result = run_server(grid, context)
    output = context.run_config.get("output")
    if output:
        torch.save(result["parameters"], str(output))
