"""README and CI agree: CI runs the README's quick-start commands as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quick_start_has_exactly_two_commands():
    assert len(_quick_start_commands()) == 2


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = {line.strip() for line in ci.splitlines()}
    for command in _quick_start_commands():
        for part in command.split("&&"):
            part = part.strip()
            assert part in ci_lines or f"pip install -q {part.removeprefix('pip install ')}" in ci_lines, (
                f"CI does not run README command {part!r}"
            )
