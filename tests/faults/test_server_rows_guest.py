"""Row S2 (RELIABILITY.md): RabbitMQ's ``guest`` user from a non-loopback address.

Against a node this module starts itself (never the shared one on 5672), with a
second TCP listener on the machine's own non-loopback IPv4 address (found from
the interfaces at run time; a machine without one fails the test, it does not
skip). The node keeps RabbitMQ's default ``loopback_users = guest``.

- ``amqp://guest:guest@<that address>:<port>/?allow_guest=true``: taskloom lets
  the URL through, the broker refuses the login, and ``async with rt`` raises
  ``ConnectionFailed`` (a ``TaskloomError``) naming the URL with the password
  shown as ``***`` and carrying RabbitMQ's "ACCESS_REFUSED - Login was refused
  using authentication mechanism PLAIN"; the client is not told why, the
  node's log says "user 'guest' can only connect via localhost";
- the same node over 127.0.0.1 as guest: an enqueue -> worker -> result round
  trip works, so the refusal above is the broker's loopback rule, not a port
  that nobody answers;
- without ``allow_guest=true`` the same URL is refused when the runtime is
  built, before any connection (``brokers/amqp/options.py``).

Results stay in memory (``results="memory://"``): the worker runs in the
test's process, and the shared Redis is not touched.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import structlog

from runtime import Runtime
from runtime.errors import ConfigError, ConnectionFailed
from tests.faults.harness import HarnessError, RabbitNode, free_port, tail, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.timeout(150)]

#: A bound on connecting (or failing to) and on one round trip, for a loaded machine.
BOUND_S = 60.0
#: What the node logs when it refuses ``guest`` through a non-loopback address.
REASON = "user 'guest' can only connect via localhost"

log = structlog.get_logger("tests.guest")


def non_loopback_ipv4() -> str:
    """The first IPv4 address of this machine that is not loopback (nor link-local)."""
    for _name, addrs in sorted(psutil.net_if_addrs().items()):
        for addr in addrs:
            if addr.family != socket.AF_INET:
                continue
            ip = ipaddress.IPv4Address(addr.address)
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                return str(addr.address)
    raise HarnessError(
        "row S2 needs a non-loopback IPv4 address on this machine to reach a RabbitMQ node "
        f"from outside loopback, and found none (interfaces: {sorted(psutil.net_if_addrs())})")


def free_port_on(ip: str, avoid: list[int]) -> int:
    """A port free on both 127.0.0.1 (:func:`free_port`) and ``ip``."""
    for _ in range(50):
        port = free_port(avoid=avoid)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return port
    raise HarnessError(f"no TCP port free on both 127.0.0.1 and {ip}")


class ExposedRabbitNode(RabbitNode):
    """A :class:`RabbitNode` with a second TCP listener on ``ip`` (:attr:`outer_port`).

    ``loopback_users`` is left at RabbitMQ's default (``guest`` may log in only
    through a loopback address) unless ``guest_anywhere``.
    """

    def __init__(self, root: Path, *, ip: str, guest_anywhere: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.ip = ip
        self.outer_port = free_port_on(ip, avoid=[self.port, self.dist_port])
        with (self.dir / "rabbitmq.conf").open("a") as conf:
            conf.write(f"listeners.tcp.outer = {ip}:{self.outer_port}\n")
            if guest_anywhere:
                conf.write("loopback_users.guest = false\n")

    def outer_url(self, query: str = "") -> str:
        return f"amqp://guest:guest@{self.ip}:{self.outer_port}/" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def exposed_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExposedRabbitNode]:
    """One node for the module, listening on loopback and on the outer address."""
    root = tmp_path_factory.mktemp("rabbit-guest")
    node = ExposedRabbitNode(root, ip=non_loopback_ipv4())
    node.start()
    try:
        listeners = node.ctl("eval", "rabbit_networking:active_listeners().", timeout=30)
        assert f"{node.outer_port}" in listeners, (
            f"the node does not listen on {node.ip}:{node.outer_port}:\n{listeners}")
        yield node
    finally:
        node.close()
        shutil.rmtree(root, ignore_errors=True)


def build(url: str, namespace: str) -> Runtime:
    rt = Runtime(broker=url, results="memory://", namespace=namespace)

    @rt.task(name="guest.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return rt


async def test_guest_from_a_non_loopback_address_is_refused_by_the_broker(
    exposed_rabbit: ExposedRabbitNode, namespace: str,
) -> None:
    url = exposed_rabbit.outer_url("allow_guest=true")
    rt = build(url, namespace)  # taskloom lets it through: allowed explicitly
    started = time.monotonic()
    caught: ConnectionFailed | None = None
    try:
        with anyio.fail_after(BOUND_S):
            async with rt:
                await rt.enqueue(rt.signature("guest.add", 1, 1))
    except ConnectionFailed as e:
        caught = e
    assert caught is not None, f"guest logged in through {exposed_rabbit.ip}"
    message = str(caught)
    log.info("guest.refused", after_s=round(time.monotonic() - started, 2), message=message)
    assert ":guest@" not in message, message  # the password is redacted
    assert f"amqp://guest:***@{exposed_rabbit.ip}:{exposed_rabbit.outer_port}/" in message, message
    assert "ACCESS_REFUSED - Login was refused" in message, message
    # and says why, which RabbitMQ never tells the client
    assert "log in only through a loopback address" in message, message
    # RabbitMQ does not tell the client why; its log does: the loopback rule
    node_log = exposed_rabbit.dir / "log" / f"{exposed_rabbit.name}.log"

    async def logged() -> str | None:
        text = node_log.read_text(errors="replace") if node_log.exists() else ""
        return next((line for line in text.splitlines() if REASON in line), None)

    line = await wait_until(logged, timeout=BOUND_S, what=f"{REASON!r} in {node_log}",
                            describe=lambda: tail(node_log))
    log.info("guest.refused.server", line=line)


async def test_guest_through_loopback_on_the_same_node_works(
    exposed_rabbit: ExposedRabbitNode, namespace: str,
) -> None:
    rt = build(exposed_rabbit.url, namespace)
    with anyio.fail_after(BOUND_S):
        async with rt, rt.worker(concurrency=2):
            handle = await rt.enqueue(rt.signature("guest.add", 40, 2))
            assert await handle.result(timeout=BOUND_S) == 42


def test_guest_towards_a_non_loopback_address_is_refused_before_connecting(
    exposed_rabbit: ExposedRabbitNode, namespace: str,
) -> None:
    with pytest.raises(ConfigError, match="refusing the default 'guest' user"):
        build(exposed_rabbit.outer_url(), namespace)
