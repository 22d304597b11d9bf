"""``taskloom dashboard APP`` and ``taskloom keys add NAME``; ``register(main)``
adds them to the ``taskloom`` group.

The dashboard is an extra (``pip install 'taskloom[dashboard]'``), so it is
loaded when a command runs, and a missing extra is one line saying what to
install. (It is imported by name: the layers contract keeps ``cli`` and
``dashboard`` side by side.)
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import click

from runtime.cli.common import fail, load_runtime, log
from runtime.errors import ConfigError, one_error
from runtime.process.metrics_hub import AGGREGATED_ENV, bind_metrics, quiet_server

__all__ = ["metrics_listener", "metrics_port_of", "register", "serve_with_metrics"]

_LOOPBACK_NAMES = ("localhost",)


def _dashboard() -> Any:
    """The dashboard package, or one line saying how to install it (an extra)."""
    try:
        import runtime.dashboard
        import runtime.dashboard.keys
    except ImportError as e:
        fail("the dashboard is not installed", ConfigError(
            f"{e}; install the extra: pip install 'taskloom[dashboard]'"))
    return runtime.dashboard


def metrics_listener() -> Any:
    """A new ``MetricsListener`` (lifecycle Listener feeding Prometheus metrics),
    or one line saying how to install the dashboard extra that has it."""
    try:
        import uvicorn  # noqa: F401  (the server of the endpoint: checked now, used later)

        from runtime.dashboard.metrics import MetricsListener
    except ImportError as e:
        fail("--metrics-port needs the dashboard extra", ConfigError(
            f"{e}; install the extra: pip install 'taskloom[dashboard]'"))
    return MetricsListener()


def metrics_port_of(port: int) -> int:
    """This process's metrics port. Kept for callers: with ``--processes N`` the
    supervisor serves ``port`` (the sum over its children) and the children none,
    so this is ``port`` itself."""
    return port


async def serve_with_metrics(run: Callable[[], Awaitable[int]], listener: Any, port: int) -> int:
    """``run()`` (the worker; its exit code is returned) with Prometheus text served
    at http://127.0.0.1:``port``/metrics from ``listener``'s metrics, in this event
    loop; the endpoint closes when the worker has stopped. A supervised child
    whose supervisor serves the sum (``AGGREGATED_ENV``) serves nothing itself:
    its metrics reach the supervisor through prometheus-client's multiprocess files."""
    from runtime.dashboard.metrics import metrics_app

    if os.environ.get(AGGREGATED_ENV):
        return await run()
    sock = bind_metrics(port)
    server = quiet_server(metrics_app(listener))
    log.info("metrics serving", url=f"http://127.0.0.1:{port}/metrics")
    try:
        with one_error:   # the worker's own error, not a group of one
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [sock])
                try:
                    code = await run()
                finally:
                    server.should_exit = True
    finally:
        sock.close()
    return code


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.argument("app")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key-file.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False),
              help="TOML key file made by `taskloom keys add`.")
@click.option("--hide-data-from-read", is_flag=True,
              help="Read-scope keys see no task arguments or results.")
def dashboard(app: str, host: str, port: int, api_key_file: str | None,
              hide_data_from_read: bool) -> None:
    """Serve the web UI (/), the REST API (/api, docs at /api/docs) and /metrics."""
    module = _dashboard()
    if api_key_file is None and not is_loopback(host):
        fail("refusing to serve the dashboard without keys", ConfigError(
            f"binding {host} exposes the dashboard beyond this machine; make a key with "
            "`taskloom keys add ops --scope admin --file keys.toml` and pass "
            "--api-key-file keys.toml, or bind 127.0.0.1"))
    try:
        keys = module.load_keys(api_key_file) if api_key_file is not None else None
        if keys is not None and not keys and not is_loopback(host):
            raise ConfigError(f"the key file {api_key_file!r} has no keys; add one with "
                              "`taskloom keys add`")
        asgi = module.dashboard_app(load_runtime(app), api_keys=keys,
                                    hide_data_from_read=hide_data_from_read)
    except ConfigError as e:
        fail("cannot start the dashboard", e)
    import uvicorn

    log.info("dashboard serving", url=f"http://{host}:{port}/", keys=bool(api_key_file))
    uvicorn.run(asgi, host=host, port=port, log_level="warning", access_log=False)


@click.group()
def keys() -> None:
    """API keys for the dashboard."""


@keys.command("add")
@click.argument("name")
@click.option("--scope", type=click.Choice(["admin", "read"]), default="read", show_default=True)
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False),
              help="The TOML key file (created 0600 if missing).")
def add(name: str, scope: str, path: str) -> None:
    """Make a key NAME; prints it once (the file keeps only its hash)."""
    module = _dashboard().keys
    try:
        secret = module.add_key(path, name, scope)
    except ConfigError as e:
        fail("cannot add the key", e)
    log.info("key added; it is shown once, store it now", name=name, scope=scope, file=path)
    sys.stdout.write(secret + "\n")   # the one place the key is shown: stdout, not a log


def register(group: click.Group) -> None:
    """Add ``dashboard`` and ``keys`` to the ``taskloom`` command group."""
    group.add_command(dashboard)
    group.add_command(keys)
