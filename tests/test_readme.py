"""The README's first example, run as written (extracted from README.md, so an
edit that breaks it fails here), and its test command's shape."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_first_example_runs_as_written() -> None:
    first = _blocks("python")[0]
    assert "await run(add.s(1, 2)) == 3" in first
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(first, "README.md:first-example", "exec"), namespace)

    async def bounded() -> None:
        with anyio.fail_after(30):
            await namespace["main"]()

    anyio.run(bounded)


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    commands = "\n".join(_blocks("sh"))
    assert ".venv/bin/pytest -q" in commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/pytest -q" in ci
