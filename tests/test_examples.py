"""The examples run as a newcomer runs them: a subprocess whose servers come from the
``RESEED_*`` variables that ``python -m coordinator servers`` prints (here the session's
embedded servers), checked by what they print. The README shows them verbatim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.serve import environment
from coordinator.lab.servers import Deployment

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def example_env(servers: EmbeddedServers) -> dict[str, str]:
    return {**os.environ, **environment(Deployment.embedded(servers).servers)}


def _run(name: str, env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else len(readme)]


def test_quickstart_prints_the_rebuild_the_increment_and_the_reset(
    example_env: dict[str, str],
) -> None:
    expected = ["spend 12.5", "after a request 12.5123", "after the reset 0"]
    assert _run("quickstart.py", example_env) == expected
    # A rerun starts cold again and prints the same.
    assert _run("quickstart.py", example_env) == expected


def test_the_readme_quickstart_is_the_example_file() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme_section("Quickstart"), re.DOTALL)
    assert blocks, "the README's Quickstart has no python block"
    assert blocks[0] == (EXAMPLES / "quickstart.py").read_text()


def test_budget_check_allows_refuses_counts_once_and_resets(
    example_env: dict[str, str],
) -> None:
    assert _run("budget_check.py", example_env) == [
        "request 1: allowed, key spent 0 of 3",
        "request 2: allowed, key spent 1 of 3",
        "request 3: allowed, key spent 2 of 3",
        "request 4: refused, key spent 3 of 3",
        "retry of request 3: duplicate=True, nothing counted twice",
        "after the key's reset: allowed, key spent 0 of 3",
        "the user (no budget) has spent 3",
    ]


def test_the_readme_points_at_the_budget_example() -> None:
    assert "examples/budget_check.py" in _readme_section("Quickstart")
