"""Rates and task limits are parsed and validated with errors that say what to write."""

from __future__ import annotations

from datetime import timedelta

import pytest

from runtime.errors import ConfigError
from runtime.ops.limits import Limits, key_value, parse_rate


@pytest.mark.parametrize(("text", "count", "period", "burst"), [
    ("20/s", 20, 1.0, 2), ("5/m", 5, 60.0, 1), ("100/h", 100, 3600.0, 10),
    ("20/s:burst=5", 20, 1.0, 5), (" 3 / 10s ", 3, 10.0, 1), ("1/d", 1, 86400.0, 1),
])
def test_rates_parse(text: str, count: int, period: float, burst: int) -> None:
    r = parse_rate(text)
    assert (r.count, r.period_s, r.burst) == (count, period, burst)
    assert parse_rate(str(r)) == r  # the text form round-trips


@pytest.mark.parametrize("text", ["20", "20/x", "0/s", "-1/s", "a/s", "20/s:burst=0", ""])
def test_bad_rates_say_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError, match=r"rate|count|burst"):
        parse_rate(text)


def test_a_rate_that_is_not_text_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a string like '20/s'"):
        parse_rate(20)  # type: ignore[arg-type]


async def send_email(user_id: str, body: str, lang: str = "en") -> None: ...


def test_limits_validate_options_against_the_function() -> None:
    lim = Limits.of(task="send", rate_limit="5/m", rate_key="user_id", fn=send_email)
    assert lim is not None and lim.rate is not None and lim.rate.count == 5
    assert Limits.of(task="send") is None
    with pytest.raises(ConfigError, match="names no argument"):
        Limits.of(task="send", rate_limit="5/m", rate_key="user", fn=send_email)
    with pytest.raises(ConfigError, match="without the limit it keys"):
        Limits.of(task="send", concurrency_key="user_id")
    with pytest.raises(ConfigError, match="at least 1"):
        Limits.of(task="send", concurrency_limit=0)
    with pytest.raises(ConfigError, match="choose one"):
        Limits.of(task="send", unique_for=5, debounce=timedelta(seconds=2))
    with pytest.raises(ConfigError, match="positive"):
        Limits.of(task="send", debounce=timedelta(0))
    with pytest.raises(ConfigError, match="without rate_limit"):
        Limits.of(task="send", burst=3)


def test_keys_come_from_the_arguments_or_a_callable() -> None:
    assert key_value(None, send_email, ["u1", "hi"], {}) == ""
    assert key_value("user_id", send_email, ["u1", "hi"], {}) == "u1"
    assert key_value("user_id", send_email, [], {"user_id": "u2", "body": "x"}) == "u2"
    assert key_value("lang", send_email, ["u1", "hi"], {}) == "en"  # the default applies
    assert key_value(lambda user_id, body: user_id[:1], send_email, ["u1", "hi"], {}) == "u"
    assert key_value("user_id", send_email, [7, "hi"], {}) == "7"
