"""Every file the library reads fails with a message naming the file and what is wrong with it:
checkpoints, TensorClients files, LEAF JSON and a restored per-client state; a full disk during a
checkpoint save says so and leaves the previous checkpoint intact."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.checkpoint import AtomicCheckpointIO, latest_checkpoint
from lightning_metafed.data import LEAFClients, TensorClients
from lightning_metafed.files import load_json_file, load_torch_file
from lightning_metafed.inner import SGD
from lightning_metafed.round import InMemoryClientState

NOT_A_CHECKPOINT = "truncated or not a checkpoint file"


class Opaque:
    """An object that weights_only loading does not allow."""


def named(path, phrase: str) -> str:
    """A ``match`` pattern: the quoted path, then ``phrase``."""
    return re.escape(repr(str(path))) + ".*" + re.escape(phrase)


def save_truncated(path, step: int = 3) -> None:
    torch.save({"global_step": step, "w": torch.arange(100.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.ckpt"
    save_truncated(path)
    with pytest.raises(ValueError, match=named(path, NOT_A_CHECKPOINT + " (torch.load failed: PytorchStreamReader")) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original error is chained


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_random_bytes_checkpoint_is_named(tmp_path, weights_only):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=named(path, NOT_A_CHECKPOINT + " (torch.load failed: ")):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)


def test_an_empty_checkpoint_is_named(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=named(path, NOT_A_CHECKPOINT + " (the file is empty)")):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"global_step": 1}, protocol=2))
    for weights_only in (True, False):  # not reported as a weights_only refusal
        with pytest.raises(ValueError, match=named(path, NOT_A_CHECKPOINT)):
            load_torch_file(path, "checkpoint", weights_only=weights_only)


def test_a_missing_checkpoint_is_file_not_found_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"No such checkpoint file: {str(path)!r}")):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(IsADirectoryError, match=re.escape(f"Expected a checkpoint file, found a folder: {str(tmp_path)!r}")):
        load_torch_file(tmp_path, "checkpoint")


def test_a_weights_only_refusal_says_so_and_what_to_do(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"global_step": 1, "extra": Opaque()}, path)
    with pytest.raises(pickle.UnpicklingError, match=named(path, "with weights_only=True: the checkpoint file is readable")) as info:
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    message = str(info.value)
    assert "does not allow (Unsupported global: GLOBAL " in message and "Opaque" in message
    assert f"If you trust the source of {str(path)!r}, pass weights_only=False" in message
    assert "truncated" not in message
    assert isinstance(AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["extra"], Opaque)


def test_latest_checkpoint_skips_a_truncated_newest_file_with_a_warning(tmp_path):
    torch.save({"global_step": 4}, tmp_path / "round4.ckpt")
    save_truncated(tmp_path / "round8.ckpt", step=8)  # a save cut short, e.g. by a full disk
    with pytest.warns(UserWarning, match=named(tmp_path / "round8.ckpt", NOT_A_CHECKPOINT)):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "round4.ckpt")


def test_latest_checkpoint_with_nothing_readable_lists_every_file(tmp_path):
    save_truncated(tmp_path / "a.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "b.ckpt")  # readable, but no global_step
    with pytest.warns(UserWarning) as warned, pytest.raises(FileNotFoundError, match="No readable checkpoint in") as info:
        latest_checkpoint(tmp_path)
    message = str(info.value)
    assert re.search(named(tmp_path / "a.ckpt", NOT_A_CHECKPOINT), message)
    assert re.search(named(tmp_path / "b.ckpt", "it is not a Lightning checkpoint (expected a dict with an integer 'global_step'"), message)
    assert len(warned) == 2


class FullDisk(io.FileIO):
    """A file that takes ``budget`` bytes, then fails every write with ``ENOSPC``."""

    budget = 0

    def write(self, data):
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return super().write(data)


@pytest.mark.parametrize("budget", [0, 100])  # torch raises the OSError itself / a RuntimeError from its zip writer
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, budget):
    path = tmp_path / "last.ckpt"
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"w": torch.zeros(100)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(FullDisk, "budget", budget)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *args, **kwargs: FullDisk(fd, "wb"))
    with pytest.raises(OSError, match="Disk full: no space left on device to save the checkpoint") as info:
        io_plugin.save_checkpoint({"w": torch.ones(100)}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert f"the previous checkpoint at {str(path)!r} is intact" in str(info.value)
    assert path.read_bytes() == before and torch.equal(io_plugin.load_checkpoint(path)["w"], torch.zeros(100))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the temporary file was removed


@FIT_WITHOUT_VALIDATION
def test_fit_from_a_truncated_checkpoint_fails_before_any_round(tmp_path):
    batches = [sinusoid_batch(3, seed=r) for r in range(2)]
    trainer = quiet_trainer(max_steps=1, plugins=[AtomicCheckpointIO()])
    trainer.fit(lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05)), loader(*batches))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-200])
    model = lm.MAML(mlp(seed=1), inner_optimizer=SGD(lr=0.05))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(max_steps=2, plugins=[AtomicCheckpointIO()])
    with pytest.raises(ValueError, match=named(path, NOT_A_CHECKPOINT)):
        trainer.fit(model, loader(*batches), ckpt_path=path)
    assert trainer.global_step == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)


def test_tensor_clients_name_a_truncated_file(tmp_path):
    path = tmp_path / "clients.pt"
    torch.save([(torch.randn(4, 1), torch.randn(4)) for _ in range(3)], path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=named(path, "truncated or not a torch.save file")):
        TensorClients(str(path))


@pytest.mark.parametrize(
    "content, detail",
    [
        (b'{"users": ["u"], "user_data": {"u": {"x": [[1.0]], "y": [0]}}', "Expecting ',' delimiter"),  # truncated
        (b"users,num_samples\nu,3\n", "Expecting value"),  # not JSON
        (b'{"users": ["\xff"]}', "'utf-8' codec can't decode byte 0xff"),  # not UTF-8
        (b"", "the file is empty"),
    ],
)
def test_leaf_names_a_truncated_or_invalid_json_file(tmp_path, content, detail):
    path = tmp_path / "all_data_0.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=named(path, "truncated or not a LEAF JSON file (") + ".*" + re.escape(detail)):
        LEAFClients(str(tmp_path), clients_per_round=1).setup()
    with pytest.raises(FileNotFoundError, match=re.escape(f"No such LEAF JSON file: {str(tmp_path / 'x.json')!r}")):
        load_json_file(tmp_path / "x.json", "LEAF JSON")


def zero_state(key):
    return {"rounds": torch.zeros(()), "hidden": torch.zeros(3)}


def good_row():
    return {"rounds": torch.ones(()), "hidden": torch.ones(3)}


@pytest.mark.parametrize(
    "state, message",
    [
        ([good_row()], "Expected the per-client state to be a mapping {'rows': {client id: {name: tensor}}}, got a list"),
        ({"clients": {}}, "Expected the per-client state to be a mapping {'rows': {client id: {name: tensor}}}, got keys ['clients']"),
        ({"rows": [good_row()]}, "got 'rows' holding a list"),
        ({"rows": {3: [1.0, 2.0]}}, "Per-client state of client 3: expected a mapping {name: tensor}, got a list"),
        ({"rows": {3: {"rounds": 1.0, "hidden": torch.ones(3)}}}, "client 3: expected entry 'rounds' to be a tensor, got a float"),
        (
            {"rows": {3: good_row(), 5: {"rounds": torch.ones(())}}},
            "client 5: expected the entries and shapes of a new client's row {'hidden': [3], 'rounds': []}, got {'rounds': []}",
        ),
        (
            {"rows": {3: {"rounds": torch.ones(2), "hidden": torch.ones(3)}}},
            "client 3: expected the entries and shapes of a new client's row {'hidden': [3], 'rounds': []}, "
            "got {'hidden': [3], 'rounds': [2]}",
        ),
    ],
)
def test_client_state_rejects_malformed_rows_naming_the_entry(state, message):
    store = InMemoryClientState(zero_state)
    store.write([1], {"rounds": torch.full((1,), 7.0), "hidden": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match=re.escape(message)):
        store.load_state_dict(state)
    assert list(store.rows) == [1] and store.rows[1]["rounds"].item() == 7.0  # unchanged
    store.load_state_dict({"rows": {3: good_row()}})
    assert store.gather([3, 4])["rounds"].tolist() == [1.0, 0.0]
