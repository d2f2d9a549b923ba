"""The round's stages without Lightning: survivors, screening, aggregation, DDP shares, the server step."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.faults import ClientFaults
from lightning_metafed.functional.aggregate import weighted_mean
from lightning_metafed.inner import SGD
from lightning_metafed.round import (
    Aggregation,
    ClientComputation,
    ClientRunner,
    RoundCounts,
    RoundPipeline,
    UploadScreen,
    Uploads,
    World,
    sample_survivors,
    server_step,
)


def mean_target(meta, task):
    """A toy client: uploads w − mean(support_y), reports its query mean."""
    return {"w": meta["w"] - task.support_y.mean()}, {"query_mean": task.query_y.mean()}


def toy_pipeline(**kwargs) -> RoundPipeline:
    computation = ClientComputation(mean_target, ClientRunner("toy"))
    defaults = dict(computation=computation, screen=UploadScreen(), aggregation=Aggregation(lm.Mean(weighted=False)))
    return RoundPipeline(**{**defaults, **kwargs})


def test_a_round_returns_its_aggregate_diagnostics_counts_and_bytes():
    batch = sinusoid_batch(4)
    params = {"w": torch.tensor(0.5, dtype=torch.float64)}
    result = toy_pipeline().run(batch, params, round_idx=0)
    expected = 0.5 - batch.support_y.mean(dim=(1, 2))
    torch.testing.assert_close(result.aggregate["w"], expected.mean())
    torch.testing.assert_close(result.diagnostics["query_mean"], batch.query_y.mean(dim=(1, 2)).mean())
    assert result.counts == RoundCounts(sampled=4, survivors=4)
    assert result.download_bytes == result.upload_bytes == 8 and result.new_state is None


def test_a_round_where_everyone_drops_out_has_no_aggregate():
    faults = ClientFaults(dropout=0.99, seed=0)
    assert faults.dropped(0, 3).all()
    result = toy_pipeline(faults=faults).run(sinusoid_batch(3), {"w": torch.tensor(0.0, dtype=torch.float64)}, 0)
    assert result.aggregate is None and result.counts.dropped == 3 and result.upload_bytes == 0


def test_survivors_carry_their_step_budgets_and_budgets_are_bounded():
    faults = ClientFaults(dropout=0.5, step_choices=[1, 3], seed=4)
    batch = sinusoid_batch(6)
    survivors = sample_survivors(batch, faults, 2, ("inner_steps", 3))
    keep = ~faults.dropped(2, 6)
    assert survivors.num_clients == int(keep.sum())
    assert survivors.num_steps.tolist() == faults.num_steps(2, 6)[keep].tolist()
    with pytest.raises(ValueError, match="`faults.step_choices` value <= `inner_steps` = 2"):
        sample_survivors(batch, faults, 2, ("inner_steps", 2))


def test_screening_drops_non_finite_uploads_with_their_weights_ids_and_state():
    updates = {"w": torch.tensor([[1.0], [float("nan")], [3.0]])}
    uploads = Uploads(updates, {"l": torch.arange(3.0)}, torch.tensor([1.0, 2.0, 3.0]), [10, 11, 12], 4, state={"s": torch.arange(3.0)})
    with pytest.warns(UserWarning, match="rejected 1 of 3"):
        kept, counts = UploadScreen()(uploads, 0, RoundCounts(3, 3))
    assert counts.rejected == 1 and kept.client_id == [10, 12]
    assert kept.weights.tolist() == [1.0, 3.0] and kept.state["s"].tolist() == [0.0, 2.0] and kept.aux["l"].tolist() == [0.0, 2.0]
    all_bad = Uploads({"w": torch.tensor([[float("inf")]])}, {}, None, None, 4)
    with pytest.raises(FloatingPointError, match="Round 3: every one of the 1 client uploads"):
        UploadScreen()(all_bad, 3, RoundCounts(1, 1))


def test_aggregation_under_dp_counts_the_clipped_clients_and_divides_by_the_sampled():
    updates = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)}
    privacy = lm.ClientDP(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.1)
    aggregate, counts = Aggregation(lm.Mean(), privacy, noise_seed=0)(Uploads(updates, {}, None, None, 16), 0, RoundCounts(4, 2))
    assert counts.clipped == 1
    torch.testing.assert_close(aggregate["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4], dtype=torch.float64) / 4)


def test_two_process_shares_add_up_to_the_one_process_round():
    """Each rank computes its share; gathering rows and summing partial gradients gives the whole round."""
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2)
    batch = sinusoid_batch(5)
    params = dict(model.named_parameters())
    single = ClientComputation(model.client_update, model.runner, objective=model.client_objective)
    whole_grad, _ = single.mean_gradient(params, batch, batch.weight)
    whole = single.uploads({k: p.detach() for k, p in params.items()}, batch, batch.weight)
    partial_grads, partial_rows = [], []
    for rank in range(2):
        # Stand-in collectives: the partial sums are added below; the gathered diagnostics are not checked.
        world = World(2, rank, all_gather=lambda v: {k: torch.stack([x, x]) for k, x in v.items()}, all_reduce_sum=lambda t: t)
        part = ClientComputation(model.client_update, model.runner, world, model.client_objective)
        lo, hi = world.share(5)
        assert (lo, hi) == ((0, 2) if rank == 0 else (2, 5))
        partial_grads.append(part.mean_gradient(params, batch, batch.weight)[0])
        partial_rows.append(model.client_updates(batch[lo:hi]))
    for name in whole_grad:
        torch.testing.assert_close(partial_grads[0][name] + partial_grads[1][name], whole_grad[name])
        torch.testing.assert_close(torch.cat([partial_rows[0][name], partial_rows[1][name]]), whole.updates[name])
    torch.testing.assert_close(weighted_mean(whole.updates, batch.weight)["net.0.weight"], whole_grad["net.0.weight"])


def test_world_gathers_unequal_shares_in_client_order():
    shares = [torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0], [4.0]])]
    padded = torch.stack([torch.cat([shares[0], torch.zeros(1, 1)]), shares[1]])
    for rank in range(2):
        world = World(2, rank, all_gather=lambda v: {"x": padded})
        assert world.gather_rows({"x": shares[rank]}, 5)["x"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="`clients_per_round` >= the 2 DDP processes"):
        World(2, 0).check_round(1)


def test_server_step_writes_the_aggregate_or_leaves_everything_alone():
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([w], lr=0.1)
    server_step(optimizer, {"w": w}, None)
    assert w.grad is None and len(optimizer.state) == 0 and w.tolist() == [1.0, 1.0]
    plain = torch.optim.SGD([w], lr=1.0)
    server_step(plain, {"w": w}, {"w": torch.tensor([0.25, -0.5])})
    assert w.tolist() == [0.75, 1.5]
    server_step(plain, {"w": w}, {"w": torch.tensor([0.25, -0.5])}, scale=lambda g: 4.0 * g)  # a scaler divides by 4
    assert w.grad.tolist() == [1.0, -2.0]
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    server_step(torch.optim.SGD([frozen], lr=1.0), {"f": frozen}, {"f": torch.ones(2)})
    assert frozen.grad is None and frozen.tolist() == [0.0, 0.0]  # no optimizer moves a frozen parameter
