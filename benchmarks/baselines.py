"""Raw-client baselines: the fastest loops redis-py and aio-pika do in one process.

The physical limit taskloom is measured against, in the same run and on the
same servers (``taskloom bench`` runs them as the framework ``raw``):

* **redis throughput**: N messages pre-loaded into a stream (pipelined XADD,
  timed: the *enqueue* baseline), then one consumer process with
  ``--streams`` loops in flight, each XREADGROUP COUNT ``batch`` then one
  pipeline of SET EX (the result) + XACK for the batch; the CPU time of that
  phase (getrusage) over N is the CPU µs per task;
* **redis round trip**: a worker process blocked in XREADGROUP BLOCK wakes,
  SETs the result and PUBLISHes; the client (subscribed on a held connection
  before publishing) XADDs and awaits the message;
* **amqp throughput**: N persistent messages published with confirms in
  batches (the *enqueue* baseline), then consumed with prefetch ``prefetch``
  (taskloom's), each delivery's result SET EX in Redis (pipelined per flush)
  before a multiple-ack of everything stored;
* **amqp round trip**: publish with confirm -> the consumer SETs the result
  in Redis and PUBLISHes -> the client wakes.

Each role runs as ``python -m benchmarks.baselines ROLE CONFIG_JSON`` and
prints one ``BENCH-RESULT {json}`` line (the harness's protocol), so it runs
in a process of its own like the frameworks' workers, on uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aredis

__all__ = ["ROLES", "main"]

RESULT_PREFIX = "BENCH-RESULT "
PAYLOAD = b"x" * 160  # about the size of a taskloom no-op message body
RESULT = b'{"status":"succeeded","value":null}'
GROUP = "g"
TTL_S = 3600


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------- Redis


async def _xadd_all(client: aredis.Redis, stream: str, n: int, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(batch, n - start)):
            pipe.execute_command("XADD", stream, "*", "m", PAYLOAD)
        await pipe.execute()
    return time.perf_counter() - t0


async def redis_throughput(url: str, ns: str, n: int, batch: int = 1000,
                           streams: int = 4, count: int = 100) -> dict[str, Any]:
    """Pipelined XADD of n, then ``streams`` XREADGROUP + SET EX + XACK loops in flight."""
    client = aredis.Redis.from_url(url, max_connections=streams + 2)
    stream = f"{ns}:stream"
    try:
        await client.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
        enqueue_s = await _xadd_all(client, stream, n, batch)
        done = 0

        async def consume(name: str) -> None:
            nonlocal done
            while done < n:
                reply = await client.execute_command(
                    "XREADGROUP", "GROUP", GROUP, name, "COUNT", count, "STREAMS", stream, ">")
                if not reply:
                    if done >= n:
                        return
                    await asyncio.sleep(0.001)
                    continue
                entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
                ids = [e[0] for e in entries]
                pipe = client.pipeline(transaction=False)
                for i in ids:
                    pipe.execute_command("SET", f"{ns}:r:{i.decode()}", RESULT, "EX", TTL_S)
                pipe.execute_command("XACK", stream, GROUP, *ids)
                await pipe.execute()
                done += len(ids)

        cpu0, t0 = _cpu_s(), time.perf_counter()
        await asyncio.gather(*(consume(f"c{i}") for i in range(streams)))
        took, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        return {"enqueue_seconds": enqueue_s, "drain_seconds": took, "processed": done,
                "cpu_us_per_task": cpu / done * 1e6}
    finally:
        await _redis_purge(client, ns)
        await client.aclose()


async def _redis_purge(client: aredis.Redis, ns: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{ns}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.unlink(*keys[start:start + 1000])


async def redis_rt_worker(url: str, ns: str) -> dict[str, Any]:
    """Blocks in XREADGROUP; per message SET EX the result + PUBLISH, then XACK."""
    client = aredis.Redis.from_url(url)
    stream = f"{ns}:stream"
    with contextlib.suppress(aredis.ResponseError):  # the group exists already
        await client.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while True:
        reply = await client.execute_command(
            "XREADGROUP", "GROUP", GROUP, "w", "COUNT", 100, "BLOCK", 1000, "STREAMS", stream,
            ">")
        if not reply:
            continue
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        pipe = client.pipeline(transaction=False)
        for _id, fields in entries:
            tid = fields[b"id"] if isinstance(fields, dict) else fields[1]
            pipe.execute_command("SET", f"{ns}:r:{tid.decode()}", RESULT, "EX", TTL_S)
            pipe.execute_command("PUBLISH", f"{ns}:done:{tid.decode()}", b"1")
        pipe.execute_command("XACK", stream, GROUP, *[e[0] for e in entries])
        await pipe.execute()


async def _with_worker(role: str, config: dict[str, Any],
                       client: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Run ``client`` while a worker role runs in a process of its own."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.baselines", role,
                             json.dumps(config)], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        if line.strip() != b"READY":
            raise RuntimeError(f"the baseline worker {role} did not start (exit "
                               f"{proc.poll()}): see its stderr above")
        return await client()
    finally:
        proc.terminate()  # this process started it, by its pid
        proc.wait(timeout=30)


async def redis_latency(url: str, ns: str, n: int, warmup: int) -> dict[str, Any]:
    """Sequential XADD -> worker -> SET + PUBLISH -> the subscribed client wakes."""
    client = aredis.Redis.from_url(url)
    stream = f"{ns}:stream"
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{ns}:done:*")  # subscribed on a held connection, once
    await pubsub.get_message(timeout=1.0)

    async def trips() -> dict[str, Any]:
        took = []
        for i in range(warmup + n):
            tid = f"t{i}"
            t0 = time.perf_counter()
            await client.execute_command("XADD", stream, "*", "id", tid, "m", PAYLOAD)
            while True:
                msg = await pubsub.get_message(timeout=10.0)
                if msg is None:
                    raise RuntimeError(f"no result for {tid} within 10 s from the raw worker")
                if msg.get("type") == "pmessage":
                    break
            if i >= warmup:
                took.append((time.perf_counter() - t0) * 1000)
        return {"latencies_ms": took}

    try:
        return await _with_worker("redis_rt_worker", {"url": url, "ns": ns}, trips)
    finally:
        await pubsub.aclose()
        await _redis_purge(client, ns)
        await client.aclose()


# ---------------------------------------------------------------- RabbitMQ


async def _amqp_queue(amqp_url: str, queue: str) -> Any:
    import aio_pika

    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel(publisher_confirms=True)
    await channel.declare_queue(queue, durable=True)
    return conn, channel


async def _publish_all(channel: Any, queue: str, n: int, batch: int) -> float:
    import aio_pika

    t0 = time.perf_counter()
    exchange = channel.default_exchange
    for start in range(0, n, batch):
        await asyncio.gather(*(exchange.publish(
            aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             message_id=f"t{start + i}"), routing_key=queue)
            for i in range(min(batch, n - start))))
    return time.perf_counter() - t0


async def amqp_throughput(amqp_url: str, redis_url: str, ns: str, n: int, batch: int = 1000,
                          prefetch: int = 100) -> dict[str, Any]:
    """Confirmed publishes of n in batches, then consume with prefetch: SET EX each
    result in Redis (one pipeline per flush), then one multiple-ack."""
    queue = f"{ns}.raw"
    conn, channel = await _amqp_queue(amqp_url, queue)
    client = aredis.Redis.from_url(redis_url)
    try:
        enqueue_s = await _publish_all(channel, queue, n, batch)
        consume = await conn.channel()
        await consume.set_qos(prefetch_count=prefetch)
        q = await consume.get_queue(queue)
        pending: list[Any] = []
        arrived = asyncio.Event()
        finished = asyncio.Event()
        done = 0

        async def on_message(message: Any) -> None:
            pending.append(message)
            arrived.set()

        async def flush() -> None:
            nonlocal done
            while done < n:
                await arrived.wait()
                arrived.clear()
                taken = pending[:]
                pending.clear()
                pipe = client.pipeline(transaction=False)
                for m in taken:
                    pipe.execute_command("SET", f"{ns}:r:{m.message_id}", RESULT, "EX", TTL_S)
                await pipe.execute()
                await taken[-1].ack(multiple=True)
                done += len(taken)
            finished.set()

        cpu0, t0 = _cpu_s(), time.perf_counter()
        flusher = asyncio.create_task(flush())
        tag = await q.consume(on_message)
        await finished.wait()
        took, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        await flusher
        await q.cancel(tag)
        return {"enqueue_seconds": enqueue_s, "drain_seconds": took, "processed": done,
                "cpu_us_per_task": cpu / done * 1e6}
    finally:
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
        await conn.close()
        await _redis_purge(client, ns)
        await client.aclose()


async def amqp_rt_worker(amqp_url: str, redis_url: str, ns: str) -> dict[str, Any]:
    queue = f"{ns}.raw"
    conn, _ = await _amqp_queue(amqp_url, queue)
    client = aredis.Redis.from_url(redis_url)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=100)
    q = await channel.get_queue(queue)

    async def on_message(message: Any) -> None:
        tid = message.message_id
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("SET", f"{ns}:r:{tid}", RESULT, "EX", TTL_S)
        pipe.execute_command("PUBLISH", f"{ns}:done:{tid}", b"1")
        await pipe.execute()
        await message.ack()

    await q.consume(on_message)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.Event().wait()
    return {}


async def amqp_latency(amqp_url: str, redis_url: str, ns: str, n: int,
                       warmup: int) -> dict[str, Any]:
    import aio_pika

    queue = f"{ns}.raw"
    conn, channel = await _amqp_queue(amqp_url, queue)
    client = aredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{ns}:done:*")
    await pubsub.get_message(timeout=1.0)

    async def trips() -> dict[str, Any]:
        took = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 message_id=f"t{i}"), routing_key=queue)
            while True:
                msg = await pubsub.get_message(timeout=10.0)
                if msg is None:
                    raise RuntimeError(f"no result for t{i} within 10 s from the raw worker")
                if msg.get("type") == "pmessage":
                    break
            if i >= warmup:
                took.append((time.perf_counter() - t0) * 1000)
        return {"latencies_ms": took}

    try:
        return await _with_worker("amqp_rt_worker", {"amqp_url": amqp_url,
                                                     "redis_url": redis_url, "ns": ns}, trips)
    finally:
        await pubsub.aclose()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
        await conn.close()
        await _redis_purge(client, ns)
        await client.aclose()


ROLES: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "redis_throughput": redis_throughput,
    "redis_latency": redis_latency,
    "redis_rt_worker": redis_rt_worker,
    "amqp_throughput": amqp_throughput,
    "amqp_latency": amqp_latency,
    "amqp_rt_worker": amqp_rt_worker,
}


def main(argv: list[str]) -> int:
    role, config = argv[1], json.loads(argv[2])
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = dict(runner(ROLES[role](**config)))
    out["maxrss_kb"] = _rss_kb()
    sys.stdout.write(RESULT_PREFIX + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
