"""The example on the front pages (README.md and the docs' landing page) is one example, and it runs
(with 3 rounds and one evaluation batch instead of 5 epochs: only the Trainer line is changed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAINER = "trainer = pl.Trainer(max_epochs=5)"
QUICK = (
    "trainer = pl.Trainer(max_steps=3, limit_val_batches=1, limit_test_batches=1, logger=False, "
    "enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)"
)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_front_page_example_is_the_same_on_both_pages_and_runs(tmp_path):
    (readme,), (landing,) = python_blocks(ROOT / "README.md"), python_blocks(ROOT / "docs" / "index.md")
    assert readme == landing and TRAINER in readme
    script = readme.replace(TRAINER, QUICK) + "\nprint(sorted(trainer.callback_metrics))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/loss_post" in result.stdout and "test/loss_pre" in result.stdout


def test_the_readme_names_the_ci_test_command_and_the_docs_build():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q -p no:cacheprovider" in readme and "python -m pytest -q -p no:cacheprovider" in ci
    build = re.search(r"python -m sphinx -W --keep-going (?:-q )?-b html docs docs/_build/html", ci)
    assert build and "python -m sphinx -W --keep-going -b html docs docs/_build/html" in readme
