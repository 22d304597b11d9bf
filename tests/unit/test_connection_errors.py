"""One classification of connection failures (issue 10, finding 1): the Redis
broker and the Redis result store map every low-level "the connection is not
usable" error to their retryable types (``ConnectionLost``,
``ResultStoreUnavailable``), including the RuntimeError uvloop raises on a write
to a transport that a reset closed; other errors keep their meaning."""

from __future__ import annotations

import asyncio
import socket
import ssl

import anyio
import pytest
import redis.exceptions as rex
import uvloop

from brokers.base import BrokerError, ConnectionFailed, ConnectionLost, is_connection_failure
from brokers.redis.errors import mapped as _mapped
from runtime.errors import ResultError, ResultStoreUnavailable
from runtime.results.redis import RedisResultStore


def uvloop_closed_transport_error() -> RuntimeError:
    """The real error: uvloop, a TCP transport aborted (as by a reset), then a write."""

    async def main() -> RuntimeError:
        server = socket.create_server(("127.0.0.1", 0))
        try:
            _, writer = await asyncio.open_connection(*server.getsockname())
            writer.transport.abort()
            await asyncio.sleep(0.01)  # the abort completes on the loop
            try:
                writer.writelines([b"PING\r\n"])  # what redis-py does
            except RuntimeError as e:
                return e
            raise AssertionError("uvloop accepted a write on an aborted transport")
        finally:
            server.close()

    return uvloop.run(main())


CONNECTION_FAILURES = [
    pytest.param(uvloop_closed_transport_error(), id="uvloop-closed-transport"),
    pytest.param(ConnectionResetError(104, "Connection reset by peer"), id="reset"),
    pytest.param(BrokenPipeError(32, "Broken pipe"), id="broken-pipe"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), id="refused"),
    pytest.param(TimeoutError(), id="timeout"),
    pytest.param(OSError(113, "No route to host"), id="oserror"),
    pytest.param(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), id="ssl-eof"),
    pytest.param(asyncio.IncompleteReadError(b"$5\r\nab", 7), id="incomplete-read"),
    pytest.param(EOFError(), id="eof"),
    pytest.param(anyio.BrokenResourceError(), id="anyio-broken"),
    pytest.param(rex.ConnectionError("Connection closed by server."), id="redis-connection"),
    pytest.param(rex.TimeoutError("Timeout reading from socket"), id="redis-timeout"),
    pytest.param(rex.BusyLoadingError("Redis is loading"), id="redis-loading"),
]

NOT_CONNECTION_FAILURES = [
    pytest.param(RuntimeError("dictionary changed size during iteration"), id="runtime-other"),
    pytest.param(ValueError("bad"), id="value"),
    pytest.param(rex.ResponseError("ERR unknown command"), id="redis-response"),
    pytest.param(rex.DataError("Invalid input"), id="redis-data"),
]


def test_uvloop_error_is_the_one_seen_in_the_field() -> None:
    assert "unable to perform operation on" in str(uvloop_closed_transport_error())


@pytest.mark.parametrize("error", CONNECTION_FAILURES)
def test_connection_failures_are_classified_as_such(error: BaseException) -> None:
    assert is_connection_failure(error, (rex.ConnectionError, rex.TimeoutError))


@pytest.mark.parametrize("error", NOT_CONNECTION_FAILURES)
def test_other_errors_are_not_connection_failures(error: BaseException) -> None:
    assert not is_connection_failure(error, (rex.ConnectionError, rex.TimeoutError))


@pytest.mark.parametrize("error", CONNECTION_FAILURES)
def test_the_redis_broker_maps_connection_failures_to_connection_lost(
        error: BaseException) -> None:
    with pytest.raises(ConnectionLost, match="may be retried") as caught, _mapped("fetching"):
        raise error
    assert caught.value.__cause__ is error


def test_the_redis_broker_keeps_other_errors_apart() -> None:
    with pytest.raises(BrokerError, match="replied with an error") as caught, _mapped("x"):
        raise rex.ResponseError("ERR unknown command")
    assert not isinstance(caught.value, ConnectionLost)
    with pytest.raises(ConnectionFailed, match="credentials"), _mapped("x"):
        raise rex.AuthenticationError("invalid password")
    with pytest.raises(RuntimeError, match="dictionary"), _mapped("x"):
        raise RuntimeError("dictionary changed size during iteration")  # a bug stays a bug


@pytest.mark.parametrize("error", CONNECTION_FAILURES)
def test_the_redis_result_store_maps_connection_failures_to_unavailable(
        error: BaseException) -> None:
    store = RedisResultStore("redis://127.0.0.1:1/0")
    with pytest.raises(ResultStoreUnavailable, match="can be retried"), store._errors("store"):
        raise error


def test_the_redis_result_store_keeps_other_errors_apart() -> None:
    store = RedisResultStore("redis://127.0.0.1:1/0")
    with pytest.raises(ResultError) as caught, store._errors("store"):
        raise rex.ResponseError("ERR unknown command")
    assert not isinstance(caught.value, ResultStoreUnavailable)
    with pytest.raises(RuntimeError, match="dictionary"), store._errors("store"):
        raise RuntimeError("dictionary changed size during iteration")
