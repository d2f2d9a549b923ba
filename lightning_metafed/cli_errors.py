"""How the ``metafed`` command reports a user's mistake: one paragraph, not a chain of tracebacks.

An error raised while the CLI parses, builds or runs (a bad argument value, an unreadable file, a
diverged round) reaches the user wrapped in the argument parser's own errors. :func:`user_message`
picks the sentence that says what is wrong: the outermost error this library raised on purpose (by
a ``raise`` statement in its code), else an ``OSError`` (a file or the disk) or Lightning's
``MisconfigurationException`` (a Trainer setting this machine cannot run, e.g. ``--trainer.accelerator
gpu`` without a GPU). :func:`report`
prints it with the hint to rerun with ``--debug`` (or ``METAFED_DEBUG=1``) for the full
traceback. Anything else (a bug here, in the user's net, in a dependency) keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator, Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = ["DEBUG_ENV", "USER_ERRORS", "debug_requested", "report", "user_message"]

#: Environment variable that shows full tracebacks (any value but "", "0" or "false").
DEBUG_ENV = "METAFED_DEBUG"
#: The error types this library raises for a user's mistake.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, KeyError, ImportError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is among ``args`` or set in the environment; ``args`` without it."""
    rest = [a for a in args if a != "--debug"]
    if len(rest) != len(args):
        os.environ[DEBUG_ENV] = "1"  # DDP processes started from sys.argv see it too
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"), rest


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _raised_on_purpose(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement in this library's code."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    return os.path.abspath(last.filename).startswith(_PACKAGE) and (last.line or "").lstrip().startswith("raise")


def user_message(error: BaseException) -> str | None:
    """The one-paragraph message for ``error``, or ``None`` when it is not a user error (a bug,
    whose traceback should be shown)."""
    chain = list(_chain(error))
    ours = [e for e in chain if isinstance(e, USER_ERRORS) and _raised_on_purpose(e)]
    outside = [e for e in chain if isinstance(e, (OSError, MisconfigurationException))]
    chosen = ours[0] if ours else (outside[0] if outside else None)
    if chosen is None:
        return None
    text = str(chosen.args[0]) if isinstance(chosen, KeyError) and chosen.args else str(chosen)
    return f"{type(chosen).__name__}: {text}"


def other_process() -> bool:
    """Whether this is a DDP process other than the first (Lightning's launcher sets these variables)."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


def report(error: BaseException, command: str = "metafed") -> int:
    """Print ``error``'s message to stderr and return the exit status (2: a user error); re-raise
    errors that are not the user's."""
    message = user_message(error)
    if message is None:
        raise error
    if other_process() and any(getattr(e, "every_rank", False) for e in _chain(error)):
        return 2  # every process raised it; the first one prints it
    sys.stderr.write(f"{command}: error: {message}\n(rerun with --debug or {DEBUG_ENV}=1 for the full traceback)\n")
    return 2
