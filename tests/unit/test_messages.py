"""Wire structs: states, versioning, forward compatibility."""

from __future__ import annotations

import msgspec
import pytest

from runtime.codec import Codec
from runtime.messages import (
    VERSION,
    ChainNode,
    ChordRef,
    ErrorInfo,
    GroupNode,
    Node,
    Result,
    SigNode,
    State,
    TaskMessage,
    TaskOptions,
)


def test_terminal_states() -> None:
    assert {s for s in State if s.terminal} == {State.SUCCESS, State.FAILURE, State.REVOKED}
    assert not State.PENDING.terminal
    assert not State.STARTED.terminal
    assert not State.RETRY.terminal


def test_states_are_strings_on_the_wire() -> None:
    assert State.SUCCESS == "SUCCESS"
    assert msgspec.json.encode(State.RETRY) == b'"RETRY"'


def test_messages_carry_a_version() -> None:
    assert VERSION == 1
    assert TaskMessage.__struct_config__.tag_field == "v"
    assert TaskMessage.__struct_config__.tag == VERSION
    assert Result.__struct_config__.tag == VERSION


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_the_version_is_on_the_wire(fmt: str) -> None:
    encoder = msgspec.json if fmt == "json" else msgspec.msgpack
    raw = encoder.decode(encoder.encode(TaskMessage(id="a", task="t")))
    assert raw["v"] == VERSION
    raw = encoder.decode(encoder.encode(Result(id="a", state=State.SUCCESS)))
    assert raw["v"] == VERSION


def test_a_newer_version_is_refused() -> None:
    from runtime.errors import DecodeError

    with pytest.raises(DecodeError, match="unsupported message version") as info:
        Codec().decode(b'{"id": "a", "task": "t", "v": 2}', {"ct": "json"})
    assert info.value.reason == "decode_error"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = (b'{"id": "a", "task": "t", "args": [1], "added_in_v1_5": {"x": 1},'
            b' "links": [{"type": "sig", "id": "b", "task": "u", "new_field": 7}],'
            b' "chord": {"id": "c", "index": 0, "size": 1, "shiny": true}}')
    msg = Codec().decode(body, {"ct": "json"})
    assert msg.args == [1]
    assert msg.links == [SigNode(id="b", task="u")]
    assert msg.chord == ChordRef(id="c", index=0, size=1)
    result = msgspec.json.decode(b'{"id": "a", "state": "SUCCESS", "value": 3, "later": 1}', type=Result)
    assert result.value == 3


def test_nodes_are_a_tagged_union() -> None:
    tree: Node = ChainNode(id="c", steps=[
        SigNode(id="s", task="t", args=[1], options=TaskOptions(priority=2)),
        GroupNode(id="g", members=[SigNode(id="m", task="t")]),
    ])
    raw = msgspec.json.encode(tree)
    assert b'"type":"chain"' in raw
    assert msgspec.json.decode(raw, type=Node) == tree
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(tree), type=Node) == tree
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"type": "bogus", "id": "x"}', type=Node)


def test_decoding_is_strict() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id": "a", "task": "t", "priority": "3"}', type=TaskMessage)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"id": "a", "state": "DONE"}', type=Result)


def test_structs_are_frozen() -> None:
    msg = TaskMessage(id="a", task="t")
    with pytest.raises(AttributeError):
        msg.id = "b"  # type: ignore[misc]
    assert msgspec.structs.replace(msg, attempt=2).attempt == 2
    assert msg.attempt == 1


def test_defaults_are_not_shared_between_instances() -> None:
    a, b = TaskMessage(id="a", task="t"), TaskMessage(id="b", task="t")
    a.args.append(1)
    a.headers["k"] = "v"
    assert b.args == []
    assert b.headers == {}


def test_result_and_error_info_round_trip() -> None:
    result = Result(id="a", state=State.FAILURE, task="t",
                    error=ErrorInfo(type="builtins.ValueError", message="bad", traceback="tb",
                                    reason="failed"),
                    attempt=3, delivery_count=2, worker="w", started_ms=1, finished_ms=2)
    for codec in (msgspec.json, msgspec.msgpack):
        assert codec.decode(codec.encode(result), type=Result) == result
