"""PFedMe, FedProx and FedBABU: the Lightning shells of the proximal rules. Each module's uploads
equal its pure rule called by hand per client; FedBABU's head stays at its initialization and never
leaves the clients; pFedMe's evaluation personalizes with the Moreau inner problem (or fine-tunes);
each runs fit and test under a default Trainer, and a resumed pFedMe fit equals an uninterrupted one."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from conftest import (
    FIT_WITHOUT_VALIDATION,
    client_task,
    loader,
    mlp,
    mse_fn,
    quiet_trainer,
    sinusoid_batch,
)

from lightning_metafed.algorithms.fedbabu import FedBABU
from lightning_metafed.algorithms.fedprox import FedProx
from lightning_metafed.algorithms.pfedme import PFedMe
from lightning_metafed.data import SinusoidClients, SyntheticClients
from lightning_metafed.functional import (
    adapt,
    fedbabu_update,
    fedprox_update,
    pfedme_personalize,
    pfedme_update,
)
from lightning_metafed.inner import SGD

HEAD = ["2.weight", "2.bias"]
BODY = ["0.weight", "0.bias"]
ALGORITHMS = {
    "pfedme": (
        PFedMe, {"inner_steps": 2, "lam": 2.0, "lr": 0.2, "local_steps": 3, "server_beta": 0.8, "local_batch_size": 4}
    ),
    "fedprox": (FedProx, {"mu": 0.5, "local_epochs": 2, "local_batch_size": 4}),
    "fedbabu": (FedBABU, {"local_epochs": 2, "local_batch_size": 4}),
}
NAMES = list(ALGORITHMS)


def make(name, net=None, **overrides):
    cls, kwargs = ALGORITHMS[name]
    defaults = {"inner_optimizer": SGD(lr=0.05), "server_optimizer": partial(torch.optim.SGD, lr=1.0)}
    return cls(mlp() if net is None else net, **{**defaults, **kwargs, **overrides})


def rule(name, net, params, task):
    """The pure rule with the arguments of :data:`ALGORITHMS` written out: one client's net-keyed upload."""
    loss, opt = mse_fn(net), SGD(lr=0.05)
    if name == "pfedme":
        return pfedme_update(loss, params, task, optimizer=opt, personal_steps=2, lam=2.0, lr=0.2, local_steps=3,
                             beta=0.8, batch_size=4)[0]
    if name == "fedprox":
        return fedprox_update(loss, params, task, optimizer=opt, mu=0.5, local_epochs=2, batch_size=4)[0]
    return fedbabu_update(loss, params, task, optimizer=opt, head_names=HEAD, local_epochs=2, batch_size=4)[0]


def net_state(model):
    return {k: p.detach().clone() for k, p in model.net.named_parameters()}


def hand_round(name, net, params, batch):
    """``θ − weighted mean_i(upload_i)`` (server SGD(lr=1), the default weighted mean)."""
    uploads = [rule(name, net, params, client_task(batch, i)) for i in range(batch.num_clients)]
    w = batch.weight / batch.weight.sum()
    return {k: v - sum(w[i] * u[k] for i, u in enumerate(uploads)) if k in uploads[0] else v for k, v in params.items()}


# ------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "make_bad,match",
    [
        (lambda: PFedMe(mlp(), lam=0.0), r"`lam` to be a finite number > 0, got 0.0"),
        (lambda: PFedMe(mlp(), lr=-0.1), r"`lr` to be a finite number > 0, got -0.1"),
        (lambda: PFedMe(mlp(), server_beta=0), r"`server_beta` to be a finite number > 0, got 0"),
        (lambda: PFedMe(mlp(), local_steps=0), r"`local_steps` to be an integer >= 1, got 0"),
        (lambda: PFedMe(mlp(), inner_steps=0), r"`inner_steps` to be an integer >= 1, got 0"),
        (lambda: PFedMe(mlp(), local_batch_size=0), r"`local_batch_size` to be an integer >= 1, got 0"),
        (lambda: PFedMe(mlp(), personalization="prox"), r"`personalization` to be one of \('moreau', 'finetune'\), got 'prox'"),
        (lambda: FedProx(mlp(), mu=-0.5), r"`mu` to be a finite number >= 0, got -0.5"),
        (lambda: FedProx(mlp(), mu=float("nan")), r"`mu` to be a finite number >= 0, got nan"),
        (lambda: FedBABU(mlp(), head_params="*"), r"`head_params` to leave at least one parameter in the shared body"),
        (lambda: FedBABU(mlp(), head_params=["0.*", "2.*"]), r"`head_params`.*selects every parameter"),
        (lambda: FedBABU(mlp(), head_params="head.*"), r"'head\.\*' in `head_params` matches no parameter"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(make_bad, match):
    with pytest.raises(ValueError, match=match):
        make_bad()


def test_defaults_and_bounds():
    assert FedProx(mlp(), mu=0).mu == 0.0  # μ = 0 is FedAvg, allowed
    assert FedBABU(mlp()).head_names == HEAD and FedBABU(mlp(), head_params="2.weight").head_names == ["2.weight"]
    model = make("pfedme")
    assert model.local_step_bound() == ("local_steps", 3)
    assert model.eval_inner_steps == 2 and model.personalization == "moreau"  # K personalization steps at evaluation


def test_personalization_set_later_is_checked_and_recorded(tmp_path):
    model = make("pfedme")
    with pytest.raises(ValueError, match=r"`personalization` to be one of .*got 'fine-tune'"):
        model.personalization = "fine-tune"
    model.personalization = "finetune"
    assert model.hparams["personalization"] == "finetune"  # what a checkpoint records
    torch.save({"hparams": dict(model.hparams)}, tmp_path / "h.pt")
    assert torch.load(tmp_path / "h.pt", weights_only=False)["hparams"]["personalization"] == "finetune"


# ---------------------------------------------------------------------------------------- a round


@pytest.mark.parametrize("name", NAMES)
def test_client_updates_equal_the_functional_rule_and_vmap_equals_the_loop(name):
    batch = sinusoid_batch(4, seed=1)
    got = {}
    for vectorize in (True, False):
        model = make(name, vectorize=vectorize)
        got[vectorize] = model.client_updates(batch)
        params = net_state(model)
        for i in range(4):
            want = rule(name, model.net, params, client_task(batch, i))
            for k, v in want.items():
                torch.testing.assert_close(got[vectorize]["net." + k][i], v, rtol=0, atol=1e-12)
        assert sorted(got[vectorize]) == sorted("net." + k for k in (BODY if name == "fedbabu" else BODY + HEAD))
    for k, v in got[True].items():
        torch.testing.assert_close(got[False][k], v, rtol=0, atol=1e-12)
        assert not torch.allclose(v[0], v[1])  # the clients differ


@FIT_WITHOUT_VALIDATION
def test_fedbabu_fit_keeps_the_head_at_its_initialization_and_uploads_the_body_only():
    batches = [sinusoid_batch(3, seed=s) for s in (3, 4)]
    model = make("fedbabu")
    initial = net_state(model)
    want = dict(initial)
    for batch in batches:
        want = hand_round("fedbabu", model.net, want, batch)
    quiet_trainer(max_steps=2).fit(model, loader(*batches))
    final = net_state(model)
    for k in HEAD:
        torch.testing.assert_close(final[k], initial[k], rtol=0, atol=0)
        assert model.net.get_parameter(k).grad is None
    for k in BODY:
        torch.testing.assert_close(final[k], want[k], rtol=0, atol=1e-12)
        assert not torch.allclose(final[k], initial[k])
    body = sum(initial[k].numel() for k in BODY) * 8
    whole = sum(v.numel() for v in initial.values()) * 8
    assert body < whole
    assert model.communication == {"rounds": 2, "download_bytes": 2 * 3 * whole, "upload_bytes": 2 * 3 * body}
    assert model.ledgers.communication.last["upload_bytes_per_client"] == body


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("name", ["pfedme", "fedprox"])
def test_two_rounds_of_fit_equal_the_hand_rounds(name):
    batches = [sinusoid_batch(3, seed=s) for s in (5, 6)]
    model = make(name)
    want = net_state(model)
    for batch in batches:
        want = hand_round(name, model.net, want, batch)
    quiet_trainer(max_steps=2).fit(model, loader(*batches))
    for k, v in net_state(model).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- evaluation


def test_pfedme_evaluation_personalizes_with_the_moreau_inner_problem_or_fine_tunes():
    batch = sinusoid_batch(3, seed=7)
    moreau = make("pfedme", eval_inner_steps=4)
    finetune = make("pfedme", eval_inner_steps=4, personalization="finetune")
    w = net_state(moreau)
    torch.testing.assert_close(net_state(finetune), w, rtol=0, atol=0)
    got_moreau, got_finetune = moreau.personalize(batch), finetune.personalize(batch)
    for i in range(3):
        task = client_task(batch, i)
        x, y = task.support_x, task.support_y
        path = list(moreau.adapt_client(moreau.meta_parameters(detach=True), task))
        assert len(path) == 5
        prox = pfedme_personalize(mse_fn(moreau.net), w, w, x, y, None, optimizer=SGD(lr=0.05), steps=4, lam=2.0)
        plain = adapt(mse_fn(moreau.net), w, x, y, optimizer=SGD(lr=0.05), steps=4)
        for k in w:
            torch.testing.assert_close(path[-1][k], prox[k], rtol=0, atol=1e-12)
            torch.testing.assert_close(got_moreau[k][i], prox[k], rtol=0, atol=1e-12)
            torch.testing.assert_close(got_finetune[k][i], plain[k], rtol=0, atol=1e-12)
        assert not torch.allclose(prox["0.weight"], plain["0.weight"])  # the proximal pull matters
        first = adapt(mse_fn(moreau.net), w, x, y, optimizer=SGD(lr=0.05), steps=1)
        torch.testing.assert_close(path[1], first)  # at θ = w the proximal term has no gradient


def synthetic_data():
    return SyntheticClients(
        num_clients=6, dimension=5, num_classes=3, min_samples=20, max_samples=30, protocol="local",
        clients_per_round=3, support_size=5, query_size=5, rounds_per_epoch=2, eval_clients_per_batch=3, seed=0,
    )


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_test_run_under_a_default_trainer_and_log_finite_accuracy(name):
    model = make(name, net=mlp(5, 8, 3).float(), task="classification", inner_optimizer=SGD(lr=0.1), eval_inner_steps=2)
    initial = net_state(model)
    quiet_trainer(max_steps=2).fit(model, datamodule=synthetic_data())
    results = quiet_trainer().test(model, datamodule=synthetic_data(), verbose=False)[0]
    for key in ("test/acc_pre", "test/acc_post", "test/loss_pre", "test/loss_post"):
        assert math.isfinite(results[key]), key
    assert 0.0 <= results["test/acc_post"] <= 1.0
    assert results["test/loss_post"] != results["test/loss_pre"]  # evaluation adapted
    assert model.communication["rounds"] == 2
    moved = [k for k, v in net_state(model).items() if not torch.equal(v, initial[k])]
    assert moved == (BODY if name == "fedbabu" else BODY + HEAD)


# ------------------------------------------------------------------------------------ checkpoints


def test_a_resumed_pfedme_fit_equals_the_uninterrupted_one(tmp_path):
    def data():
        return SinusoidClients(
            num_clients=10, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=2, seed=2
        )

    def model():
        return make("pfedme", net=mlp().float(), server_optimizer=partial(torch.optim.Adam, lr=0.01))

    whole = model()
    quiet_trainer(max_steps=4).fit(whole, data())
    first = model()
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(first, data())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = model()
    quiet_trainer(max_steps=4).fit(resumed, data(), ckpt_path=tmp_path / "two.ckpt", weights_only=False)
    assert resumed.communication == whole.communication and whole.communication["rounds"] == 4
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(first.net[0].weight, whole.net[0].weight)  # the last two rounds moved it
