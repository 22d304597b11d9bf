"""Runtime() reads its per-deployment settings from TASKLOOM_* variables when
they are not given in code; explicit arguments win; bad values name the
variable. A broker that cannot carry results is refused without a result store."""

from __future__ import annotations

import anyio
import pytest

from runtime import ConfigError, Runtime, run
from runtime.config import VARIABLES
from tests.conftest import AMQP_URL, REDIS_URL
from tests.runtime.helpers import LIMIT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test with none of the variables set."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_defaults_without_any_variable() -> None:
    rt = Runtime()
    assert type(rt.broker).__name__ == "MemoryBroker"
    assert type(rt.results).__name__ == "MemoryResultStore"
    assert (rt.namespace, rt.default_queue, rt.codec.format) == ("", "default", "json")
    assert rt.result_timeout_s == 300.0


def test_every_setting_comes_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_BROKER_URL", "redis://127.0.0.1:6379/0?lease_s=7")
    monkeypatch.setenv("TASKLOOM_RESULTS_URL", "redis://127.0.0.1:6379/1")
    monkeypatch.setenv("TASKLOOM_NAMESPACE", "envns")
    monkeypatch.setenv("TASKLOOM_DEFAULT_QUEUE", "jobs")
    monkeypatch.setenv("TASKLOOM_CODEC", "msgpack")
    monkeypatch.setenv("TASKLOOM_MAX_MESSAGE_BYTES", "65536")
    monkeypatch.setenv("TASKLOOM_RESULT_TTL_S", "60")
    monkeypatch.setenv("TASKLOOM_RESULT_TIMEOUT_S", "2.5")
    rt = Runtime()  # nothing connects until `async with rt`
    assert type(rt.broker).__name__ == "RedisBroker"
    assert rt.broker.namespace == "envns"  # type: ignore[attr-defined]
    assert type(rt.results).__name__ == "RedisResultStore"
    assert rt.results.url.endswith("/1")  # type: ignore[attr-defined]
    assert rt.namespace == "envns"
    assert rt.default_queue == "jobs"
    assert rt.codec.format == "msgpack"
    assert rt.codec.max_message_bytes == 65536
    assert rt.results.ttl_s == 60.0  # type: ignore[attr-defined]
    assert rt.result_timeout_s == 2.5

    @rt.task
    async def job() -> None: ...

    assert job.queue == "jobs"


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TASKLOOM_RESULTS_URL", "redis://127.0.0.1:6379/1")
    monkeypatch.setenv("TASKLOOM_NAMESPACE", "envns")
    monkeypatch.setenv("TASKLOOM_DEFAULT_QUEUE", "jobs")
    monkeypatch.setenv("TASKLOOM_CODEC", "msgpack")
    monkeypatch.setenv("TASKLOOM_RESULT_TIMEOUT_S", "2.5")
    rt = Runtime(broker="memory://", results="memory://", namespace="", default_queue="q",
                 codec="json", result_timeout_s=9.0)
    assert type(rt.broker).__name__ == "MemoryBroker"
    assert type(rt.results).__name__ == "MemoryResultStore"
    assert (rt.namespace, rt.default_queue, rt.codec.format, rt.result_timeout_s) == (
        "", "q", "json", 9.0)


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_BROKER_URL", "")
    monkeypatch.setenv("TASKLOOM_RESULT_TIMEOUT_S", "  ")
    rt = Runtime()
    assert type(rt.broker).__name__ == "MemoryBroker"
    assert rt.result_timeout_s == 300.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TASKLOOM_BROKER_URL", "localhost:6379"),
        ("TASKLOOM_RESULTS_URL", "127.0.0.1"),
        ("TASKLOOM_CODEC", "pickle"),
        ("TASKLOOM_MAX_MESSAGE_BYTES", "1MB"),
        ("TASKLOOM_MAX_MESSAGE_BYTES", "-5"),
        ("TASKLOOM_RESULT_TTL_S", "a day"),
        ("TASKLOOM_RESULT_TTL_S", "0"),
        ("TASKLOOM_RESULT_TIMEOUT_S", "nan"),
        ("TASKLOOM_RESULT_TIMEOUT_S", "inf"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Runtime()
    message = str(info.value)
    assert name in message
    assert repr(value) in message
    assert f"{VARIABLES[name]}=" in message  # what to do instead


def test_a_bad_value_is_ignored_when_the_argument_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_RESULT_TIMEOUT_S", "soon")
    assert Runtime(result_timeout_s=1.0).result_timeout_s == 1.0


@pytest.mark.redis
async def test_a_runtime_configured_only_by_the_environment_runs_on_redis(
    monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    monkeypatch.setenv("TASKLOOM_BROKER_URL", REDIS_URL)
    monkeypatch.setenv("TASKLOOM_NAMESPACE", namespace)
    rt = Runtime()

    @rt.task
    async def add(x: int, y: int) -> int:
        return x + y

    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                assert await run(add.s(1, 2)) == 3
    finally:
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]


# -- results that cannot reach the caller ------------------------------------------------


def test_rabbitmq_without_a_result_store_is_refused_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Runtime(broker=AMQP_URL)
    message = str(info.value)
    assert 'results="redis://' in message
    assert "TASKLOOM_RESULTS_URL" in message


def test_rabbitmq_instance_without_a_result_store_is_refused_too() -> None:
    from brokers.amqp import AmqpBroker

    with pytest.raises(ConfigError, match='results="redis://'):
        Runtime(broker=AmqpBroker.from_url(AMQP_URL))


def test_rabbitmq_with_a_result_store_from_code_or_environment_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert type(Runtime(broker=AMQP_URL, results=REDIS_URL).results).__name__ == "RedisResultStore"
    # memory results, chosen explicitly: every caller runs in the worker's process
    assert type(Runtime(broker=AMQP_URL, results="memory://").results).__name__ == "MemoryResultStore"
    monkeypatch.setenv("TASKLOOM_RESULTS_URL", REDIS_URL)
    assert type(Runtime(broker=AMQP_URL).results).__name__ == "RedisResultStore"


def test_a_redis_broker_instance_keeps_results_in_its_own_redis() -> None:
    from brokers.redis import RedisBroker

    rt = Runtime(broker=RedisBroker.from_url(REDIS_URL + "?lease_s=3", namespace="ns1"),
                 namespace="ns1")
    assert type(rt.results).__name__ == "RedisResultStore"
