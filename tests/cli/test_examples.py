"""Every example runs (with few rounds) and does what its docstring promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_run_docstring():
    for path in EXAMPLES.glob("*.py"):
        module = load(path.stem)
        assert module.__doc__ and "Run:" in module.__doc__, path.name


def test_custom_architecture_example_subclasses_and_meta_learns():
    module = load("custom_architecture")
    untrained = module.main(max_epochs=0)  # the same seeded initialization, tested without a round
    results = module.main(max_epochs=1, rounds_per_epoch=40)
    assert 0.0 <= results["test/acc_post"] <= 1.0
    # after meta-training, adapting on a held-out client's support set lowers its query loss ...
    assert results["test/loss_post"] < results["test/loss_pre"]
    # ... and the adapted model is better than the untrained one adapted the same way
    assert results["test/loss_post"] < untrained["test/loss_post"]
    assert results["test/acc_post"] > untrained["test/acc_post"]
    model = module.DigitsConvMAML(task="classification")
    assert model.net[0].__class__.__name__ == "Conv2d"


def test_tensor_clients_example_adapts():
    results = load("tensor_clients").main(max_epochs=2, rounds_per_epoch=30)
    assert results["test/loss_post"] < results["test/loss_pre"]


def test_pure_python_example_round_by_hand():
    results = load("pure_python").main(rounds=200)
    assert results["test/loss_post"] < results["test/loss_pre"]


# The example resumes into the run's own checkpoint directory, as a restarted job would: Lightning notes it is not empty.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty:UserWarning")
def test_resume_example_reproduces_uninterrupted_fit():
    assert load("resume").main(total_rounds=12, stop_after=7) <= 1e-6
