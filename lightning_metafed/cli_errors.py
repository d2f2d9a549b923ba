"""How the ``metafed`` command reports a user's mistake: one paragraph, not a chain of tracebacks.

An error raised while the CLI parses, builds or runs (a bad argument value, an unreadable file, a
diverged round) reaches the user wrapped in the argument parser's own errors. :func:`user_message`
picks the sentence that says what is wrong (the outermost error raised by this library, else the
first not raised by the parser) and :func:`report` prints it with the hint to rerun with
``--debug`` (or ``METAFED_DEBUG=1``) for the full traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator, Sequence

__all__ = ["DEBUG_ENV", "USER_ERRORS", "debug_requested", "report", "user_message"]

#: Environment variable that shows full tracebacks (any value but "", "0" or "false").
DEBUG_ENV = "METAFED_DEBUG"
#: The error types a user can act on from their message alone.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError, KeyError, ImportError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_PARSER = f"{os.sep}jsonargparse{os.sep}"


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is among ``args`` or set in the environment; ``args`` without it."""
    rest = [a for a in args if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return env or len(rest) != len(args), rest


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _raised_in(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return os.path.abspath(frames[-1].filename) if frames else ""


def user_message(error: BaseException) -> str | None:
    """The one-paragraph message for ``error``, or ``None`` when it is not a user error (a bug,
    whose traceback should be shown)."""
    chain = list(_chain(error))
    ours = [e for e in chain if _raised_in(e).startswith(_PACKAGE) and isinstance(e, USER_ERRORS)]
    outside_parser = [e for e in chain if _PARSER not in _raised_in(e) and isinstance(e, USER_ERRORS)]
    chosen = ours[0] if ours else (outside_parser[0] if outside_parser else None)
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
