"""The types reach a user's type checker: ``mypy --strict`` on a user's file
(outside this repository, so the package is seen as installed and typed only
through ``py.typed``) reports each wrong call, and a correct file passes.

Each wrong line in ``WRONG`` ends with ``# E: <mypy error code>``; the test
checks that mypy reports exactly those lines, with those codes. (A result
type that does not fit the variable is reported where the canvas is built,
as ``arg-type``: mypy infers the canvas's type from the variable.)

Where the types stop (see ``runtime.canvas.Composable``): calling the task
itself (``add(1, 2)``) is typed ``Any`` (run() refuses it at run time); a
chain does not check that a step's result fits the next step's first
parameter; a step that gets the previous result is written ``.partial()``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

COMMON = '''
from runtime import Runtime, TaskHandle, chain, chord, group, run

rt = Runtime()


@rt.task
async def add(x: int, y: int) -> int:
    return x + y


@rt.task(retries=2, name="sum")
def total(xs: list[int]) -> int:
    return sum(xs)
'''

CORRECT = COMMON + '''

async def main() -> None:
    async with rt, rt.worker():
        n: int = await run(add.s(1, 2))
        n2: int = await rt.run(add.s(x=1, y=2), timeout=5)
        h: TaskHandle[int] = await rt.enqueue(add.s(1, y=2), countdown=0.01)
        m: int = await h.result(timeout=5)
        k: int = await h
        hs: list[TaskHandle[int]] = await rt.enqueue_many([add.s(1, 2), add.si(3, 4)])
        c: int = await run(chain(add.s(1, 2), add.partial(3)))
        d: int = await run(add.s(1, 2) | add.partial(4) | add.partial(5))
        g: list[int] = await run(group(add.s(1, 2), add.s(3, 4)))
        g2: list[int] = await run(group(add.s(i, i) for i in range(3)))
        t: int = await run(chord([add.s(1, 2), add.s(3, 4)], total.partial()))
        s: int = await run(total.s([1, 2]).set(priority=5))
        assert (n, n2, m, k, c, d, g, g2, t, s) == (3, 3, 3, 3, 6, 12, [3, 7], [0, 2, 4], 10, 3)
        assert [await one for one in hs] == [3, 7]
'''

WRONG = COMMON + '''

async def main() -> None:
    async with rt:
        add.s("x", 2)  # E: arg-type
        add.s(1)  # E: call-arg
        add.s(1, 2, z=3)  # E: call-arg
        add.si(1, "2")  # E: arg-type
        add.partial("x")  # E: arg-type
        total.s([1, "a"])  # E: list-item
        total.s()  # E: call-arg
        a: str = await run(add.s(1, 2))  # E: arg-type
        b: str = await rt.run(total.s([1]))  # E: arg-type
        h: TaskHandle[str] = await rt.enqueue(add.s(1, 2))  # E: arg-type
        h2 = await rt.enqueue(add.s(1, 2))
        c: str = await h2.result()  # E: assignment
        d: str = await h2  # E: assignment
        e: str = await run(chain(add.s(1, 2), add.partial(3)))  # E: arg-type
        f: list[str] = await run(group(add.s(1, 2), add.s(3, 4)))  # E: arg-type
        g: str = await run(chord([add.s(1, 2)], total.partial()))  # E: arg-type
        chain(add.s(1, 2), add.s(3))  # E: call-arg
        print(a, b, h, c, d, e, f, g)
'''

LINE = re.compile(r"^(?P<file>[\w.]+):(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$")


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str]:
    """mypy --strict on both user files, run once (a cold mypy takes seconds)."""
    where = tmp_path_factory.mktemp("user_project")
    (where / "user_correct.py").write_text(CORRECT)
    (where / "user_wrong.py").write_text(WRONG)
    (where / "mypy.ini").write_text("[mypy]\nstrict = True\nshow_error_codes = True\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir",
         str(where / ".mypy_cache"), "--no-pretty", "user_correct.py", "user_wrong.py"],
        cwd=where, capture_output=True, text=True, timeout=600, check=False,
    )
    return done.returncode, done.stdout + done.stderr


def errors_in(report: str, file: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for line in report.splitlines():
        m = LINE.match(line)
        if m and m["file"] == file:
            found.setdefault(int(m["line"]), set()).add(m["code"])
    return found


def test_the_library_is_typed_for_its_users(mypy_report: tuple[int, str]) -> None:
    _, report = mypy_report
    assert "untyped" not in report, report  # py.typed is shipped
    assert "import-untyped" not in report and "import-not-found" not in report, report


def test_a_correct_user_file_passes_mypy_strict(mypy_report: tuple[int, str]) -> None:
    _, report = mypy_report
    assert errors_in(report, "user_correct.py") == {}, report


def test_every_wrong_call_in_a_user_file_is_reported(mypy_report: tuple[int, str]) -> None:
    returncode, report = mypy_report
    assert returncode == 1, report
    expected: dict[int, set[str]] = {}
    for number, text in enumerate(WRONG.splitlines(), start=1):
        if "# E: " in text:
            expected[number] = {text.rsplit("# E: ", 1)[1].strip()}
    assert len(expected) == 16
    found = errors_in(report, "user_wrong.py")
    missing = {n: WRONG.splitlines()[n - 1].strip() for n in expected if n not in found}
    assert not missing, f"mypy did not report: {missing}\n{report}"
    assert found == expected, report


async def test_the_correct_user_file_also_runs() -> None:
    """``.partial()`` and the typed canvas behave at run time as the types say."""
    namespace: dict[str, Any] = {"__name__": "user_correct"}
    exec(compile(CORRECT, "user_correct.py", "exec"), namespace)
    with anyio.fail_after(30):  # a dozen in-process tasks; bounded so a hang fails
        await namespace["main"]()


def test_py_typed_is_shipped_in_both_packages() -> None:
    root = Path(__file__).resolve().parents[2]
    assert (root / "runtime" / "py.typed").is_file()
    assert (root / "brokers" / "py.typed").is_file()
