"""A bad broker or result-store URL is refused when the runtime is built, with the
library's own ``ConfigError`` (a ``TaskloomError`` and a ``ValueError``) that
names the URL (password redacted) and what is accepted: never a bare
``ValueError`` from an option parser, nor redis-py's ``TypeError`` at connect
for a query parameter nobody reads (issue 20, item 1)."""

from __future__ import annotations

import pytest

from runtime import Runtime, TaskloomError
from runtime.errors import ConfigError

BAD_BROKER_URLS = [
    # (url, a phrase the message must carry)
    ("amqp://guest:guest@10.1.2.3/", "refusing the default 'guest' user"),
    ("amqp://app:s3cret@127.0.0.1/?delivery_limit=3", "delivery_limit needs queue_type=quorum"),
    ("amqp://app:s3cret@127.0.0.1/?prefetch=abc", "unknown AMQP broker option 'prefetch'"),
    ("redis://:s3cret@127.0.0.1/?lease_s=soon", "invalid Redis broker option"),
    ("redis://:s3cret@127.0.0.1/?bogus=1", "unexpected keyword argument 'bogus'"),
    ("redis://:s3cret@127.0.0.1/?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
]


@pytest.mark.parametrize(("url", "phrase"), BAD_BROKER_URLS)
def test_a_bad_broker_url_is_a_config_error(url: str, phrase: str) -> None:
    try:
        Runtime(broker=url)
    except ConfigError as e:
        text = str(e)
    else:
        pytest.fail(f"Runtime(broker={url!r}) was accepted")
    assert phrase in text
    assert "s3cret" not in text


@pytest.mark.parametrize(("url", "phrase"), BAD_BROKER_URLS)
def test_a_bad_broker_url_is_caught_as_taskloom_error(url: str, phrase: str) -> None:
    try:
        Runtime(broker=url)
    except TaskloomError as e:
        assert phrase in str(e)
    else:
        pytest.fail(f"Runtime(broker={url!r}) was accepted")


def test_a_redis_py_option_nobody_knows_on_the_results_url_is_a_config_error() -> None:
    try:
        Runtime(broker="memory://", results="redis://:s3cret@127.0.0.1/?bogus=2")
    except ConfigError as e:
        text = str(e)
    else:
        pytest.fail("an unknown results URL parameter was accepted")
    assert "'bogus'" in text
    assert "ttl_s" in text  # the store's own parameters are listed
    assert "s3cret" not in text


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1/0?socket_timeout=3&health_check_interval=5&client_name=app",
    "rediss://127.0.0.1/0?ssl_cert_reqs=none&lease_s=10",
    "unix:///tmp/redis.sock?db=2&block_s=1",
])
def test_redis_py_options_still_pass(url: str) -> None:
    Runtime(broker=url)
    Runtime(broker="memory://", results=url.replace("&lease_s=10", "").replace("&block_s=1", ""))


def test_a_bad_results_parameter_is_a_config_error_without_the_password() -> None:
    try:
        Runtime(broker="memory://", results="redis://:s3cret@127.0.0.1/?ttl_s=soon")
    except ConfigError as e:
        text = str(e)
    else:
        pytest.fail("ttl_s=soon was accepted")
    assert "ttl_s=soon" in text
    assert "s3cret" not in text
