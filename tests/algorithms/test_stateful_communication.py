"""What the stateful algorithms count as sent: FedPer/FedRep exchange the body only, SCAFFOLD the
parameters and a control variate each way."""

from __future__ import annotations

import torch
from conftest import mlp, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_round(model):
    batch = sinusoid_batch(3)
    batch = lm.TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y, client_id=torch.arange(3))
    model.round_gradients(batch)
    return model.communication


def test_fedper_and_fedrep_send_and_receive_the_body_only():
    for model in (lm.FedPer(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=2),
                  lm.FedRep(mlp(), inner_optimizer=SGD(lr=0.05), head_steps=2, body_steps=1)):
        body = nbytes(p for name, p in model.named_parameters() if not name.startswith("net.2."))
        assert body < nbytes(model.parameters())
        comm = one_round(model)
        assert comm["download_bytes"] == 3 * body and comm["upload_bytes"] == 3 * body, type(model).__name__


def test_scaffold_sends_the_parameters_and_the_control_variate_each_way():
    model = lm.SCAFFOLD(mlp(), local_lr=0.05, inner_steps=2, population=10, sampled_per_round=3)
    params = nbytes(model.parameters())
    comm = one_round(model)
    assert comm["download_bytes"] == 3 * 2 * params and comm["upload_bytes"] == 3 * 2 * params
