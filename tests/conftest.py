"""Shared test configuration: server URLs, the CI rule for missing servers and tools,
and the CI rule for skips.

In CI (``CI`` set to anything but ``""``/``0``/``false``) a skipped test is a FAILED
test unless its node id is listed, with a reason, in ``tests/skips_allowed.toml``.
A skip means the test proved nothing; CI has every server and tool it needs
(``.ci/run`` installs and starts them), so a skip there is a bug to fix, not noise.
``pytest -rs`` (see ``addopts`` in pyproject.toml) prints every skip locally too.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REDIS_URL = os.environ.get("TASKLOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TASKLOOM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

SKIPS_ALLOWED_FILE = Path(__file__).with_name("skips_allowed.toml")


def server_missing(what: str, error: BaseException) -> None:
    """A test needs a server that is not reachable: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but not reachable: {error!r}")
    pytest.skip(f"{what} not reachable: {error!r}")


def require_tool(name: str, install_hint: str) -> str:
    """The path of executable ``name``: fail in CI when it is missing (``.ci/run``
    installs it), skip elsewhere, saying how to install it."""
    exe = shutil.which(name)
    if exe is None:
        message = f"{name} is not on PATH: {install_hint} (.ci/run installs it in CI)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return exe


@pytest.fixture
def namespace() -> str:
    """A unique key/queue prefix per test, so tests never meet on a shared server."""
    return f"t{uuid.uuid4().hex[:10]}"


# -- no silent skips ----------------------------------------------------------------------


def load_skips_allowed(path: Path = SKIPS_ALLOWED_FILE) -> dict[str, str]:
    """``{node id pattern: reason}`` from the allow-list; every entry needs a reason."""
    if not path.exists():
        return {}
    with path.open("rb") as f:
        data = tomllib.load(f)
    allowed: dict[str, str] = {}
    for entry in data.get("skip", []):
        test, reason = entry.get("test", ""), entry.get("reason", "").strip()
        if not test or not reason:
            raise pytest.UsageError(
                f"{path}: every [[skip]] entry needs a `test` (node id or glob) and a `reason`; "
                f"fix the entry {entry!r}")
        allowed[test] = reason
    return allowed


def skip_is_allowed(nodeid: str, allowed: dict[str, str]) -> bool:
    return any(fnmatch.fnmatchcase(nodeid, pattern) for pattern in allowed)


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


_ALLOWED = pytest.StashKey[dict[str, str]]()
#: Modules skipped at collection in CI and not allow-listed ("node id: reason").
_hidden_modules: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ALLOWED] = load_skips_allowed()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, turn a skip (from a marker, a fixture or the test body) into a failure
    unless the allow-list names the test. An xfail is not a skip and is left alone."""
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    if skip_is_allowed(item.nodeid, item.config.stash[_ALLOWED]):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped in CI ({_skip_reason(report)}): a skip proves nothing. Make the test run "
        f"(.ci/run installs and starts redis-server and rabbitmq-server), or list "
        f"{item.nodeid!r} with its reason in tests/skips_allowed.toml")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped at collection (``pytest.importorskip``, a module-level skip)
    hides every test in it: in CI that fails the run too, unless allow-listed."""
    if IN_CI and report.skipped and not skip_is_allowed(report.nodeid, load_skips_allowed()):
        _hidden_modules.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _hidden_modules and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if _hidden_modules:
        terminalreporter.section("modules skipped in CI: a failure (tests/skips_allowed.toml)")
        for line in _hidden_modules:
            terminalreporter.line(line)
