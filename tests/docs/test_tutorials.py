"""Every code block of the tutorials (``docs/tutorials/*.md``) runs here, so the tutorials cannot rot.

How each fenced block of a page is treated:

- ```` ```python ````: all of a page's Python blocks are joined, in page order, into ONE script that
  runs in a fresh ``python`` subprocess (state carries from block to block), at the position of the
  page's first Python block.
- ```` ```bash ````: every command must start with ``metafed``. Each runs the installed ``metafed``
  console script (through ``bash -c``, so globs expand) in page order, with
  ``--config <repository>/configs/smoke.yaml`` APPENDED so that it takes seconds: the smoke config
  (1 epoch of 3 rounds, 1 validation and 1 test batch) comes last and wins over the page's config.
  The numbers a page shows after a ``metafed`` command come from the full run; here the command
  runs and the shape of its output is checked.
- ```` ```{code-block} yaml ```` with ``:caption: NAME``: written to ``NAME`` before anything runs
  (a config file the page's commands use).
- Blocks inside a backtick-fenced admonition (```` ````{note} ````) are found and treated the same.
- ```` ```{code-block} LANG ```` with ``:class: no-test``: shown, not run (``pip install``,
  long-lived servers such as TensorBoard or a Flower SuperLink). ``EXPECTED`` pins how many each page
  has, so a runnable block cannot silently become a skipped one.
- ```` ```{code-block} text ```` with ``:class: output``: what the runnable block before it prints.
  Every line must match a line of that block's real output, with numbers masked (a line ``...`` is
  skipped).
- ```` ```{literalinclude} PATH ````: the file must exist (it is the repository's own, tested elsewhere).

Any other fence (``text``, ``yaml``, ``console``, a bare one, ...) fails the test: tag it.

Everything runs in a fresh temporary directory where ``configs``, ``examples`` and ``flower_app``
link to the repository's, so the pages' paths read as from the repository root. The subprocesses
run with one BLAS/OpenMP thread (the tutorials' tensors are tiny; on a shared 2-core machine extra
threads only spin) and up to two pages run at a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
SMOKE = ["--config", str(ROOT / "configs" / "smoke.yaml")]
LINKED = ("configs", "examples", "flower_app")  # the repository paths the pages use, linked into the run directory
TIMEOUT = 600  # seconds per runnable step
WORKERS = 2  # pages run at a time

# Per page: how many blocks of each kind. Change a count only together with the page.
EXPECTED = {
    "index.md": {},
    "first_run.md": {"python": 1, "bash": 2, "no-test": 2, "output": 3, "file": 0, "include": 1},
    "own_data.md": {"python": 4, "bash": 1, "no-test": 0, "output": 1, "file": 1, "include": 0},
    "personalization.md": {"python": 3, "bash": 0, "no-test": 0, "output": 2, "file": 0, "include": 0},
    "flower.md": {"python": 3, "bash": 0, "no-test": 3, "output": 2, "file": 0, "include": 0},
}

RUNNABLE = ("python", "bash")
CONTAINERS = ("note", "tip", "hint", "important", "warning", "caution", "attention", "seealso", "admonition", "dropdown")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$")
OPTION = re.compile(r"^:(?P<key>[\w-]+):\s*(?P<value>.*)$")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
ANY_NUMBER = r"(?:[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf))"


@dataclass
class Block:
    """One fenced block of a page: its kind, its body and where it starts."""

    page: str
    line: int  # 1-based line of the opening fence
    kind: str  # python, bash, no-test, output, file, include
    body: str
    options: dict[str, str] = field(default_factory=dict)
    arg: str = ""  # the directive's argument (language, or the include's path)

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.body.splitlines() if s.strip()), "")

    def where(self) -> str:
        return f"{self.page}, {self.kind} block at line {self.line} (`{self.first_line}`)"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of a MyST page, each classified (see the module docstring)."""
    return parse_lines(path.read_text().splitlines(), 1, path.name)


def parse_lines(lines: list[str], first: int, page: str) -> list[Block]:
    """The blocks of ``lines`` (``first``: the page's line number of ``lines[0]``); the blocks
    inside a backtick-fenced admonition are found too."""
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start = match["fence"], match["info"].strip(), first + i
        close = re.compile(rf"^\s*`{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page}: the fence at line {start} is never closed")
        indent = len(match["indent"])
        body_lines, options = [s[indent:] if not s[:indent].strip() else s.lstrip() for s in lines[i + 1 : j]], {}
        directive = re.match(r"^\{(?P<name>[\w-]+)\}\s*(?P<arg>.*)$", info)
        if directive and directive["name"] in CONTAINERS:
            blocks += parse_lines(lines[i + 1 : j], start + 1, page)
            i = j + 1
            continue
        if directive:
            while body_lines and OPTION.match(body_lines[0]):
                option = OPTION.match(body_lines[0])
                options[option["key"]] = option["value"].strip()
                body_lines = body_lines[1:]
        body = "\n".join(body_lines).strip("\n") + "\n"
        kind, arg = classify(page, start, info, directive, options)
        if kind is not None:
            blocks.append(Block(page, start, kind, body, options, arg))
        i = j + 1
    return blocks


def classify(page: str, line: int, info: str, directive: re.Match | None, options: dict[str, str]) -> tuple[str | None, str]:
    where = f"{page}, line {line} (```{info})"
    if directive is None:
        language = info.split()[0] if info else ""
        if language in RUNNABLE:
            return language, language
        raise AssertionError(
            f"{where}: a fence that is neither ```python nor ```bash; make it runnable, or tag it "
            "```{code-block} LANG with :class: no-test (shown, not run) or :class: output"
        )
    name, arg = directive["name"], directive["arg"].strip()
    if name in ("toctree", "contents"):
        return None, ""
    if name == "literalinclude":
        return "include", arg
    if name in ("code-block", "code", "sourcecode"):
        classes = options.get("class", "").split()
        if "no-test" in classes:
            return "no-test", arg
        if "output" in classes:
            return "output", arg
        if arg == "yaml" and "caption" in options:
            return "file", arg
        if arg in RUNNABLE:
            return arg, arg
    raise AssertionError(f"{where}: cannot tell whether this block runs; see tests/docs/test_tutorials.py")


def pages() -> list[Path]:
    return sorted(TUTORIALS.glob("*.md"))


def bash_commands(block: Block) -> list[str]:
    """The block's commands: ``\\``-continued lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block.body)
    commands = []
    for raw in joined.splitlines():
        command = strip_comment(raw).strip()
        if not command:
            continue
        if not command.startswith("metafed "):
            raise AssertionError(
                f"{block.where()}: `{command}` is not a `metafed` command; tag the block "
                "```{code-block} bash with :class: no-test if it is shown on purpose"
            )
        commands.append(command)
    return commands


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for k, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k]
    return line


def output_pattern(line: str) -> re.Pattern:
    """A shown output line as a pattern: numbers may differ, runs of spaces may differ in width."""
    words = ["".join(ANY_NUMBER if k % 2 else re.escape(piece) for k, piece in enumerate(split(word))) for word in line.split()]
    return re.compile(r"\s+".join(words))


def split(word: str) -> list[str]:
    """``word`` as text, number, text, number, ..., text (numbers at odd positions)."""
    pieces, last = [], 0
    for match in NUMBER.finditer(word):
        pieces += [word[last : match.start()], match.group()]
        last = match.end()
    return [*pieces, word[last:]]


def check_output(block: Block, actual: str, source: str) -> None:
    lines = [s.strip() for s in actual.splitlines()]
    for shown in block.body.splitlines():
        if not shown.strip() or shown.strip() in ("...", "…"):
            continue
        pattern = output_pattern(shown)
        assert any(pattern.fullmatch(s) for s in lines), (
            f"{block.where()}: the line\n    {shown.strip()}\nis not in the output of {source}, numbers aside:\n"
            + actual[-4000:]
        )


def environment() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)  # this environment's `python` and `metafed`
    return {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Step:
    """A runnable unit: the page's Python script, or one ``metafed`` command."""

    blocks: list[Block]  # the blocks the step runs (the script: every Python block)
    command: list[str]
    source: str  # what a failure names


def steps(blocks: list[Block], workdir: Path) -> list[tuple[Step, list[Block]]]:
    """The page's runnable steps in order, each with the output blocks shown after its blocks."""
    python = [b for b in blocks if b.kind == "python"]
    script = workdir / "tutorial_script.py"
    ordered: list[tuple[Step, list[Block]]] = []
    latest: list[Block] | None = None  # the output list of the step that ran the latest runnable block
    for block in blocks:
        if block.kind == "python":
            if block is python[0]:
                source = f"the page's Python script ({len(python)} block(s))"
                ordered.append((Step(python, [sys.executable, str(script)], source), []))
            latest = next(shown for step, shown in ordered if step.blocks is python)
        elif block.kind == "bash":
            for command in bash_commands(block):
                ordered.append((Step([block], ["bash", "-c", " ".join([command, *SMOKE])], f"`{command}`"), []))
            latest = ordered[-1][1]
        elif block.kind == "output":
            assert latest is not None, f"{block.where()}: an output block needs a runnable block before it"
            latest.append(block)
    return ordered


def write_script(blocks: list[Block], path: Path) -> list[tuple[int, Block]]:
    """Write the page's Python blocks as one script; returns (first script line, block) pairs."""
    text, starts = "", []
    for block in blocks:
        text += f"# --- {block.page}, line {block.line}\n"
        starts.append((text.count("\n") + 1, block))
        text += block.body + "\n"
    path.write_text(text)
    return starts


def failing_block(output: str, script: Path, starts: list[tuple[int, Block]]) -> Block | None:
    """The Python block whose line the traceback's innermost frame in ``script`` points at."""
    lines = [int(n) for n in re.findall(rf'File "{re.escape(str(script))}", line (\d+)', output)]
    if not lines:
        return None
    return [block for start, block in starts if start <= lines[-1]][-1]


def run_page(page: Path, workdir: Path) -> list[tuple[str, str]]:
    """Run one page; returns (source, output) per step. Raises ``AssertionError`` naming the block
    that failed, or whose shown output does not match."""
    blocks = parse(page)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (workdir / name).symlink_to(ROOT / name, target_is_directory=True)
    for block in blocks:
        if block.kind == "file":
            target = workdir / block.options["caption"]
            assert target.resolve().is_relative_to(workdir.resolve()), f"{block.where()}: the caption must be a relative path"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.body)
    python = [b for b in blocks if b.kind == "python"]
    starts = write_script(python, workdir / "tutorial_script.py") if python else []
    env, results = environment(), []
    for step, shown in steps(blocks, workdir):
        try:
            done = subprocess.run(
                step.command, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT
            )
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"{step.blocks[0].where()}: {step.source} ran past {TIMEOUT} s") from err
        output = done.stdout + done.stderr
        if done.returncode != 0:
            culprit = failing_block(output, workdir / "tutorial_script.py", starts) if step.blocks[0].kind == "python" else None
            culprit = culprit or step.blocks[0]
            raise AssertionError(
                f"{culprit.where()} failed: {step.source} exited with status {done.returncode}\n{output[-6000:]}"
            )
        for block in shown:
            check_output(block, output, step.source)
        results.append((step.source, output))
    return results


# ------------------------------------------------------------------------------------------ tests


def test_every_page_has_pinned_block_counts():
    """Each page's blocks are all classified, and their counts are the ones pinned in EXPECTED
    (a runnable block turned into a skipped one changes them)."""
    assert {p.name for p in pages()} == set(EXPECTED), "add the new page to EXPECTED (or remove the stale entry)"
    for page in pages():
        blocks = parse(page)
        counts = Counter(b.kind for b in blocks)
        expected = {k: v for k, v in EXPECTED[page.name].items() if v}
        assert dict(counts) == expected, f"{page.name}: blocks by kind {dict(counts)}, expected {expected}"
        for block in blocks:
            if block.kind == "bash":
                bash_commands(block)  # every command is a `metafed` one
            if block.kind == "include":
                assert (page.parent / block.arg).is_file(), f"{block.where()}: {block.arg} does not exist"
            if block.kind == "no-test":
                assert block.body.strip(), f"{block.where()}: empty"


@pytest.fixture(scope="module")
def page_runs(request, tmp_path_factory) -> dict[str, Future]:
    """Start every selected page at once (two at a time); each test waits for its own."""
    selected = [
        item.callspec.params["page"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "page" in item.callspec.params
    ]
    pool = ThreadPoolExecutor(max_workers=WORKERS)
    runs = {
        name: pool.submit(run_page, TUTORIALS / name, tmp_path_factory.mktemp(Path(name).stem))
        for name in dict.fromkeys(selected)
    }
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


RUN_PAGES = [name for name, counts in EXPECTED.items() if any(counts.get(k) for k in RUNNABLE)]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_runs(page, page_runs):
    """The page's Python script and ``metafed`` commands exit with status 0, and every output block
    matches what was printed."""
    results = page_runs[page].result()
    runnable = [b for b in parse(TUTORIALS / page) if b.kind in RUNNABLE]
    assert results and runnable


def test_a_failing_block_fails_and_is_named(tmp_path):
    """The machinery itself: a raising block fails the page, naming the page and that block's first
    line; an output block that does not match fails too."""
    page = tmp_path / "broken.md"
    page.write_text(
        "# Broken\n\n```python\nx = 1\nprint('value:', x)\n```\n\n"
        "```{code-block} text\n:class: output\n\nvalue: 2\n```\n\n"
        "```python\nraise RuntimeError('boom')\n```\n"
    )
    with pytest.raises(AssertionError, match=r"broken\.md, python block at line 14 \(`raise RuntimeError\('boom'\)`\) failed"):
        run_page(page, tmp_path / "run1")
    page.write_text(
        "# Broken\n\n```python\nprint('value:', 3.5, 'and more')\n```\n\n"
        "```{code-block} text\n:class: output\n\nvalue: 2 and less\n```\n"
    )
    with pytest.raises(AssertionError, match=r"the line\n\s+value: 2 and less\n\s*is not in the output"):
        run_page(page, (tmp_path / "run2"))
    page.write_text("```text\nuntagged\n```\n")
    with pytest.raises(AssertionError, match="neither ```python nor ```bash"):
        parse(page)
    page.write_text("```bash\npip install lightning-metafed\n```\n")
    with pytest.raises(AssertionError, match="is not a `metafed` command; tag the block"):
        bash_commands(parse(page)[0])


def test_output_lines_match_with_other_numbers():
    pattern = output_pattern("loss          2.9031    0.3879     0.9068    0.3879    99.80%")
    assert pattern.fullmatch("loss          3.9438    3.8192     9.3254    3.8192    70.00%")
    assert not pattern.fullmatch("acc           3.9438    3.8192     9.3254    3.8192    70.00%")
    pattern = output_pattern("{'test/loss_pre': 2.903, 'test/loss_post': 0.388}")
    assert pattern.fullmatch("{'test/loss_pre': 3.9, 'test/loss_post': nan}")
