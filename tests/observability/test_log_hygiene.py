"""Logs hold no secrets or data (issue 10.4): tracebacks are plain, bounded and
without local variables unless asked for; importing taskloom configures no
logging; result-store URL errors never print a password.

The worker runs in a subprocess per renderer: structlog caches a module's
logger on first use, so a configuration made inside this test process would
depend on which test ran first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from runtime.errors import ConfigError
from runtime.logs import MAX_TRACEBACK_CHARS, format_exception
from runtime.results import results_from_url

SECRET = "SIGNING-KEY-7f3a9c"  # a local variable of the failing frame
ARGUMENT = "ARGUMENT-VALUE-52e1"  # the task's argument, in the worker's locals (msg, body)

# An embedded worker whose result store fails on an internal path (outside the
# task body): the worker's catch-all logs "internal error handling a delivery"
# with the traceback, while frames below hold the message (its body and
# arguments) and a local holding a key.
_SCRIPT = textwrap.dedent(f"""
    import sys
    import anyio
    from runtime import Runtime
    from runtime.logs import configure_logging
    from runtime.results import MemoryResultStore

    class LeakyStore(MemoryResultStore):
        def is_revoked(self, task_id: str) -> bool:
            key = b"{SECRET}"
            expected = key.hex() + task_id
            raise RuntimeError("the revocation view is broken; report this bug")

    async def main() -> None:
        rt = Runtime(results=LeakyStore())

        @rt.task(name="hygiene.echo")
        async def echo(text: str) -> str:
            return text

        with anyio.fail_after(30):  # a generous bound: the machine is shared
            async with rt, rt.worker(concurrency=1) as worker:
                await rt.enqueue(echo.s("{ARGUMENT}"))
                await worker.idle()

    configure_logging("INFO", json=sys.argv[1] == "json", show_locals=sys.argv[2] == "locals")
    anyio.run(main)
""")


def _worker_log(renderer: str, locals_: str = "plain") -> str:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, renderer, locals_],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "internal error handling a delivery" in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("renderer", ["console", "json"])
def test_an_internal_error_logs_a_traceback_without_secrets_or_arguments(renderer: str) -> None:
    out = _worker_log(renderer)
    assert SECRET not in out and SECRET.encode().hex() not in out
    assert ARGUMENT not in out
    # the traceback itself is there: what failed and where
    assert "RuntimeError: the revocation view is broken" in out
    assert "in is_revoked" in out
    assert "╭" not in out and "locals" not in out.lower()  # no Rich panels, no locals
    if renderer == "json":
        line = next(ln for ln in out.splitlines() if "internal error handling" in ln)
        record = json.loads(line)
        assert "Traceback (most recent call last)" in record["exception"]
        assert "exc_info" not in record


def test_locals_appear_only_when_asked_for() -> None:
    out = _worker_log("console", "locals")
    assert SECRET in out  # the debug option works (and is off by default, above)


def _recurse(n: int, secret: str) -> None:
    if n == 0:
        raise ValueError("deep")
    _recurse(n - 1, secret)


def test_a_deep_traceback_is_bounded_and_plain() -> None:
    try:
        _recurse(500, SECRET)
    except ValueError as e:
        text = format_exception(e)
    assert len(text) <= MAX_TRACEBACK_CHARS + 100
    assert text.endswith("ValueError: deep")
    assert SECRET not in text
    try:
        raise ExceptionGroup("many", [ValueError(str(i)) for i in range(10_000)])
    except ExceptionGroup as e:
        text = format_exception(e)
    assert len(text) <= MAX_TRACEBACK_CHARS + 100


def test_importing_taskloom_configures_no_logging() -> None:
    code = ("import logging, structlog, runtime, runtime.logs, brokers; "
            "assert not structlog.is_configured(), 'structlog configured at import'; "
            "assert not logging.getLogger().handlers, 'a root handler at import'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("url", [
    "redis://user:hunter2-pw@127.0.0.1:6379/0?ttl_s=soon",
    "redis://user:hunter2-pw@127.0.0.1:6379/0?max_result_bytes=lots",
    "postgres://user:hunter2-pw@db/results",
])
def test_result_store_url_errors_redact_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        results_from_url(url, ttl_s=60.0, namespace="")
    text = str(caught.value)
    assert "hunter2-pw" not in text and "***" in text
    assert "hunter2-pw" not in format_exception(caught.value)
