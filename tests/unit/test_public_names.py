"""Every name the README shows is importable from ``runtime``, and ``import runtime``
stays light: no Redis or AMQP client, no OpenTelemetry, no logging set-up."""

from __future__ import annotations

import subprocess
import sys

import runtime


def test_the_names_the_readme_shows_come_from_runtime() -> None:
    from runtime import Middleware, ProcessPool, TracingMiddleware, running
    from runtime.middleware import Middleware as Defined
    from runtime.process.pool import ProcessPool as DefinedPool
    from runtime.testing import running as defined_running
    from runtime.tracing import TracingMiddleware as DefinedTracing

    assert (Middleware, ProcessPool, TracingMiddleware, running) == (
        Defined, DefinedPool, DefinedTracing, defined_running)
    assert {"Middleware", "ProcessPool", "TracingMiddleware", "running"} <= set(runtime.__all__)


def test_importing_runtime_loads_no_client_and_configures_no_logging() -> None:
    code = (
        "import logging, sys, structlog, runtime\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('redis', 'aio_pika', 'aiormq', 'opentelemetry'))\n"
        "assert not heavy, f'import runtime loaded {heavy}'\n"
        "assert not structlog.is_configured(), 'structlog configured at import'\n"
        "assert not logging.getLogger().handlers, 'a root handler at import'\n"
        "runtime.TracingMiddleware\n"
        "assert 'opentelemetry' in sys.modules, 'TracingMiddleware did not load OpenTelemetry'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=60)  # a fresh interpreter: generous on a loaded machine
    assert done.returncode == 0, done.stderr
