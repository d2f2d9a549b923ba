"""AtomicCheckpointIO: a failed save leaves the previous checkpoint intact; Trainer saves load back."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_metafed.checkpoint import AtomicCheckpointIO


def test_save_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "a.ckpt"  # missing parent directories are created
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3.0)}, path)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["w"], torch.arange(3.0))
    assert os.listdir(path.parent) == ["a.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0o600


def test_save_failing_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(100)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk ...
        f.flush()
        siblings = [p for p in os.listdir(tmp_path) if p != "last.ckpt"]
        assert len(siblings) == 1 and siblings[0].endswith(".tmp")  # ... in a temp file beside the target
        raise KeyboardInterrupt("killed mid-write")  # ... then the save dies (BaseException, like a signal)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.ones(100)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(100))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the temp file was removed


def test_trainer_checkpoints_through_the_plugin_all_load(tmp_path):
    trainer = quiet_trainer(
        max_steps=6, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, save_last=True)],
    )
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(BoringModel())
    names = sorted(os.listdir(tmp_path))
    assert "last.ckpt" in names and len(names) == 4 and all(n.endswith(".ckpt") for n in names)
    for name in names:
        assert torch.load(tmp_path / name, weights_only=False)["global_step"] in (2, 4, 6)


def test_latest_checkpoint_picks_the_highest_step_and_ignores_temporary_files(tmp_path):
    from lightning_metafed.checkpoint import latest_checkpoint

    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        latest_checkpoint(tmp_path)
    for name, step in (("round5.ckpt", 5), ("round10.ckpt", 10), ("last.ckpt", 5)):
        torch.save({"global_step": step}, tmp_path / name)
    (tmp_path / ".round15.ckpt.123.abcd.tmp").write_bytes(b"half a file")  # a save killed mid-write
    assert latest_checkpoint(tmp_path) == str(tmp_path / "round10.ckpt")  # last.ckpt lags one save behind
    torch.save({"global_step": 10}, tmp_path / "last.ckpt")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")  # on a tie, last.ckpt
