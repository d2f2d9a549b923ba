"""The API reference in docs/reference/api documents every public name, and every public class and
function names each of its arguments in its docstring.

Fast (no Sphinx build): the pages' autodoc directives are parsed, the package is imported.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import re
import warnings
from pathlib import Path

import pytest

API_PAGES = Path(__file__).resolve().parents[2] / "docs" / "reference" / "api"

#: The modules whose ``__all__`` the reference covers.
MODULES = [
    "lightning_metafed",
    "lightning_metafed.data",
    "lightning_metafed.inner",
    "lightning_metafed.aggregators",
    "lightning_metafed.privacy",
    "lightning_metafed.faults",
    "lightning_metafed.compression",
    "lightning_metafed.nets",
    "lightning_metafed.functional",
    "lightning_metafed.round",
    "lightning_metafed.flower",
    "lightning_metafed.cli",
    "lightning_metafed.resume",
    "lightning_metafed.checkpoint",
]

#: Public classes whose constructor arguments are not this package's to document, with the reason.
UNDOCUMENTED_ARGUMENTS = {
    "lightning_metafed.cli.MetaFedCLI": "its constructor is LightningCLI's, unchanged and documented by Lightning",
}

# ``.. autoclass:: name`` / ``.. py:function:: name(sig)``, then its ``   :option: value`` lines.
DIRECTIVE = re.compile(r"^\.\. (?P<kind>auto\w+|py:\w+|module):: +(?P<name>[\w.]+)[^\n]*\n(?P<options>(?:[ \t]+:[\w-]+:[^\n]*\n)*)", re.M)


with warnings.catch_warnings():
    # Flower's CLI dependency typer imports click helpers that Click 8.2 deprecates
    warnings.filterwarnings("ignore", "'click.utils.get_", DeprecationWarning)
    try:  # the Flower page's modules
        for module in ("lightning_metafed.flower", "lightning_metafed.flower_server", "lightning_metafed.flower_secure"):
            importlib.import_module(module)
    except ImportError:  # the optional flwr extra is missing: the Flower modules are skipped below
        pass


FLOWER = importlib.util.find_spec("flwr") is not None


def _import(module: str) -> object:
    if module == "lightning_metafed.flower":
        pytest.importorskip("flwr")
    return importlib.import_module(module)


def _resolve(name: str) -> object:
    """The object a dotted name refers to: by attributes from the package, as Python evaluates it (a
    function wins over a submodule of the same name), else as autodoc imports it (the longest
    importable module, then attributes)."""
    parts = name.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        pass
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


def _directives() -> list[tuple[str, str, dict[str, str]]]:
    """``(kind, full name, options)`` of every directive in the API pages."""
    found = []
    for page in sorted(API_PAGES.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            options = dict(re.findall(r":([\w-]+):[ \t]*([^\n]*)", match["options"]))
            name = match["name"]
            if match["kind"].startswith("py:") and "module" in options:
                name = f"{options['module']}.{name}"
            if name.startswith("lightning_metafed.flower") and not FLOWER:
                continue  # the optional Flower extra is not installed
            found.append((match["kind"], name, options))
    return found


@functools.cache
def _targets() -> frozenset[str]:
    """Every name the pages make a cross-reference target, as autodoc and the Python domain do:
    the documented name, a class's defining path (autodoc's ``:canonical:``), an automodule's
    ``__all__`` with ``:members:``."""
    targets = set()
    for kind, name, options in _directives():
        targets.add(name)
        if kind.startswith("py:"):
            continue
        obj = _resolve(name)
        if inspect.isclass(obj):
            targets.add(f"{obj.__module__}.{obj.__qualname__}")
        if kind == "automodule" and "members" in options and "no-members" not in options:
            excluded = {member.strip() for member in options.get("exclude-members", "").split(",")}
            targets.update(f"{name}.{member}" for member in obj.__all__ if member not in excluded)
    return frozenset(targets)


def _public_objects() -> dict[str, object]:
    """Every public class and function of :data:`MODULES`, by its first public path."""
    objects: dict[int, tuple[str, object]] = {}
    for module in MODULES:
        if module == "lightning_metafed.flower" and not FLOWER:
            continue  # the optional Flower extra is not installed
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                objects.setdefault(id(obj), (f"{module}.{name}", obj))
    return dict(objects.values())


def _is_named(parameter: str, doc: str, source: str) -> bool:
    """``parameter`` has an ``Args:``/``Attributes:`` entry (``name:``, ``name (type):``) or is quoted
    as a literal (````name```` or ````name=...````) in ``doc``, or is a field with a ``#:``
    doc-comment (on the lines above it, or after it on its line) in ``source``."""
    name = re.escape(parameter)
    return bool(
        re.search(rf"^\s*\**{name}(\s*\([^)\n]*\))?\s*:", doc, re.M)
        or re.search(rf"``{name}(``|\s*=)", doc)
        or re.search(rf"^[ \t]*#:.*\n[ \t]*{name}\s*[:=]", source, re.M)
        or re.search(rf"^[ \t]*{name}\s*[:=].*#:", source, re.M)
    )


def _documentation(obj: object) -> tuple[str, str]:
    """What documents ``obj``'s arguments: a function's docstring; a class's own docstring and its
    ``__init__``'s docstring (where ``__init__`` is defined), and the class's source for its fields'
    doc-comments."""
    if inspect.isfunction(obj):
        return obj.__doc__ or "", ""
    docs = [obj.__doc__ or ""]
    init = inspect.getattr_static(obj, "__init__", None)
    if inspect.isfunction(init):
        docs.append(init.__doc__ or "")
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):  # pragma: no cover - a class without source
        source = ""
    return "\n".join(docs), source


def _arguments(obj: object) -> list[str]:
    """The named parameters of a function, or of a class's constructor (without ``self``)."""
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in inspect.signature(obj).parameters.values() if p.kind not in skip and p.name != "self"]


def test_pages_exist_with_an_index():
    index = (API_PAGES / "index.md").read_text(encoding="utf-8")
    pages = {page.stem for page in API_PAGES.glob("*.md")} - {"index"}
    assert pages, "no API pages"
    toctree = re.search(r"```\{toctree\}\n(.*?)```", index, re.S)
    assert toctree, "docs/reference/api/index.md has no toctree"
    listed = {line.strip() for line in toctree[1].splitlines() if line.strip() and not line.startswith(":")}
    assert listed == pages, f"toctree lists {sorted(listed)}, pages are {sorted(pages)}"


def test_every_directive_names_an_importable_object():
    for kind, name, _ in _directives():
        if kind.startswith("auto"):
            _resolve(name)  # raises for a typo or a moved name


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_documented(module):
    targets = _targets()
    missing = [name for name in _import(module).__all__ if f"{module}.{name}" not in targets]
    assert not missing, f"{module}.__all__ names not documented in {API_PAGES}: {missing}"


def test_every_argument_is_documented():
    missing = {}
    for path, obj in _public_objects().items():
        if path in UNDOCUMENTED_ARGUMENTS or f"{obj.__module__}.{obj.__qualname__}" in UNDOCUMENTED_ARGUMENTS:
            continue
        doc, source = _documentation(obj)
        undocumented = [name for name in _arguments(obj) if not _is_named(name, doc, source)]
        if undocumented:
            missing[path] = undocumented
    lines = "\n".join(f"  {path}: {names}" for path, names in sorted(missing.items()))
    assert not missing, f"arguments not named in the docstring ({sum(map(len, missing.values()))}):\n{lines}"


def test_exemptions_are_still_needed():
    objects = _public_objects()
    for path in UNDOCUMENTED_ARGUMENTS:
        assert path in objects, f"{path} is exempted but not public: remove it from UNDOCUMENTED_ARGUMENTS"
        doc, source = _documentation(objects[path])
        assert any(not _is_named(name, doc, source) for name in _arguments(objects[path])), (
            f"{path} documents every argument now: remove it from UNDOCUMENTED_ARGUMENTS"
        )
