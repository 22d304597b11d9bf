"""Codec: messages to bytes and back (json/msgpack, zlib, HMAC, size limit)."""

from __future__ import annotations

import pickle
import zlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.codec import Codec
from runtime.errors import ConfigError, DecodeError, EncodeError, PayloadTooLarge
from runtime.messages import ChainNode, ChordRef, ErrorInfo, GroupNode, SigNode, TaskMessage, TaskOptions

KEYS = {"k1": b"secret-one", "k2": b"secret-two"}

# -- strategies -----------------------------------------------------------------------

_ids = st.text(min_size=1, max_size=20)
_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_scalars = st.none() | st.booleans() | _int64 | _floats | st.text(max_size=30)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_options = st.builds(
    TaskOptions,
    queue=st.none() | st.text(min_size=1, max_size=8),
    priority=st.none() | st.integers(0, 9),
    countdown=st.none() | st.floats(0, 1e6),
    retries=st.none() | st.integers(0, 10),
)
_sig_nodes = st.builds(
    SigNode,
    id=_ids,
    task=_ids,
    args=st.lists(_json_values, max_size=3),
    kwargs=st.dictionaries(st.text(min_size=1, max_size=8), _json_values, max_size=3),
    immutable=st.booleans(),
    options=_options,
)
_nodes = st.recursive(
    _sig_nodes,
    lambda inner: st.builds(GroupNode, id=_ids, members=st.lists(inner, min_size=1, max_size=3))
    | st.builds(ChainNode, id=_ids, steps=st.lists(inner, min_size=1, max_size=3)),
    max_leaves=6,
)
_chord_refs = st.builds(
    ChordRef,
    id=_ids,
    index=st.integers(0, 100),
    size=st.integers(1, 101),
    body=st.none() | _sig_nodes,
    links=st.lists(_nodes, max_size=2),
)
messages = st.builds(
    TaskMessage,
    id=_ids,
    task=_ids,
    args=st.lists(_json_values, max_size=5),
    kwargs=st.dictionaries(st.text(min_size=1, max_size=10), _json_values, max_size=4),
    queue=st.text(min_size=1, max_size=10),
    priority=st.integers(0, 9),
    attempt=st.integers(1, 100),
    eta_ms=st.none() | st.integers(0, 2**50),
    expires_ms=st.none() | st.integers(0, 2**50),
    retries=st.none() | st.integers(0, 100),
    timeout=st.none() | st.floats(0.001, 1e6),
    parent_id=st.none() | _ids,
    root_id=st.none() | _ids,
    links=st.lists(_nodes, max_size=2),
    errbacks=st.lists(_sig_nodes, max_size=2),
    chord=st.none() | _chord_refs,
    downstream=st.lists(_ids, max_size=3),
    once=st.booleans(),
    headers=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)

CODECS = {
    "json": dict(format="json"),
    "msgpack": dict(format="msgpack"),
    "json+zlib": dict(format="json", compress_over=0),
    "msgpack+zlib": dict(format="msgpack", compress_over=0),
    "json+signed": dict(format="json", signing_keys=KEYS, signing_key_id="k2"),
    "msgpack+zlib+signed": dict(format="msgpack", compress_over=0, signing_keys=KEYS),
}


def make_codec(**kw: Any) -> Codec:
    kw.setdefault("max_message_bytes", 16 * 1024 * 1024)
    return Codec(**kw)


def _msg(**kw: Any) -> TaskMessage:
    kw.setdefault("id", "m1")
    kw.setdefault("task", "mod.add")
    return TaskMessage(**kw)


# -- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CODECS))
@settings(max_examples=30, deadline=None)
@given(message=messages)
def test_round_trip(kind: str, message: TaskMessage) -> None:
    codec = make_codec(**CODECS[kind])
    body, headers = codec.encode(message)
    assert codec.decode(body, headers) == message


@given(message=messages)
@settings(max_examples=20, deadline=None)
def test_any_codec_decodes_what_another_encoded(message: TaskMessage) -> None:
    """The content type travels in the headers, so a json worker reads msgpack and back."""
    for producer, consumer in (("json", "msgpack"), ("msgpack", "json")):
        body, headers = make_codec(format=producer, compress_over=0).encode(message)
        assert make_codec(format=consumer).decode(body, headers) == message


def test_headers_say_how_the_body_was_made() -> None:
    plain = Codec("msgpack")
    _, headers = plain.encode(_msg())
    assert headers == {"ct": "msgpack"}

    zipped = Codec("json", compress_over=50)
    body, headers = zipped.encode(_msg(args=["x" * 100]))
    assert headers["ce"] == "zlib"
    assert zlib.decompress(body).startswith(b"{")

    small_body, small_headers = zipped.encode(_msg())
    assert "ce" not in small_headers
    assert small_body.startswith(b"{")

    signed = Codec("json", signing_keys=KEYS, signing_key_id="k1")
    _, headers = signed.encode(_msg())
    assert headers["kid"] == "k1"
    assert len(headers["sig"]) == 64
    assert signed.signs
    assert not plain.signs


def test_first_key_signs_when_no_key_id_is_given() -> None:
    _, headers = Codec(signing_keys=KEYS).encode(_msg())
    assert headers["kid"] == "k1"


def test_rotated_keys_still_verify_older_messages() -> None:
    old = Codec(signing_keys={"k1": KEYS["k1"]})
    new = Codec(signing_keys=KEYS, signing_key_id="k2")
    body, headers = old.encode(_msg(args=[1]))
    assert new.decode(body, headers).args == [1]


def test_returned_headers_are_not_shared_between_messages() -> None:
    codec = Codec()
    _, first = codec.encode(_msg())
    first["x-trace"] = "abc"
    _, second = codec.encode(_msg())
    assert "x-trace" not in second


# -- signatures -------------------------------------------------------------------------


def _signed() -> tuple[Codec, bytes, dict[str, str]]:
    codec = Codec(signing_keys=KEYS, signing_key_id="k1")
    body, headers = codec.encode(_msg(args=[1, 2]))
    return codec, body, headers


def _reason(codec: Codec, body: bytes, headers: dict[str, str]) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(body, headers)
    return info.value.reason


def test_a_tampered_body_has_a_bad_signature() -> None:
    codec, body, headers = _signed()
    tampered = body.replace(b"[1,2]", b"[1,3]")
    assert tampered != body
    assert _reason(codec, tampered, headers) == "bad_signature"


def test_every_single_flipped_byte_is_caught() -> None:
    codec, body, headers = _signed()
    for i in range(len(body)):
        flipped = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
        assert _reason(codec, flipped, headers) == "bad_signature"


def test_a_signature_made_with_another_key_is_bad() -> None:
    codec, body, headers = _signed()
    assert _reason(codec, body, {**headers, "kid": "k2"}) == "bad_signature"


def test_an_unknown_key_id_is_a_bad_signature() -> None:
    codec, body, headers = _signed()
    with pytest.raises(DecodeError, match="unknown signing key id 'k9'") as info:
        codec.decode(body, {**headers, "kid": "k9"})
    assert info.value.reason == "bad_signature"


def test_an_unsigned_message_is_refused_when_keys_are_configured() -> None:
    codec = Codec(signing_keys=KEYS)
    body, headers = Codec().encode(_msg())
    assert _reason(codec, body, headers) == "bad_signature"
    signed_body, signed_headers = codec.encode(_msg())
    no_sig = {k: v for k, v in signed_headers.items() if k != "sig"}
    assert _reason(codec, signed_body, no_sig) == "bad_signature"


def test_a_replayed_signature_over_another_body_is_bad() -> None:
    codec = Codec(signing_keys=KEYS)
    _, headers_a = codec.encode(_msg(args=[1]))
    body_b, _ = codec.encode(_msg(args=[2]))
    assert _reason(codec, body_b, headers_a) == "bad_signature"


def test_signature_is_checked_before_the_body_is_parsed() -> None:
    """Garbage with a missing signature is a signature problem, not a parse attempt."""
    codec = Codec(signing_keys=KEYS)
    assert _reason(codec, b"\x80garbage", {"ct": "json"}) == "bad_signature"


# -- size limits ------------------------------------------------------------------------


def test_oversize_is_refused_before_anything_else() -> None:
    codec = Codec(max_message_bytes=100, signing_keys=KEYS)
    # no signature, not JSON, unknown content type: the size is what is reported
    assert _reason(codec, b"\xff" * 101, {"ct": "pickle"}) == "too_large"
    body, headers = Codec(max_message_bytes=10_000).encode(_msg(args=["x" * 200]))
    assert _reason(Codec(max_message_bytes=100), body, headers) == "too_large"


def test_exactly_at_the_limit_is_allowed() -> None:
    body, headers = Codec().encode(_msg())
    assert Codec(max_message_bytes=len(body)).decode(body, headers).id == "m1"
    assert Codec(max_message_bytes=len(body)).encode(_msg())[0] == body
    with pytest.raises(PayloadTooLarge):
        Codec(max_message_bytes=len(body) - 1).encode(_msg())


def test_a_zlib_bomb_is_refused() -> None:
    limit = 10_000
    bomb = zlib.compress(b'{"id":"a","task":"t","args":["' + b"x" * (limit * 50) + b'"]}', 9)
    assert len(bomb) < limit
    with pytest.raises(DecodeError, match="inflates") as info:
        Codec(max_message_bytes=limit).decode(bomb, {"ct": "json", "ce": "zlib"})
    assert info.value.reason == "too_large"


def test_bad_zlib_data_is_a_decode_error() -> None:
    assert _reason(Codec(), b"not zlib at all", {"ct": "json", "ce": "zlib"}) == "decode_error"


def test_payload_too_large_at_encode() -> None:
    codec = Codec(max_message_bytes=1000)
    with pytest.raises(PayloadTooLarge, match=r"mod\.add") as info:
        codec.encode(_msg(args=["x" * 2000]))
    assert info.value.limit == 1000
    assert info.value.size > 1000
    assert "by reference" in str(info.value)


def test_compression_is_applied_before_the_size_check() -> None:
    codec = Codec(max_message_bytes=1000, compress_over=500)
    body, headers = codec.encode(_msg(args=["x" * 3000]))
    assert len(body) <= 1000
    assert codec.decode(body, headers).args == ["x" * 3000]


def test_what_encode_accepts_decode_accepts() -> None:
    """Across the size limit (compressible payloads, raw sizes 500 B to 20 kB): every
    message encode() accepts, decode() accepts; past some size encode() refuses. Both
    outcomes must occur, so the sweep really crosses the boundary."""
    codec = Codec(max_message_bytes=1000, compress_over=500)
    accepted, refused = [], []
    for size in range(500, 20_000, 250):
        try:
            body, headers = codec.encode(_msg(args=["x" * size]))
        except PayloadTooLarge:
            refused.append(size)
            continue
        assert codec.decode(body, headers).args == ["x" * size], size
        accepted.append(size)
    assert accepted and refused, (accepted, refused)
    assert max(accepted) < min(refused)  # one boundary, not a patchwork


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\x00\x01garbage", {"ct": "json"}),
        (b"", {"ct": "json"}),
        (b'{"id": "a", "task": "t"', {"ct": "json"}),  # truncated
        (b"[1, 2, 3]", {"ct": "json"}),  # not an object
        (b'{"task": "t"}', {"ct": "json"}),  # no id
        (b'{"id": "a", "task": "t", "args": "notalist"}', {"ct": "json"}),  # wrong type
        (b'{"id": 5, "task": "t"}', {"ct": "json"}),  # no coercion
        (b'{"id": "a", "task": "t", "attempt": "2"}', {"ct": "json"}),  # strict: no str->int
        (b'{"id": "a", "task": "t", "v": 2}', {"ct": "json"}),  # unknown version
        (b"\xc1", {"ct": "msgpack"}),  # never-used msgpack byte
        (pickle.dumps({"id": "a", "task": "t"}), {"ct": "json"}),
        (b'{"id": "a", "task": "t"}', {"ct": "pickle"}),  # unknown content type
        (b'{"id": "a", "task": "t"}', {"ct": "json", "ce": "gzip"}),  # unknown encoding
    ],
    ids=["garbage", "empty", "truncated", "array", "no-id", "wrong-type", "id-int", "strict",
         "version", "msgpack-garbage", "pickle", "content-type", "encoding"],
)
def test_bad_bytes_are_decode_errors(body: bytes, headers: dict[str, str]) -> None:
    assert _reason(Codec(), body, headers) == "decode_error"


@pytest.mark.parametrize(
    ("body", "ct"),
    [
        (b'{"id": "a", "task": "t", "args": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "json"),
        (b"\x83\xa2id\xa1a\xa4task\xa1t\xa4args" + b"\x91" * 100_000 + b"\xc0", "msgpack"),
    ],
    ids=["json", "msgpack"],
)
def test_deep_nesting_is_a_decode_error(body: bytes, ct: str) -> None:
    assert len(body) < 1024 * 1024
    assert _reason(Codec(), body, {"ct": ct}) == "decode_error"


def test_deep_nesting_is_an_encode_error() -> None:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(EncodeError):
        Codec().encode(_msg(args=[value]))


def test_unknown_content_type_and_encoding_are_named() -> None:
    with pytest.raises(DecodeError, match="'pickle'"):
        Codec().decode(b"{}", {"ct": "pickle"})
    with pytest.raises(DecodeError, match="'gzip'"):
        Codec().decode(b"{}", {"ct": "json", "ce": "gzip"})


def test_missing_content_type_means_json() -> None:
    assert Codec("msgpack").decode(b'{"id": "a", "task": "t"}', {}).id == "a"


class Widget:
    pass


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_encode_error_names_the_type(fmt: Any) -> None:
    codec = Codec(fmt)
    with pytest.raises(EncodeError, match="Widget") as info:
        codec.encode(_msg(args=[1, {"w": Widget()}]))
    assert "mod.add" in str(info.value)
    with pytest.raises(EncodeError, match="Widget"):
        codec.encode_value([Widget()])
    with pytest.raises(EncodeError, match="complex"):
        codec.encode_value(1j)


def test_msgpack_overflow_is_an_encode_error() -> None:
    with pytest.raises(EncodeError):
        Codec("msgpack").encode(_msg(args=[2**70]))


def test_json_refuses_non_finite_floats_instead_of_changing_them() -> None:
    codec = Codec("json")
    try:
        body, headers = codec.encode(_msg(args=[float("nan"), float("inf")]))
    except EncodeError:
        return
    decoded = codec.decode(body, headers)
    assert decoded.args[0] != decoded.args[0]  # still NaN
    assert decoded.args[1] == float("inf")


def test_msgpack_keeps_non_finite_floats() -> None:
    codec = Codec("msgpack")
    decoded = codec.decode(*codec.encode(_msg(args=[float("inf")])))
    assert decoded.args == [float("inf")]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="'xml'"):
        Codec("xml")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'k9'"):
        Codec(signing_keys=KEYS, signing_key_id="k9")
    with pytest.raises(ConfigError):
        Codec(signing_key_id="k1")


def test_decode_error_is_never_a_raw_msgspec_error() -> None:
    codec = Codec()
    for body in (b"{", b"null", b'{"id": null, "task": "t"}', b'{"id": "a", "task": "t", "links": [{}]}'):
        with pytest.raises(DecodeError):
            codec.decode(body, {"ct": "json"})
    assert not issubclass(DecodeError, msgspec.DecodeError)


def test_error_info_is_plain_data() -> None:
    info = ErrorInfo(type="builtins.ValueError", message="m")
    assert msgspec.json.decode(msgspec.json.encode(info), type=ErrorInfo) == info


@pytest.mark.parametrize("ct", ["json", "msgpack"])
def test_text_that_is_not_utf8_is_a_decode_error(ct: str) -> None:
    codec = Codec(ct)
    body, headers = codec.encode(TaskMessage(id="x", task="t", args=("é",)))
    broken = body.replace("é".encode(), b"\xc3\x28")  # an invalid UTF-8 sequence
    assert broken != body
    with pytest.raises(DecodeError) as caught:
        codec.decode(broken, headers)
    assert caught.value.reason == "decode_error"
