"""Which error the `metafed` command reduces to one paragraph, and which keeps its traceback."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_metafed.cli_errors import DEBUG_ENV, debug_requested, report, user_message
from lightning_metafed.files import load_json_file
from lightning_metafed.inner import SGD


def raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        return error
    raise AssertionError("expected an error")


def test_a_deliberate_error_of_the_library_is_the_message_even_when_wrapped():
    ours = raised(lambda: SGD(lr=-1.0))
    try:
        raise ValueError("Does not validate against any of the Union subtypes") from ours
    except ValueError as wrapper:
        assert user_message(wrapper) == f"ValueError: {ours}"


def test_file_errors_from_anywhere_are_the_message(tmp_path):
    missing = raised(lambda: open(tmp_path / "nope.yaml"))
    assert user_message(missing).startswith("FileNotFoundError:") and "nope.yaml" in user_message(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert "truncated or not a LEAF JSON file" in user_message(raised(lambda: load_json_file(bad, "LEAF JSON")))


def test_a_trainer_setting_this_machine_cannot_run_is_the_message():
    devices = 10**6 if torch.cuda.is_available() else 1  # more GPUs than there are, or a GPU where there is none
    error = raised(lambda: pl.Trainer(accelerator="gpu", devices=devices))
    assert user_message(error) == f"MisconfigurationException: {error}"


def test_a_bug_keeps_its_traceback():
    bug = raised(lambda: {}["missing"])  # a KeyError not raised on purpose
    assert user_message(bug) is None
    typo = raised(lambda: len(3))
    assert user_message(typo) is None
    with pytest.raises(TypeError):
        report(typo)


def test_debug_flag_is_removed_and_exported(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert debug_requested(["fit", "--config", "x.yaml"]) == (False, ["fit", "--config", "x.yaml"])
    assert debug_requested(["fit", "--debug"]) == (True, ["fit"])
    assert os.environ[DEBUG_ENV] == "1"
