"""The broker URL: options, vhost, default credentials (no server needed)."""

from __future__ import annotations

import pytest

from brokers.amqp import DELAY_LEVELS, AmqpBroker
from brokers.amqp._aiormq import Acks as _Acks
from brokers.amqp.topology import routing_key as _routing_key
from brokers.amqp.topology import ticks as _ticks


def test_options_come_from_the_query_string() -> None:
    broker = AmqpBroker.from_url(
        "amqp://u:p@127.0.0.1:5672/?queue_type=quorum&delivery_limit=5&heartbeat=15"
        "&consumer_timeout_s=600&publish_timeout_s=3")
    assert broker.options.queue_type == "quorum"
    assert broker.delivery_limit == 5
    assert broker.options.heartbeat == 15
    assert broker.capabilities.consumer_timeout_s == 600
    assert broker.capabilities.max_priority == 0  # quorum queues have none on 3.x
    assert "queue_type" not in broker.url and "heartbeat" not in broker.url


def test_defaults_are_classic_with_priorities_and_rabbitmq_consumer_timeout() -> None:
    broker = AmqpBroker.from_url("amqp://u:p@127.0.0.1/")
    assert broker.options.queue_type == "classic"
    assert broker.capabilities.max_priority == 9
    assert broker.capabilities.consumer_timeout_s == 1800
    assert broker.delivery_limit is None
    assert AmqpBroker.from_url("amqp://u:p@127.0.0.1/?queue_type=quorum").delivery_limit == 10


@pytest.mark.parametrize(("query", "match"), [
    ("queue_typ=quorum", "unknown AMQP broker option 'queue_typ'"),
    ("queue_type=stream", "queue_type"),
    ("delivery_limit=3", "needs queue_type=quorum"),
    ("delivery_limit=0", "delivery_limit"),
    ("heartbeat=soon", "heartbeat"),
])
def test_bad_options_are_refused_clearly(query: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AmqpBroker.from_url(f"amqp://u:p@127.0.0.1/?{query}")


@pytest.mark.parametrize(("url", "vhost"), [
    ("amqp://u:p@127.0.0.1", "/"),
    ("amqp://u:p@127.0.0.1/", "/"),
    ("amqp://u:p@127.0.0.1/swarm-a", "swarm-a"),
    ("amqp://u:p@127.0.0.1/%2F", "/"),
    ("amqp://u:p@127.0.0.1/team%2Fprod?heartbeat=5", "team/prod"),
])
def test_the_vhost_is_the_url_path(url: str, vhost: str) -> None:
    assert AmqpBroker.from_url(url).vhost == vhost


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@rabbit.example.com/",
    "amqp://guest:secret@10.1.2.3:5672/",
    "amqp://rabbit.example.com/",  # no user: aio-pika would log in as guest:guest
    "amqps://guest:guest@[2001:db8::1]/",
])
def test_guest_towards_a_remote_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="refusing the default 'guest' user"):
        AmqpBroker.from_url(url)


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@127.0.0.1/",
    "amqp://guest:guest@localhost:5672/",
    "amqp://guest:guest@[::1]/",
    "amqp://app:secret@rabbit.example.com/",
    "amqp://guest:guest@rabbit.example.com/?allow_guest=true",
])
def test_guest_on_loopback_or_a_real_user_is_fine(url: str) -> None:
    assert AmqpBroker.from_url(url).vhost == "/"


def test_password_is_not_shown_in_errors() -> None:
    with pytest.raises(ValueError) as caught:
        AmqpBroker.from_url("amqp://app:hunter2@127.0.0.1/?nope=1")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("name", ["", "a*b", "a.#", "jobs.dlq", "jobs.delay.03"])
def test_reserved_or_invalid_queue_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        AmqpBroker.from_url("amqp://u:p@127.0.0.1/")._queue(name)


def test_delays_round_up_to_whole_ticks() -> None:
    assert [_ticks(d) for d in (0.01, 0.1, 0.3, 0.31, 1.5, 60.0)] == [1, 1, 3, 4, 15, 600]


def test_routing_key_carries_the_tick_bits_then_the_queue() -> None:
    q = AmqpBroker.from_url("amqp://u:p@127.0.0.1/", namespace="ns")._queue("jobs")
    words = _routing_key(5, q).split(".")
    assert words[:DELAY_LEVELS] == ["0"] * (DELAY_LEVELS - 3) + ["1", "0", "1"]
    assert words[DELAY_LEVELS:] == ["ns", "jobs"]


class _FakeChannel:
    pass


def _acks(*tags: int, acks: _Acks | None = None) -> tuple[_Acks, list[tuple[int, bool]]]:
    acks = acks or _Acks(_FakeChannel())  # type: ignore[arg-type]
    acks.pending.extend(tags)
    return acks, [(f.delivery_tag, f.multiple) for f in acks.frames()]


def test_acks_in_order_become_one_multiple_ack() -> None:
    acks, frames = _acks(1, 2, 3, 4)
    assert frames == [(4, True)]
    _, frames = _acks(5, acks=acks)
    assert frames == [(5, True)]


def test_acks_above_a_gap_go_one_by_one_and_a_multiple_ack_never_names_them() -> None:
    acks, frames = _acks(1, 3, 4)  # 2 is still held
    assert frames == [(1, True), (3, False), (4, False)]
    # 2 closes the gap: 3 and 4 are acked already, so the multiple ack names 2 itself
    # (RabbitMQ closes the channel on a multiple ack of an unknown tag).
    acks, frames = _acks(2, acks=acks)
    assert frames == [(2, True)]
    assert acks.upto == 4 and not acks.sent
    _, frames = _acks(6, 5, acks=acks)
    assert frames == [(6, True)]
