"""The ``taskloom`` command. Nothing imports this module."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import anyio
import click

from runtime.app import Runtime
from runtime.observability import configure_logging

__all__ = ["main"]


def load_runtime(spec: str) -> Runtime:
    """``package.module:attr`` -> the Runtime it names."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(f"expected module:attribute (e.g. app.tasks:rt), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise click.BadParameter(f"cannot import {module_name!r}: {e}") from None
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise click.BadParameter(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Runtime):
        raise click.BadParameter(f"{spec} is a {type(obj).__qualname__}, not a taskloom Runtime")
    return obj


def _event_loop_backend() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return {}
    return {"use_uvloop": True}


@click.group()
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of console text.")
def main(log_level: str, log_json: bool) -> None:
    """taskloom: an asyncio-native task runtime."""
    configure_logging(log_level, json=log_json)


@main.command()
@click.argument("app")
@click.option("--queues", default=None, help="Comma-separated queues (default: all the app's).")
@click.option("--concurrency", default=100, show_default=True, type=click.IntRange(min=1),
              help="Tasks run at once per worker process.")
@click.option("--prefetch", default=None, type=click.IntRange(min=1),
              help="Deliveries held per process (default: the concurrency).")
@click.option("--shutdown-grace", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds in-flight tasks get to finish on SIGTERM.")
def worker(app: str, queues: str | None, concurrency: int, prefetch: int | None,
           shutdown_grace: float) -> None:
    """Run a worker for APP (module:runtime_attribute)."""
    from runtime.serve import serve_worker

    rt = load_runtime(app)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    code = anyio.run(serve_worker, rt, names, concurrency, prefetch, shutdown_grace,
                     backend_options=_event_loop_backend())
    sys.exit(code)


@main.command()
def demo() -> None:
    """Run a small pipeline on the embedded default and show what happened."""
    from runtime.demo import run_demo

    configure_logging("ERROR")
    anyio.run(run_demo, click.echo, backend_options=_event_loop_backend())


if __name__ == "__main__":
    main()
