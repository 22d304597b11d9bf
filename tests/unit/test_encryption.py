"""Payload encryption in the codec: AES-256-GCM with key ids and rotation,
compress-then-encrypt-then-sign, and every way an encrypted message can be
wrong ending as a ``bad_encryption`` DecodeError (dead-lettered), never a crash."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.codec import Codec
from runtime.encryption import DecryptError
from runtime.errors import DecodeError, PayloadTooLarge
from runtime.messages import SigNode, TaskMessage
from tests.unit import encryption_old_codec
from tests.unit.test_codec import messages

OLD = os.urandom(32)
NEW = os.urandom(32)
SIGNING = {"s1": b"signing-secret"}
SECRET = "card-4111-1111-1111-1111"


def _msg(task_id: str = "t1", secret: str = SECRET) -> TaskMessage:
    return TaskMessage(id=task_id, task="billing.charge", args=[secret], kwargs={"note": secret * 3},
                       links=[SigNode(id=f"{task_id}-next", task="billing.receipt", args=[secret])])


def _codec(keys: dict[str, bytes] | None = None, kid: str | None = None, **kw: Any) -> Codec:
    return Codec(encryption_keys=keys if keys is not None else {"k1": OLD},
                 encryption_key_id=kid, **kw)


def _reason(codec: Codec | encryption_old_codec.Codec, body: bytes, headers: dict[str, str]) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(body, headers)
    return info.value.reason


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize("compress_over", [None, 0])
@pytest.mark.parametrize("signing", [None, SIGNING])
def test_round_trip_hides_the_payload(fmt: Any, compress_over: int | None,
                                      signing: dict[str, bytes] | None) -> None:
    codec = _codec(format=fmt, compress_over=compress_over, signing_keys=signing)
    message = _msg()
    body, headers = codec.encode(message)
    assert SECRET.encode() not in body and b"billing" not in body  # args, kwargs, links, name
    assert headers["ce"] == ("zlib+aesgcm" if compress_over is not None else "aesgcm")
    assert headers["ekid"] == "k1"
    assert ("sig" in headers) == (signing is not None)
    assert codec.decode(body, headers) == message


@settings(max_examples=60, deadline=None)
@given(messages)
def test_any_message_round_trips_encrypted(message: TaskMessage) -> None:
    codec = _codec(compress_over=64)
    assert codec.decode(*codec.encode(message)) == message


def test_each_message_gets_a_fresh_nonce() -> None:
    codec = _codec()
    first, _ = codec.encode(_msg())
    second, _ = codec.encode(_msg())
    assert first != second
    assert first[:4] == second[:4] == b"\x00\x02t1"  # the task id in clear, then the nonce


def test_rotation_old_key_still_decrypts_new_key_encrypts() -> None:
    producer = _codec({"k1": OLD})
    worker = _codec({"k1": OLD, "k2": NEW}, "k2")
    body, headers = producer.encode(_msg())
    assert worker.decode(body, headers) == _msg()  # written with k1, still configured
    body, headers = worker.encode(_msg("t2"))  # what the worker sends (retries, next steps)
    assert headers["ekid"] == "k2"
    assert _codec({"k2": NEW}).decode(body, headers) == _msg("t2")


@pytest.mark.parametrize("signing", [None, SIGNING])
def test_a_removed_key_is_bad_encryption_naming_the_key_and_the_task(
        signing: dict[str, bytes] | None) -> None:
    body, headers = _codec({"k1": OLD}, signing_keys=signing).encode(_msg("t-old"))
    worker = _codec({"k2": NEW}, signing_keys=signing)
    with pytest.raises(DecryptError) as info:
        worker.decode(body, headers)
    assert info.value.reason == "bad_encryption"
    assert "'k1' is not configured" in str(info.value) and "['k2']" in str(info.value)
    assert info.value.task_id == "t-old"
    # only a verified signature vouches for the id a caller may be told about
    assert info.value.authenticated is (signing is not None)


def test_the_same_key_id_with_another_key_is_bad_encryption() -> None:
    body, headers = _codec({"k1": OLD}).encode(_msg())
    assert _reason(_codec({"k1": NEW}), body, headers) == "bad_encryption"


@pytest.mark.parametrize("compress_over", [None, 0])
def test_every_flipped_byte_is_bad_encryption(compress_over: int | None) -> None:
    codec = _codec(compress_over=compress_over)
    body, headers = codec.encode(_msg())
    # the id's length, the id, the nonce, the ciphertext and the tag
    for i in range(len(body)):
        tampered = bytearray(body)
        tampered[i] ^= 0x01
        assert _reason(codec, bytes(tampered), headers) == "bad_encryption", i


def test_truncated_and_empty_bodies_are_bad_encryption() -> None:
    codec = _codec()
    body, headers = codec.encode(_msg())
    for cut in (0, 1, 2, 4, 10, 20, len(body) - 1):
        assert _reason(codec, body[:cut], headers) == "bad_encryption", cut


def test_a_signed_tampered_body_is_refused_by_the_signature_first() -> None:
    codec = _codec(signing_keys=SIGNING)
    body, headers = codec.encode(_msg())
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    assert _reason(codec, tampered, headers) == "bad_signature"


def test_a_ciphertext_cannot_move_to_another_task() -> None:
    codec = _codec()
    body_a, _ = codec.encode(_msg("task-a"))
    body_b, headers_b = codec.encode(_msg("task-b"))
    # task b's headers with task a's sealed payload under b's id
    moved = body_b[:8] + body_a[8:]  # b"\x00\x06task-b" + a's nonce, ciphertext, tag
    assert _reason(codec, moved, headers_b) == "bad_encryption"


@pytest.mark.parametrize("change", [{"ce": "aesgcm"}, {"ct": "msgpack"}, {"ekid": "k2"}])
def test_changed_headers_fail_authentication(change: dict[str, str]) -> None:
    codec = _codec({"k1": OLD, "k2": OLD}, "k1", compress_over=0)
    body, headers = codec.encode(_msg())
    assert _reason(codec, body, {**headers, **change}) == "bad_encryption"


def test_a_missing_key_id_header_is_bad_encryption() -> None:
    codec = _codec()
    body, headers = codec.encode(_msg())
    del headers["ekid"]
    assert _reason(codec, body, headers) == "bad_encryption"
    assert _reason(codec, body, {**headers, "ekid": 7}) == "bad_encryption"  # type: ignore[dict-item]


def test_an_unencrypted_message_is_refused_by_an_encrypting_worker() -> None:
    body, headers = Codec().encode(_msg())
    assert _reason(_codec(), body, headers) == "bad_encryption"
    body, headers = Codec(compress_over=0, signing_keys=SIGNING).encode(_msg())
    assert _reason(_codec(signing_keys=SIGNING), body, headers) == "bad_encryption"


def test_an_encrypted_message_to_a_worker_without_keys_says_what_to_configure() -> None:
    body, headers = _codec().encode(_msg())
    with pytest.raises(DecryptError) as info:
        Codec().decode(body, headers)
    assert "no encryption keys" in str(info.value) and "'k1'" in str(info.value)


@pytest.mark.parametrize("compress_over", [None, 0])
@pytest.mark.parametrize("signing", [None, SIGNING])
def test_a_worker_from_before_encryption_dead_letters_it_as_decode_error(
        compress_over: int | None, signing: dict[str, bytes] | None) -> None:
    body, headers = _codec(compress_over=compress_over, signing_keys=signing).encode(_msg())
    old = encryption_old_codec.Codec(signing_keys=signing)
    with pytest.raises(DecodeError) as info:
        old.decode(body, headers)
    assert info.value.reason == "decode_error"
    assert "unknown content encoding" in str(info.value)


def test_the_size_limit_counts_the_encryption_overhead() -> None:
    plain = Codec(max_message_bytes=400)
    message = TaskMessage(id="t1", task="x", args=["a" * 300])
    size = len(plain.encode(message)[0])
    codec = _codec(max_message_bytes=size + 4 + 12 + 16 - 1)  # 1 byte short of the sealed size
    with pytest.raises(PayloadTooLarge):
        codec.encode(message)
    assert _codec(max_message_bytes=size + 4 + 12 + 16).encode(message)


def test_a_sealed_id_that_is_not_the_message_id_is_bad_encryption() -> None:
    codec = _codec()
    body, _ = Codec().encode(_msg("real-id"))  # plaintext JSON of task "real-id"
    sealed = codec._keyring.seal(body, ct="json", ce="aesgcm", tid="other-id")  # type: ignore[union-attr]
    with pytest.raises(DecryptError) as info:
        codec.decode(sealed, {"ct": "json", "ce": "aesgcm", "ekid": "k1"})
    assert "not the id" in str(info.value)


def test_the_keyring_binds_the_task_id_by_itself() -> None:
    keyring = _codec()._keyring
    assert keyring is not None
    sealed = keyring.seal(b"payload", ct="json", ce="aesgcm", tid="task-a")
    assert keyring.open(sealed, kid="k1", ct="json", ce="aesgcm", authenticated=False) == \
        ("task-a", b"payload")
    relabelled = sealed.replace(b"task-a", b"task-b", 1)  # same length, other id
    with pytest.raises(DecryptError):
        keyring.open(relabelled, kid="k1", ct="json", ce="aesgcm", authenticated=False)


#: random bytes, and bodies that start with a well-formed task id framing
_bodies = st.binary(max_size=200) | st.builds(
    lambda tid, rest: len(tid).to_bytes(2, "big") + tid + rest,
    st.binary(max_size=8), st.binary(max_size=60))


@settings(max_examples=300, deadline=None)
@given(body=_bodies, ce=st.sampled_from(["aesgcm", "zlib+aesgcm"]),
       kid=st.sampled_from(["k1", "k9", "", "é" * 200]), ct=st.sampled_from(["json", "msgpack", "x"]))
def test_hostile_encrypted_bodies_only_ever_raise_decode_error(body: bytes, ce: str, kid: str,
                                                               ct: str) -> None:
    for codec in (_codec(), Codec()):
        with pytest.raises(DecodeError) as info:
            codec.decode(body, {"ct": ct, "ce": ce, "ekid": kid})
        assert info.value.reason == "bad_encryption"
