"""Secure aggregation on Flower: the real SecAggPlusWorkflow and secaggplus_mod, in-process over a
loopback grid (every message the server receives is recorded) and once on a real local deployment.

The quantization bound: SecAgg+ maps each uploaded coordinate x ∈ [-c, c] to (x + c)·Q/(2c) and
rounds it stochastically (an error below one step 2c/Q); the server dequantizes the sum of the n
survivors' integers, so the securely aggregated sum is within n·2c/Q of the exact sum, per
coordinate (``SecureAggregation.sum_error_bound``). Here c = 16, Q = 2**22: 2c/Q = 7.63e-6. The
weighted mean divides it by Σ w_i/W, which is exact (w_i/W = 1 or 1/2 lands on the quantization
grid when c is a power of two). A server step SGD(lr=η) on float32 parameters moves them by η times
that, plus the float32 roundings of either run (:func:`step_tolerance`).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("flwr")
# The DP tests fix ClientDP's seed to compare with hand computations; a deployment warns about that
# (every client could regenerate the noise), which test_dp_deployment_refusals_and_warnings checks.
pytestmark = pytest.mark.filterwarnings("ignore:`privacy.seed` = 7 is fixed:UserWarning")

from lightning_metafed import flower_secure, flower_server  # noqa: E402
from lightning_metafed.flower import load_from_config, simulate  # noqa: E402
from lightning_metafed.flower_secure import SecureAggregation  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from flower_deploy import deploy, run_in_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAML = ROOT / "configs/sinusoid/maml.yaml"
LR, CLIP_RANGE, WEIGHT = 0.1, 16.0, 100.0  # server SGD step; every sinusoid train client has 100 samples
SECURE = {"secure-aggregation": True, "clipping-range": CLIP_RANGE, "secagg-max-weight": WEIGHT}
EPS32 = float(torch.finfo(torch.float32).eps)


def write_config(path: Path, **model_args) -> str:
    """maml.yaml with a plain SGD(lr=LR) server step (Adam would turn a 1e-6 change of a near-zero
    gradient coordinate into a full lr step), one evaluation step, and the given model arguments."""
    cfg = yaml.safe_load(MAML.read_text())
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": LR}}
    cfg["model"]["init_args"].update(server_optimizer=sgd, eval_inner_steps=1, **model_args)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def quiet_argv():
    """The CLI parser (run by every config load) must not see pytest's own arguments."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", sys.argv[:1])
        yield


@pytest.fixture(scope="module")
def sgd_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("configs") / "maml_sgd.yaml")


DP = {"clip_norm": 0.5, "noise_multiplier": 0.3, "seed": 7}
ADAPTIVE = {**DP, "target_quantile": 0.5, "clip_lr": 0.2, "count_stddev": 0.5}


@pytest.fixture(scope="module")
def dp_config(tmp_path_factory):
    privacy = {"class_path": "lightning_metafed.privacy.ClientDP", "init_args": DP}
    return write_config(tmp_path_factory.mktemp("configs") / "maml_dp.yaml", privacy=privacy)


@pytest.fixture(scope="module")
def adaptive_config(tmp_path_factory):
    privacy = {"class_path": "lightning_metafed.privacy.ClientDP", "init_args": ADAPTIVE}
    return write_config(tmp_path_factory.mktemp("configs") / "maml_adaptive.yaml", privacy=privacy)


@pytest.fixture(scope="module")
def dp_in_the_clear(dp_config):
    """Server-side DP without secure aggregation: 2 rounds of the in-process protocol."""
    return simulate(dp_config, [0, 1, 2], rounds=2)


@pytest.fixture(scope="module")
def partition_of(sgd_config):
    """{global client id: partition} of the first train clients (every config here has the same data)."""
    train = load_from_config(sgd_config)[1].population("train")
    return {train.global_id(p): p for p in range(4)}


@pytest.fixture
def recorder(monkeypatch, partition_of):
    """Clients record their true updates ({partition: [update per round]}); the server records each
    round's aggregate. ``nan`` lists partitions whose update is made NaN."""
    record = {"updates": {}, "aggregates": [], "nan": []}
    compute, step = flower_secure.client_computation, flower_server.server_step

    def client_computation(model, batch):
        updates, aux, state = compute(model, batch)
        cid = partition_of[int(batch.client_id[0])]
        if cid in record["nan"]:
            updates = {k: torch.full_like(u, float("nan")) for k, u in updates.items()}
        record["updates"].setdefault(cid, []).append({k: u[0].detach().double() for k, u in updates.items()})
        return updates, aux, state

    def server_step(optimizer, params, aggregate, *args, **kwargs):
        record["aggregates"].append(None if aggregate is None else {k: v.detach().double() for k, v in aggregate.items()})
        return step(optimizer, params, aggregate, *args, **kwargs)

    monkeypatch.setattr(flower_secure, "client_computation", client_computation)
    monkeypatch.setattr(flower_server, "server_step", server_step)
    np.random.seed(0)  # SecAgg+'s stochastic rounding draws from NumPy's global generator
    return record


def step_tolerance(mean_bound: float, peak_aggregate: float, peak_parameter: float) -> float:
    """How far one SGD(lr=η) server step on float32 parameters can put two runs whose aggregates
    differ by ``mean_bound`` per coordinate: η·mean_bound, plus in each run the aggregate's cast to
    float32 and the product η·g (eps32/2 · η·|g| each) and the sum θ − η·g (eps32/2 · |θ|)."""
    return LR * (mean_bound + 2 * EPS32 * peak_aggregate) + EPS32 * peak_parameter


def peak(values) -> float:
    """The largest magnitude in a {name: tensor} mapping or a list of them."""
    return max(float(v.abs().max()) for m in (values if isinstance(values, list) else [values]) for v in m.values())


def max_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def run_config(config: str, rounds: int, nodes: int, **extra) -> dict:
    return {"config": config, "rounds": rounds, "num-nodes": nodes, **SECURE, **extra}


def received_arrays(grid) -> list[np.ndarray]:
    """Every array in every message the server received: array records and the byte strings
    (SecAgg+'s masked vectors, keys, shares) that decode as NumPy arrays."""
    from flwr.common import bytes_to_ndarray

    found = []
    for reply in grid.received:
        if reply.has_error():
            continue
        for record in reply.content.array_records.values():
            found += [a.numpy() for a in record.values()]
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and item.startswith(b"\x93NUMPY"):
                        found.append(bytes_to_ndarray(item))
    return found


def test_secure_rounds_equal_the_clear_protocol_within_the_quantization_bound(sgd_config, recorder):
    """3 clients, 3 rounds: each round's aggregate is the mean of the clients' true updates within
    2c/Q (the rigorous check), the final parameters equal the clear in-process run within 3 steps'
    tolerance (η·2c/Q and float32 rounding; the clients' next updates depend on θ, which amplifies
    an earlier round's error by about 1 + η·L, negligible here), and no array the server received
    equals, or comes near, any client's update."""
    rounds, secure = 3, SecureAggregation(clipping_range=CLIP_RANGE)
    result, grid, lines = run_in_process(run_config(sgd_config, rounds, 3), [0, 1, 2])
    assert [line.split(";")[0] for line in lines[:rounds]] == [f"round {r}: 3 of 3 updates securely aggregated" for r in range(rounds)]
    mean_bound = secure.sum_error_bound(3) / 3  # Σ w_i/W = 3 exactly
    updates = recorder["updates"]
    errors = []
    for r, aggregate in enumerate(recorder["aggregates"]):
        mean = {k: sum(u[r][k] for u in updates.values()) / 3 for k in aggregate}
        errors.append(max_error(aggregate, mean))
    assert max(errors) <= mean_bound, (errors, mean_bound)
    assert max(errors) > 0  # quantization did happen: the test is not vacuous

    clear = simulate(sgd_config, [0, 1, 2], rounds)["parameters"]
    tolerance = rounds * step_tolerance(mean_bound, peak(recorder["aggregates"]) + mean_bound, peak(clear))
    assert max_error(result["parameters"], clear) <= tolerance

    arrays = received_arrays(grid)
    compared = 0
    for client in updates.values():
        for upload in client:
            for name, value in upload.items():
                for array in arrays:
                    if array.shape == tuple(value.shape) and value.numel() > 1:
                        compared += 1
                        assert not np.allclose(array, value.numpy(), atol=1e-2), (name, array)
    assert compared >= 3 * rounds * 3 * 4  # every client's masked vector for every multi-coordinate parameter
    clear_metrics = [dict(r.content.config_records["fitres.metrics"]) for r in grid.received if "fitres.metrics" in r.content.config_records]
    assert len(clear_metrics) == 3 * rounds and all(set(m) == {"arrays"} for m in clear_metrics)  # the names, nothing else
    assert result["evaluation"] and all("loss_post" in e for e in result["evaluation"])


def collect_stage(node: int):
    """A failure rule: ``node`` drops out when asked for its masked vector (after sharing its keys)."""

    def fail(dst: int, msg) -> bool:
        configs = msg.content.config_records.get("secaggplus_configs", {})
        return dst == node and configs.get("stage") == "collect_masked_vectors"

    return fail


def test_a_client_dropping_out_mid_protocol_leaves_the_weighted_mean_of_the_others(sgd_config, recorder):
    """Node 2 shares its keys, then drops out before its masked vector: SecAgg+ rebuilds its masks
    from the others' shares and the server gets the mean of clients 0 and 1. W = 200: the clients
    upload w/W = 1/2 of their updates, so the bound doubles."""
    secure = SecureAggregation(clipping_range=CLIP_RANGE)
    _, _, lines = run_in_process(run_config(sgd_config, 1, 3, **{"secagg-max-weight": 2 * WEIGHT}), [0, 1, 2], collect_stage(1002))
    assert lines[0].startswith("round 0: 2 of 3 updates securely aggregated (1 failed: ") and "node 1002 dropped out" in lines[0]
    updates = recorder["updates"]
    assert sorted(updates) == [0, 1]  # client 2 never computed its update
    (aggregate,) = recorder["aggregates"]
    mean = {k: (updates[0][0][k] + updates[1][0][k]) / 2 for k in aggregate}
    assert max_error(aggregate, mean) <= secure.sum_error_bound(2) / (2 * 0.5)


def test_a_nonfinite_client_refuses_to_upload_and_counts_as_a_dropout(sgd_config, recorder):
    """The server cannot screen uploads it never sees: the NaN client raises instead of uploading,
    Flower reports its error, and the round is the mean of the other two."""
    recorder["nan"].append(1)
    result, grid, lines = run_in_process(run_config(sgd_config, 1, 3), [0, 1, 2])
    errors = [r.error.reason for r in grid.received if r.has_error()]
    assert len(errors) == 1 and "Client 1's update holds NaN/inf" in errors[0] and "dropout" in errors[0]
    assert lines[0].startswith("round 0: 2 of 3 updates securely aggregated (1 failed: ") and "NaN/inf" in lines[0]
    (aggregate,) = recorder["aggregates"]
    updates = recorder["updates"]
    mean = {k: (updates[0][0][k] + updates[2][0][k]) / 2 for k in aggregate}
    assert max_error(aggregate, mean) <= SecureAggregation(clipping_range=CLIP_RANGE).sum_error_bound(2) / 2
    assert all(torch.isfinite(p).all() for p in result["parameters"].values())


def test_a_client_refuses_a_coordinate_beyond_the_clipping_range(sgd_config, caplog):
    """The error (which Flower forwards to the server) names no value of the update; the client's
    own log names the parameter and the magnitude."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    model, data = load_from_config(sgd_config)
    arrays = [p.detach().numpy() for _, p in model.named_parameters()]
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {"round": 0, "clipping-range": 1e-4}), True)
    with pytest.raises(ValueError, match=r"Client 3's upload has a coordinate beyond .*`clipping-range` = 0\.0001") as error:
        flower_secure.secure_fit(model, data, 3, content)
    assert "net." not in str(error.value) and "magnitude" not in str(error.value)
    assert re.search(r"client 3: upload 'net\.\d\.(weight|bias)' has a coordinate of magnitude [\d.]+ > clipping-range 0.0001", caplog.text)


def test_secure_aggregation_refuses_what_it_cannot_compute(tmp_path):
    for name in ("CoordinateMedian", "TrimmedMean"):
        config = write_config(tmp_path / f"{name}.yaml", aggregator={"class_path": f"lightning_metafed.aggregators.{name}"})
        model, _ = load_from_config(config)
        with pytest.raises(ValueError, match=rf"`aggregator`.*Mean\(\).*got {name}.*holds only the sum"):
            flower_server.FlowerServer(model, 3, secure=SecureAggregation())
    scaffold, _ = load_from_config(str(ROOT / "configs/synthetic/scaffold.yaml"))
    with pytest.raises(ValueError, match="SCAFFOLD sends clients server state beside the parameters"):
        flower_server.FlowerServer(scaffold, 3, secure=SecureAggregation())
    with pytest.raises(ValueError, match=r"`quantization-range` \* clients < `modulus-range`"):
        SecureAggregation(quantization_range=2**31).check_round_size(2)
    with pytest.raises(ValueError, match="`clipping-range` to be a finite number > 0, got -1.0"):
        SecureAggregation.from_run_config({"secure-aggregation": True, "clipping-range": -1.0})
    assert SecureAggregation.from_run_config({"secure-aggregation": False}) is None


def test_a_real_deployment_with_secure_aggregation_matches_the_clear_run(tmp_path):
    """SuperLink + two SuperNodes on 127.0.0.1 running SecAgg+ (each stage a fresh ClientApp
    process, the mod's keys kept in the node's state): one round equals the clear in-process run
    within one step's tolerance (both start from the same parameters, so the clients' updates agree;
    a mean of coordinates in [-c, c] lies in [-c, c])."""
    config = write_config(tmp_path / "maml_sgd.yaml")
    out = tmp_path / "final.pt"
    extra = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SECURE.items()]
    log = deploy(config, rounds=1, out=out, workdir=tmp_path / "deploy", run_config=extra)
    assert "round 0: 2 of 2 updates securely aggregated" in log and "evaluation: loss_pre=" in log
    deployed = torch.load(out, weights_only=True)
    clear = simulate(config, [0, 1], rounds=1)["parameters"]
    mean_bound = SecureAggregation(clipping_range=CLIP_RANGE).sum_error_bound(2) / 2
    assert max_error(deployed, clear) <= step_tolerance(mean_bound, CLIP_RANGE, peak(clear))


# ------------------------------------------------------------------ client-level DP on Flower


def opacus_epsilons(rounds: int) -> list[float]:
    """ε after each round from a fresh Opacus RDP accountant (q = 1: every node trains every round)."""
    from opacus.accountants import RDPAccountant

    accountant, out = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=DP["noise_multiplier"], sample_rate=1.0)
        out.append(accountant.get_epsilon(delta=1e-5))
    return out


def test_server_side_dp_equals_the_hand_computation(dp_config, dp_in_the_clear):
    """Without secure aggregation the server clips the clear updates, adds the seeded noise and
    divides by the 3 clients messaged: θ ← θ − η·(Σ clip(Δ_i) + N(0, σ²C²)) / 3, and ε is Opacus's."""
    from lightning_metafed.flower import client_train, server_message

    model, _ = load_from_config(dp_config)
    clients = {p: load_from_config(dp_config) for p in range(3)}
    privacy = model.privacy
    for r in range(2):
        down = server_message(model, r)
        uploads = [client_train(*clients[p], p, down)["arrays"].to_torch_state_dict() for p in range(3)]
        stacked = {k: torch.stack([u[k] for u in uploads]) for k in uploads[0]}
        clipped, _ = privacy.clip(stacked)
        noise = privacy.noise({k: v[0] for k, v in stacked.items()}, DP["seed"], r)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p -= LR * (clipped[name].sum(0) + noise[name]) / 3
    for name, p in model.named_parameters():
        torch.testing.assert_close(dp_in_the_clear["parameters"][name], p.detach(), atol=1e-6, rtol=0)
    epsilons = [h["privacy/epsilon"] for h in dp_in_the_clear["history"]]
    assert epsilons == pytest.approx(opacus_epsilons(2), rel=1e-12)


def test_dp_with_secure_aggregation_equals_dp_in_the_clear(dp_config, dp_in_the_clear, recorder):
    """The clients clip to the server's clip norm, SecAgg+ sums, the server adds the same seeded
    noise, calibrated to the clip norm plus what quantization can add to a clipped upload's norm
    (√d·2c/Q): each round is (Σ clip(Δ_i) + noise·(C + √d·2c/Q)/C)/3 within the quantization bound,
    the run equals server-side DP within that bound plus the noise's extra scale, and the server
    prints ε (Opacus's) each round and the summary."""
    secure = SecureAggregation(clipping_range=1.0)  # clipped coordinates are at most C = 0.5
    result, _, lines = run_in_process(run_config(dp_config, 2, 3, **{"clipping-range": 1.0}), [0, 1, 2])
    privacy, bound = load_from_config(dp_config)[0].privacy, secure.sum_error_bound(3) / 3
    extra, noise_peak = 0.0, 0.0
    for r, aggregate in enumerate(recorder["aggregates"]):
        clipped, _ = privacy.clip({k: torch.stack([recorder["updates"][p][r][k] for p in range(3)]) for k in aggregate})
        noise = privacy.noise(aggregate, DP["seed"], r)
        scale = 1 + math.sqrt(sum(v.numel() for v in aggregate.values())) * secure.step() / DP["clip_norm"]
        expected = {k: (clipped[k].sum(0) + noise[k] * scale) / 3 for k in aggregate}
        assert max_error(aggregate, expected) <= bound + EPS32 * DP["clip_norm"]  # + the clients' float32 clipping
        extra, noise_peak = scale - 1, max(noise_peak, peak(noise))
    clear = dp_in_the_clear["parameters"]
    mean_bound = bound + EPS32 * DP["clip_norm"] + extra * noise_peak / 3  # the secure run's noise is `extra` larger
    tolerance = 2 * step_tolerance(mean_bound, peak(recorder["aggregates"]) + bound, peak(clear))
    assert max_error(result["parameters"], clear) <= tolerance
    assert [h["privacy/epsilon"] for h in result["history"]] == pytest.approx(opacus_epsilons(2), rel=1e-12)
    assert "privacy/epsilon=" in lines[0] and lines[-1] == result["privacy"] and result["privacy"].startswith("Privacy: client-level (")
    assert "q=1" in result["privacy"] and "clip norm 0.5" in result["privacy"]


def test_adaptive_clipping_under_secure_aggregation_follows_the_papers_clip_norms(adaptive_config, recorder):
    """Each client adds b_i = 1[‖Δ_i‖ ≤ C_t] inside the securely summed arrays (never in the clear);
    the server's clip norms equal ClientDP.next_clip_norm from the clients' true norms, and the
    clear protocol's (server-side) adaptive clipping."""
    rounds = 2
    result, grid, _ = run_in_process(run_config(adaptive_config, rounds, 3, **{"clipping-range": 2.0}), [0, 1, 2])
    privacy = load_from_config(adaptive_config)[0].privacy
    expected, clip = [], ADAPTIVE["clip_norm"]
    for r in range(rounds):
        norms = [float(torch.cat([u.flatten() for u in recorder["updates"][p][r].values()]).norm()) for p in range(3)]
        clip = privacy.next_clip_norm(clip, sum(n <= clip for n in norms), 3, 3, ADAPTIVE["seed"], r)
        expected.append(clip)
    served = [h["privacy/clip_norm"] for h in result["history"]]
    assert served == pytest.approx(expected, rel=1e-12) and len(set(served)) == rounds  # it does adapt
    clear = [h["privacy/clip_norm"] for h in simulate(adaptive_config, [0, 1, 2], rounds)["history"]]
    assert served == pytest.approx(clear, rel=1e-12)
    names = [dict(r.content.config_records["fitres.metrics"]) for r in grid.received if "fitres.metrics" in r.content.config_records]
    assert all(set(m) == {"arrays"} and m["arrays"].endswith(",:unclipped") for m in names)


def test_dp_deployment_refusals_and_warnings(tmp_path, dp_in_the_clear):
    """Every node trains every round, so a sampling rate below 1 (amplification that never happens)
    is refused; a fixed noise seed is warned about; a fixed clip norm above `clipping-range` is
    refused under SecAgg; and the exact count of clipped clients is never printed."""
    sampled = {"class_path": "lightning_metafed.privacy.ClientDP", "init_args": {**DP, "sample_rate": 0.1}}
    model, _ = load_from_config(write_config(tmp_path / "rate.yaml", privacy=sampled))
    with pytest.raises(ValueError, match=r"`privacy.sample_rate` to be None or 1 on Flower.*got 0.1"):
        flower_server.FlowerServer(model, 3)
    model, _ = load_from_config(write_config(tmp_path / "seed.yaml", privacy={"class_path": "lightning_metafed.privacy.ClientDP", "init_args": DP}))
    with pytest.warns(UserWarning, match=r"`privacy.seed` = 7 is fixed: every client .* could regenerate"):
        flower_server.FlowerServer(model, 3)
    with pytest.raises(ValueError, match=r"`privacy.clip_norm` <= `clipping-range` = 0.25.*got 0.5"):
        flower_server.FlowerServer(model, 3, secure=SecureAggregation(clipping_range=0.25))
    assert all("privacy/clipped" not in h and "privacy/epsilon" in h for h in dp_in_the_clear["history"])
