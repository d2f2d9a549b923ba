"""Table cells and marked README/docs sections shared by the benchmark scripts."""

from __future__ import annotations

import math
import statistics
from pathlib import Path


def cell(values: list[float | None], digits: int = 3) -> str:
    """``mean ± std`` over seeds; ``None`` (target not reached) and non-finite (diverged) values are
    left out of the statistics and counted instead."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    missing = sum(v is None for v in values)
    diverged = sum(v is not None and not math.isfinite(v) for v in values)
    notes = [f"{n} of {len(values)} {what}" for n, what in ((missing, "not reached"), (diverged, "diverged")) if n]
    if not present:
        return "not reached" if missing else "diverged"
    text = f"{statistics.mean(present):.{digits}f} ± {statistics.pstdev(present):.{digits}f}"
    return text + (f" ({', '.join(notes)})" if notes else "")


def replace_section(path: Path, start: str, end: str, text: str) -> None:
    """Rewrite what lies between the ``start`` and ``end`` markers of ``path`` with ``text``."""
    content = path.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} section to update")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}{end}{tail}")
