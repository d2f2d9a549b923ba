"""The ``>>>`` examples in the package's docstrings run and print what they show.

Every module under ``lightning_metafed`` is imported (a module whose optional dependency is missing
is skipped, and named) and its doctests are run with ``ELLIPSIS | NORMALIZE_WHITESPACE``. The
public objects below must each keep at least one example, so the examples cannot disappear silently.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import lightning_metafed

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: Third-party packages a module may need that are optional extras of this package.
OPTIONAL_DEPENDENCIES = ("flwr", "opacus", "higher", "sklearn", "torchvision")

#: Public objects (by import path) that must each carry at least one docstring example.
DOCUMENTED = (
    "lightning_metafed.MAML",
    "lightning_metafed.FedAvg",
    "lightning_metafed.TaskBatch",
    "lightning_metafed.data.FederatedDataModule",
    "lightning_metafed.data.SinusoidClients",
    "lightning_metafed.data.TensorClients",
    "lightning_metafed.aggregators.Mean",
    "lightning_metafed.aggregators.CoordinateMedian",
    "lightning_metafed.aggregators.TrimmedMean",
    "lightning_metafed.aggregators.NormBoundedMean",
    "lightning_metafed.aggregators.Krum",
    "lightning_metafed.privacy.ClientDP",
    "lightning_metafed.faults.ClientFaults",
    "lightning_metafed.inner.SGD",
    "lightning_metafed.compression.TopK",
    "lightning_metafed.compression.QSGD",
    "lightning_metafed.compression.SignSGD",
    "lightning_metafed.functional.weighted_mean",
    "lightning_metafed.functional.coordinate_median",
    "lightning_metafed.functional.clip_to_norm",
    "lightning_metafed.functional.adapt",
    "lightning_metafed.functional.maml_update",
    "lightning_metafed.functional.fedavg_update",
)


def _module_names() -> list[str]:
    """The package and every module under it (``walk_packages`` imports only the packages)."""
    infos = pkgutil.walk_packages(lightning_metafed.__path__, prefix="lightning_metafed.")
    return ["lightning_metafed", *(info.name for info in infos)]


MODULE_NAMES = _module_names()


def _load(name: str) -> ModuleType:
    """Import ``name``; skip (naming the package) when an optional dependency is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing = (getattr(error, "name", None) or "").split(".")[0]
        if missing not in OPTIONAL_DEPENDENCIES:
            raise
        pytest.skip(f"{name} needs the optional dependency {missing!r}, which is not installed")


def _doctests(module: ModuleType) -> list[doctest.DocTest]:
    """The module's own doctests (objects re-exported from other modules are tested there)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [test for test in finder.find(module, module.__name__) if test.examples]


# Importing the Flower modules imports typer, which calls click APIs deprecated in click 8.2 (third-party).
@pytest.mark.filterwarnings("ignore:'click.utils.get_.*_stream' is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_docstring_examples_pass(name: str):
    module = _load(name)
    failures = []
    for test in _doctests(module):  # none: the import alone is the check
        report: list[str] = []
        result = doctest.DocTestRunner(optionflags=OPTIONFLAGS).run(test, out=report.append)
        if result.failed:
            failures.append(f"{test.name} ({test.filename}:{test.lineno}):\n{''.join(report)}")
    assert not failures, f"{len(failures)} failing docstring example(s) in {name}:\n" + "\n".join(failures)


def _resolve(path: str) -> object:
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


@pytest.mark.parametrize("path", DOCUMENTED)
def test_public_object_has_an_example(path: str):
    obj = _resolve(path)
    parsed = doctest.DocTestParser().get_examples(obj.__doc__ or "")
    assert parsed, f"{path} lost its docstring example (an `Example:` section with a `>>>` session)"


def test_example_count_does_not_shrink():
    documented = 0
    for name in MODULE_NAMES:
        try:
            documented += len(_doctests(_load(name)))
        except pytest.skip.Exception:  # a module of an optional extra that is not installed
            continue
    assert documented >= len(DOCUMENTED), f"expected at least {len(DOCUMENTED)} docstrings with examples, found {documented}"
