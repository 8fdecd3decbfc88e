"""CI runs what a newcomer runs: the README's test command is the one in .ci/run."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    quick = blocks[:2]
    assert len(quick) == 2 and "gdn2q demo" in quick[0] and "pytest" in quick[1]
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert quick[1] in ci_lines
