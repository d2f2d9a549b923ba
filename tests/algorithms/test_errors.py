"""Bad input fails early with a ValueError naming the argument and the offending value."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp, sinusoid_batch
from torch import nn

import lightning_metafed as lm
from lightning_metafed.inner import SGD, Adam


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: lm.MAML(mlp(), inner_steps=-1), r"`inner_steps`.*-1"),
        (lambda: lm.MAML(mlp(), inner_steps=1.5), r"`inner_steps`.*1.5"),
        (lambda: lm.MAML(mlp(), eval_inner_steps=-2), r"`eval_inner_steps`.*-2"),
        (lambda: lm.MAML(mlp(), inner_optimizer=SGD(lr=0.0)), r"`lr`.*0.0"),
        (lambda: lm.MAML(mlp(), inner_optimizer=SGD(lr=-0.1)), r"`lr`.*-0.1"),
        (lambda: lm.MAML(mlp(), inner_optimizer=Adam(lr=float("nan"))), r"`lr`.*nan"),
        (lambda: lm.MAML(mlp(), task="ranking"), r"`task`.*'ranking'"),
        (lambda: lm.MAML(mlp(), adapt_params=["head.*"]), r"'head\.\*'.*`adapt_params`"),
        (lambda: lm.ANIL(mlp(), adapt_params=["nope"]), r"'nope'.*`adapt_params`"),
        (lambda: lm.MAML(mlp(), client_chunk_size=0), r"`client_chunk_size`.*0"),
        (lambda: lm.MAML(mlp(), inner_backend="jax"), r"`inner_backend`.*'jax'"),
        (lambda: lm.MAML(mlp(), inner_optimizer="sgd"), r"`inner_optimizer`.*str"),
        (lambda: lm.MAML(mlp(), aggregator="median"), r"`aggregator`.*str"),
        (lambda: lm.MAML("mlp"), r"`net`.*str"),
        (lambda: lm.MAML(), r"`net`.*build_net"),
        (lambda: lm.PerFedAvg(mlp(), variant="so"), r"`variant`.*'so'"),
        (lambda: lm.PerFedAvg(mlp(), outer_lr=0), r"`outer_lr`.*0"),
        (lambda: lm.PerFedAvg(mlp(), local_steps=0), r"`local_steps`.*0"),
        (lambda: lm.PerFedAvg(mlp(), variant="hf", inner_optimizer=Adam(lr=0.1)), r"`inner_optimizer`.*Adam"),
        (lambda: lm.PerFedAvg(mlp(), variant="hf", inner_steps=2), r"`inner_steps`.*2"),
        (lambda: lm.PerFedAvg(mlp(), hessian_batch="query"), r"`hessian_batch`.*'query'"),
        (lambda: lm.FedAvg(mlp(), local_epochs=0), r"`local_epochs`.*0"),
        (lambda: lm.FedAvg(mlp(), local_batch_size=0), r"`local_batch_size`.*0"),
        (lambda: lm.MetaSGD(mlp(), lr_granularity="layer"), r"`lr_granularity`.*'layer'"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_batchnorm_with_running_stats_is_rejected_with_module_name():
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*track_running_stats=False.*GroupNorm"):
        lm.MAML(net)


def test_norm_layers_without_running_stats_are_vectorized():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(), nn.Linear(4, 1)).double()
    batch = sinusoid_batch(3)
    vec = lm.MAML(net, inner_optimizer=SGD(lr=0.1)).client_updates(batch)
    loop = lm.MAML(net, inner_optimizer=SGD(lr=0.1), vectorize=False).client_updates(batch)
    for key in vec:
        torch.testing.assert_close(vec[key], loop[key])


def test_per_fedavg_hf_query_split_needs_two_query_examples():
    model = lm.PerFedAvg(mlp(), variant="hf")
    with pytest.raises(ValueError, match="at least 2 query examples"):
        model.client_updates(sinusoid_batch(2, query=1))


def test_training_batch_of_wrong_type_is_rejected():
    model = lm.MAML(mlp())
    with pytest.raises(ValueError, match=r"`batch`.*TaskBatch.*tuple"):
        model.client_updates((1, 2))


def test_subclass_can_fix_the_architecture():
    class SineMAML(lm.MAML):
        def build_net(self):
            return nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))

    model = SineMAML(inner_optimizer=SGD(lr=0.01))
    assert isinstance(model.net[0], nn.Linear) and model.net[0].out_features == 16
    updates = model.client_updates(sinusoid_batch(2, dtype=torch.float32))
    assert updates["net.0.weight"].shape == (2, 16, 1)
