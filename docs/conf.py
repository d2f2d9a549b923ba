"""Sphinx configuration: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ and the package, also without an install

project = "lightning-metafed"
author = "the lightning-metafed authors"
copyright = "2026, the lightning-metafed authors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "ARCHITECTURE.md"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # defaults as written (``torch.optim.Adam``, ``math.pi``), not their repr
autodoc_inherit_docstrings = False  # Lightning's own hooks are documented by Lightning
autodoc_class_signature = "mixed"  # the constructor signature on the class line (most __init__ have no docstring)
python_maximum_signature_line_length = 99  # longer signatures: one parameter a line
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every reference to this package must resolve; references into torch, Lightning, Flower and the
# standard library are left as plain text (no network here for intersphinx inventories).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|lightning|flwr|numpy|np|opacus|typing|collections|pathlib|abc|dataclasses|jsonargparse|os)\b.*"),
    (r"py:.*", r"(Tensor|Params|Aux|Encoding|Encoded|Any|Callable|Mapping|Sequence|Iterator|Literal|Path|RecordDict|Context|Message|nn\.Module|OptimizerCallable|LRSchedulerCallable)\b.*"),
    (r"py:.*", r"(int|float|str|bool|None|dict|list|tuple|type|object|Exception|ValueError|FloatingPointError)$"),
    # Private helpers (a leading underscore in the module or class name), e.g. the ConfigObject base.
    (r"py:class", r"lightning_metafed(\.\w+)*\._\w+.*"),
    # MetaFedModule's mixins: their members are documented on MetaFedModule itself.
    (r"py:class", r"lightning_metafed\.algorithms\.(bookkeeping\.LedgerHooks|setup_checks\.SetupCheckHooks|evaluation\.EvaluationHooks)"),
]


html_theme = "furo"
html_title = "lightning-metafed"
html_static_path: list[str] = []
pygments_style = "friendly"


# Annotations imported only under TYPE_CHECKING stay unqualified strings in signatures; qualify them
# with their public paths so that they link (an unqualified name can match several targets).
_PUBLIC_PATHS = {
    "TaskBatch": "lightning_metafed.TaskBatch",
    "MetaFedModule": "lightning_metafed.MetaFedModule",
    "FederatedDataModule": "lightning_metafed.data.FederatedDataModule",
}
_UNQUALIFIED = re.compile(r"(?<![\w.])(" + "|".join(_PUBLIC_PATHS) + r")\b")


# A default autodoc cannot read from the source (a dataclass's generated ``__init__``) is shown by its
# repr, ``<function name>`` or ``<class 'name'>``, which no signature parser reads: show the name.
_REPR = re.compile(r"<function ([\w.]+)(?: at 0x[0-9a-f]+)?>|<class '([\w.]+)'>")


def _qualify(text: str | None) -> str | None:
    if not text:
        return text
    text = _REPR.sub(lambda match: match[1] or match[2], text)
    return _UNQUALIFIED.sub(lambda match: "~" + _PUBLIC_PATHS[match[1]], text)  # shown short, as autodoc does


def _qualify_signature(app, what, name, obj, options, signature, return_annotation):
    return _qualify(signature), _qualify(return_annotation)


def _import(name: str) -> object | None:
    """The object a dotted ``lightning_metafed`` name refers to, or ``None``: by attributes from the
    package, as Python evaluates it (a function wins over a submodule of the same name), else as
    autodoc imports it (the longest importable module, then attributes)."""
    parts = name.split(".")
    if parts[0] != "lightning_metafed":
        return None
    try:
        obj = importlib.import_module(parts[0])
        for part in parts[1:]:
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        pass
    for split in range(len(parts) - 1, 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for part in parts[split:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _resolve_defining_path(app, env, node, contnode):
    """A function documented under its public path (``lightning_metafed.functional.krum``) is also
    found by its defining path (``lightning_metafed.functional.aggregate.krum``), as autodoc's
    ``:canonical:`` does for classes: the reference resolves to where the same function is documented."""
    if node.get("refdomain") != "py" or node.get("reftype") not in ("func", "meth", "obj"):
        return None
    domain = env.get_domain("py")
    target, module = node["reftarget"].lstrip("~."), node.get("py:module")
    for name in ([f"{module}.{target}"] if module else []) + [target]:
        obj = _import(name)
        if not inspect.isfunction(obj):
            continue
        documented = [
            other for other, entry in domain.objects.items()
            if entry.objtype in ("function", "method") and _import(other) is obj
        ]
        if documented:  # the one sharing the longest prefix with the defining module
            best = max(documented, key=lambda other: len(os.path.commonprefix([other, obj.__module__])))
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], best, node, contnode)
    return None


def setup(app):
    app.connect("autodoc-process-signature", _qualify_signature)
    app.connect("missing-reference", _resolve_defining_path)
