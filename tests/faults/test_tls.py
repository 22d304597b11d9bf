"""TLS to Redis (issue 19 item 3, RELIABILITY.md row S): a redis-server the test
starts on a TLS-only port, with a CA, server and client certificates the test
generates (``openssl`` CLI, no extra Python dependency).

- ``rediss://…?ssl_ca_certs=<ca>``: the server is verified (redis-py verifies by
  default, hostname included: the server certificate names IP 127.0.0.1), and a
  full enqueue -> worker -> result round trip works, broker and results;
- a client that trusts another CA fails with a clear error that names the URL
  with its password redacted;
- mTLS: the server requires a client certificate (``--tls-auth-clients yes``);
  with ``ssl_certfile``/``ssl_keyfile`` in the URL the round trip works, without
  them it fails clearly.

The URL parameters are redis-py's own (``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``): the Redis broker
and result store hand every query parameter they do not know to redis-py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import redis
import structlog

from runtime import Runtime, TaskloomError
from tests.conftest import REDIS_URL, require_tool
from tests.faults.harness import HarnessError, TlsRabbitNode, free_port, tail

pytestmark = [pytest.mark.redis, pytest.mark.fault, pytest.mark.timeout(120)]

PASSWORD = "s3cret-tls-pass"
log = structlog.get_logger("tests.tls")


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise HarnessError(f"openssl {' '.join(map(str, args))} failed: "
                           f"{done.stderr.decode(errors='replace')}")


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             f"/CN=taskloom test {name}", "-keyout", key, "-out", cert, cwd=d)
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key,
             "-out", csr, cwd=d)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-days", "2", "-extfile", d / f"{name}.ext", "-out", cert, cwd=d)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("openssl", "apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    other = _ca(d, "other-ca")
    server = _leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "extendedKeyUsage=serverAuth\n")
    client = _leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    return Pki(d, ca[0], server[0], server[1], client[0], client[1], other[0])


@pytest.fixture(scope="module")
def tls_rabbit(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsRabbitNode]:
    """One RabbitMQ node with an SSL listener for the module (startup ~5-10 s)."""
    node = TlsRabbitNode(tmp_path_factory.mktemp("rabbit-tls"), cacert=pki.ca,
                         cert=pki.server_cert, key=pki.server_key)
    node.start()
    try:
        yield node
    finally:
        node.close()


class TlsRedis:
    """A redis-server of the test listening on a TLS port only."""

    def __init__(self, root: Path, pki: Pki, *, auth_clients: bool) -> None:
        self.dir = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "redis.log"
        cmd = ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
               "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
               "--tls-ca-cert-file", str(pki.ca),
               "--tls-auth-clients", "yes" if auth_clients else "no",
               "--requirepass", PASSWORD, "--dir", str(root), "--save", "",
               "--appendonly", "no", "--logfile", str(self.log)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, ssl=True,
                             ssl_ca_certs=str(pki.ca), ssl_certfile=str(pki.client_cert),
                             ssl_keyfile=str(pki.client_key), socket_connect_timeout=1)
        try:
            with anyio.from_thread.start_blocking_portal() as portal:
                portal.call(self._wait_ready, client)
        finally:
            client.close()

    async def _wait_ready(self, client: redis.Redis) -> None:
        """Until it answers PING over TLS (polls a starting server, bounded)."""
        try:
            with anyio.fail_after(15):
                while True:
                    if self.proc.poll() is not None:
                        raise HarnessError(f"redis-server exited with {self.proc.returncode} on "
                                           f"start (a build without TLS?):\n{tail(self.log)}")
                    try:
                        if await anyio.to_thread.run_sync(client.ping):
                            return
                    except redis.exceptions.ConnectionError:
                        pass
                    await anyio.sleep(0.05)
        except TimeoutError:
            raise HarnessError(f"TLS redis-server did not answer within 15 s:\n"
                               f"{tail(self.log)}") from None

    def url(self, **params: str | Path) -> str:
        query = urlencode({k: str(v) for k, v in params.items()})
        return f"rediss://:{PASSWORD}@127.0.0.1:{self.port}/0?{query}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "redis-tls", pki, auth_clients=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mtls_redis(tmp_path: Path, pki: Pki) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path / "redis-mtls", pki, auth_clients=True)
    try:
        yield server
    finally:
        server.close()


def build(url: str, namespace: str, results: str | None = None) -> Runtime:
    rt = Runtime(broker=url, results=results or url, namespace=namespace)

    @rt.task(name="tls.add")
    async def add(x: int, y: int) -> int:
        return x + y

    return rt


async def round_trip(url: str, namespace: str, results: str | None = None) -> None:
    rt = build(url, namespace, results)
    with anyio.fail_after(60):
        async with rt, rt.worker(concurrency=4):
            assert await rt.run(rt.signature("tls.add", 2, 3), timeout=30) == 5
            handle = await rt.enqueue(rt.signature("tls.add", 40, 2))
            assert await handle.result(timeout=30) == 42


async def refused(url: str, namespace: str, results: str | None = None,
                  password: str = PASSWORD) -> str:
    """The error message of a runtime that cannot connect to ``url``."""
    rt = build(url, namespace, results)
    with anyio.fail_after(60), pytest.raises((TaskloomError, OSError)) as caught:
        async with rt:
            await rt.run(rt.signature("tls.add", 1, 1), timeout=10)
    message = f"{type(caught.value).__name__}: {caught.value}"
    assert password not in message, message
    log.info("tls.refused", message=message)
    return message


async def test_rediss_round_trip_with_the_servers_ca(tls_redis: TlsRedis, pki: Pki,
                                                     namespace: str) -> None:
    await round_trip(tls_redis.url(ssl_ca_certs=pki.ca), namespace)


async def test_rediss_with_a_wrong_ca_fails_clearly_with_the_password_redacted(
    tls_redis: TlsRedis, pki: Pki, namespace: str,
) -> None:
    message = await refused(tls_redis.url(ssl_ca_certs=pki.other_ca), namespace)
    assert f"127.0.0.1:{tls_redis.port}" in message, message
    assert "certificate" in message.lower(), message


async def test_mtls_round_trip_with_a_client_certificate(mtls_redis: TlsRedis, pki: Pki,
                                                         namespace: str) -> None:
    await round_trip(mtls_redis.url(ssl_ca_certs=pki.ca, ssl_certfile=pki.client_cert,
                                    ssl_keyfile=pki.client_key), namespace)


async def test_mtls_without_a_client_certificate_fails_clearly(mtls_redis: TlsRedis, pki: Pki,
                                                               namespace: str) -> None:
    message = await refused(mtls_redis.url(ssl_ca_certs=pki.ca), namespace)
    assert f"127.0.0.1:{mtls_redis.port}" in message, message


# -- RabbitMQ -----------------------------------------------------------------------------
# Results go to the shared Redis under the test's namespace; the broker is the
# test's node, reached over its SSL listener only. aio-pika's TLS parameters
# (cafile, certfile, keyfile) pass through the broker URL.


@pytest.mark.amqp
async def test_amqps_round_trip_with_the_servers_ca(tls_rabbit: TlsRabbitNode, pki: Pki,
                                                    namespace: str) -> None:
    await round_trip(tls_rabbit.tls_url(urlencode({"cafile": pki.ca})), namespace, REDIS_URL)


@pytest.mark.amqp
async def test_amqps_mtls_round_trip_with_a_client_certificate(
    tls_rabbit: TlsRabbitNode, pki: Pki, namespace: str,
) -> None:
    query = urlencode({"cafile": pki.ca, "certfile": pki.client_cert, "keyfile": pki.client_key})
    await round_trip(tls_rabbit.tls_url(query), namespace, REDIS_URL)


@pytest.mark.amqp
async def test_amqps_with_a_wrong_ca_fails_clearly_with_the_password_redacted(
    tls_rabbit: TlsRabbitNode, pki: Pki, namespace: str,
) -> None:
    url = tls_rabbit.tls_url(urlencode({"cafile": pki.other_ca}))
    message = await refused(url, namespace, REDIS_URL, password="guest:guest")
    assert f"127.0.0.1:{tls_rabbit.ssl_port}" in message, message
