"""An application for the dead-letter CLI test on RabbitMQ (results on Redis): the
namespace from ``TASKLOOM_NAMESPACE`` (set by the test for the command), or given to
:func:`make` by the test itself, which runs the worker in its own process."""

from __future__ import annotations

from runtime import Runtime
from tests.conftest import AMQP_URL, REDIS_URL

#: The test turns the failure off before it replays.
broken = {"on": True}


def make(namespace: str | None = None) -> Runtime:
    rt = Runtime(AMQP_URL, results=REDIS_URL, namespace=namespace)

    @rt.task(name="cli.dlq.flaky", queue="cdq")
    async def flaky(x: int) -> int:
        if broken["on"]:
            raise ValueError(f"broken for {x}")
        return x * 2

    @rt.task(name="cli.dlq.other", queue="cdq")
    async def other(x: int) -> int:
        raise KeyError(x)

    return rt


rt = make()
