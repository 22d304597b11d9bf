"""Encryption settings: keys in code and from TASKLOOM_ENCRYPTION_KEYS /
TASKLOOM_ENCRYPTION_KEY_ID, bad keys named by their id (never shown), and the
core working without the ``encryption`` extra."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from runtime.codec import Codec
from runtime.config import VARIABLES, Environment
from runtime.errors import ConfigError
from runtime.messages import TaskMessage

K1 = os.urandom(32)
K2 = os.urandom(32)
B1 = base64.b64encode(K1).decode()
B2 = base64.urlsafe_b64encode(K2).decode()
AEAD = "cryptography.hazmat.primitives.ciphers.aead"


def test_env_keys_parse_standard_and_url_safe_base64() -> None:
    env = Environment({"TASKLOOM_ENCRYPTION_KEYS": f" k1:{B1} , k2:{B2} ",
                       "TASKLOOM_ENCRYPTION_KEY_ID": "k2"})
    assert env.encryption_keys("TASKLOOM_ENCRYPTION_KEYS") == {"k1": K1, "k2": K2}
    assert env.text("TASKLOOM_ENCRYPTION_KEY_ID") == "k2"
    assert Environment({}).encryption_keys("TASKLOOM_ENCRYPTION_KEYS") is None
    assert VARIABLES["TASKLOOM_ENCRYPTION_KEYS"] == "encryption_keys"
    assert VARIABLES["TASKLOOM_ENCRYPTION_KEY_ID"] == "encryption_key_id"


def test_env_keys_make_a_working_codec() -> None:
    env = Environment({"TASKLOOM_ENCRYPTION_KEYS": f"k1:{B1},k2:{B2}",
                       "TASKLOOM_ENCRYPTION_KEY_ID": "k2"})
    codec = Codec(encryption_keys=env.encryption_keys("TASKLOOM_ENCRYPTION_KEYS"),
                  encryption_key_id=env.text("TASKLOOM_ENCRYPTION_KEY_ID"))
    message = TaskMessage(id="t", task="x", args=[1])
    body, headers = codec.encode(message)
    assert headers["ekid"] == "k2"
    assert Codec(encryption_keys={"k2": K2}).decode(body, headers) == message


@pytest.mark.parametrize(("value", "named", "says"), [
    (f"k1:{B1},bad:not*base64", "'bad'", "not valid base64"),
    (f"k1:{B1},short:{base64.b64encode(b'x' * 16).decode()}", "'short'", "16 bytes"),
    (f"k1:{B1},k1:{B2}", "'k1'", "given twice"),
    (f"k1:{B1},{B2}", "entry 2", "no ':'"),
    (f"k 1:{B1}", "'k 1'", "A-Z a-z 0-9"),
    (",", "no keys", "id1:base64key"),
])
def test_bad_env_keys_name_the_variable_and_the_key_id_never_the_key(
        value: str, named: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Environment({"TASKLOOM_ENCRYPTION_KEYS": value}).encryption_keys("TASKLOOM_ENCRYPTION_KEYS")
    message = str(info.value)
    assert "TASKLOOM_ENCRYPTION_KEYS" in message and named in message and says in message
    assert B1 not in message and B2 not in message


@pytest.mark.parametrize(("keys", "kid", "says"), [
    ({"k1": b"x" * 31}, None, "'k1' is 31 bytes"),
    ({"k1": "a string key"}, None, "'k1' is a str"),
    ({"k1": K1, "k2": K2}, None, "encryption_key_id is needed"),
    ({"k1": K1}, "k9", "'k9' is not among"),
    ({"": K1}, None, "key id ''"),
    ({}, "k1", "without encryption_keys"),
])
def test_bad_keys_in_code_are_config_errors(keys: dict[str, bytes], kid: str | None,
                                            says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Codec(encryption_keys=keys, encryption_key_id=kid)


def test_without_the_extra_asking_for_encryption_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, AEAD, None)  # `import` of it now raises ImportError
    assert Codec().decode(*Codec().encode(TaskMessage(id="t", task="x")))  # the core still works
    with pytest.raises(ConfigError) as info:
        Codec(encryption_keys={"k1": K1})
    assert "pip install 'taskloom[encryption]'" in str(info.value)


def test_the_core_does_not_import_cryptography() -> None:
    code = ("import sys, runtime, runtime.codec, runtime.config, runtime.worker; "
            "assert 'cryptography' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('cryptography'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
