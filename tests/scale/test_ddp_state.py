"""Two-process DDP on CPU ends with the same parameters and the same per-client state, on every
process, as one process (FedPer, Ditto, SCAFFOLD under client dropout)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_metafed.faults import ClientFaults

SCRIPT = Path(__file__).with_name("ddp_state_run.py")
ALGORITHMS = ("fedper", "ditto", "scaffold")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)


def launch(devices: int, out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every algorithm's saved results, one entry per process (rank order)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(out_dir), ",".join(ALGORITHMS)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        name: [torch.load(out_dir / f"{name}_{devices}_{rank}.pt", weights_only=False) for rank in range(devices)]
        for name in ALGORITHMS
    }


def assert_tensors_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-6, rtol=0, msg=f"{what}: {name}")


def script_constants() -> tuple[int, dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("ddp_state_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ROUNDS, module.FAULTS


def test_the_rounds_include_unequal_shares_and_fewer_survivors_than_processes():
    rounds, faults = script_constants()
    survivors = [int((~ClientFaults(**faults).dropped(r, 5)).sum()) for r in range(rounds)]
    assert any(s >= 2 and s % 2 == 1 for s in survivors)  # split into unequal shares
    assert any(0 < s < 2 for s in survivors)  # every process computes the lone survivor


def test_two_process_ddp_keeps_the_same_client_state_as_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single, double = launch(1, tmp_path / "one"), launch(2, tmp_path / "two")
    for name in ALGORITHMS:
        expected = single[name][0]
        assert expected["faults"]["dropped_clients"] > 0 and expected["faults"]["skipped_rounds"] == 0
        rows = list(expected["store"].values())
        assert len(rows) > 1 and any(
            not torch.equal(rows[0][k], rows[1][k]) for k in rows[0]
        ), f"{name}: the clients' rows should differ after training"
        for rank, got in enumerate(double[name]):
            what = f"{name} rank {rank}"
            assert got["world_size"] == 2, what
            assert_tensors_close(got["params"], expected["params"], f"{what} params")
            assert sorted(got["store"]) == sorted(expected["store"]), f"{what}: store keys"
            for client, row in expected["store"].items():
                assert_tensors_close(got["store"][client], row, f"{what} client {client}")
            assert got["comm"] == expected["comm"], what
            assert got["faults"] == expected["faults"], what
            if name == "scaffold":
                assert any(v.abs().sum() > 0 for v in expected["control"].values())
                assert_tensors_close(got["control"], expected["control"], f"{what} server control")
