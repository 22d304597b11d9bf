"""``Runtime(encryption_keys=...)`` and ``TASKLOOM_ENCRYPTION_KEYS`` reach the
codec: a task runs with its arguments encrypted on the wire, and a bad key in
the environment is a ``ConfigError`` naming its key id (issue 19 item 4)."""

from __future__ import annotations

import base64
import os

import anyio
import pytest

from runtime import ConfigError, Runtime, run
from runtime.messages import TaskMessage

KEY = os.urandom(32)


def _echo_runtime(**kw: object) -> Runtime:
    rt = Runtime(broker="memory://", **kw)  # type: ignore[arg-type]

    @rt.task(name="enc.echo")
    async def echo(secret: str) -> str:
        return secret

    return rt


def _encrypts(rt: Runtime) -> bool:
    """Whether the runtime's codec encrypts: the argument is not in the body and
    the content encoding says AES-GCM."""
    body, headers = rt.codec.encode(TaskMessage(id="t1", task="enc.echo", args=["s3cret"]))
    return b"s3cret" not in body and "aesgcm" in headers.get("ce", "")


async def test_keys_given_in_code_encrypt_and_the_task_runs() -> None:
    rt = _echo_runtime(encryption_keys={"k1": KEY})
    async with rt, rt.worker():
        with anyio.fail_after(10):
            assert await run(rt.signature("enc.echo", "s3cret")) == "s3cret"
    assert _encrypts(rt)


async def test_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_ENCRYPTION_KEYS", "k1:" + base64.b64encode(KEY).decode())
    monkeypatch.setenv("TASKLOOM_ENCRYPTION_KEY_ID", "k1")
    rt = _echo_runtime()
    assert _encrypts(rt)
    async with rt, rt.worker():
        with anyio.fail_after(10):
            assert await run(rt.signature("enc.echo", "s3cret")) == "s3cret"


def test_explicit_keys_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_ENCRYPTION_KEYS", "bad:not-base64!")
    rt = _echo_runtime(encryption_keys={"k1": KEY})
    assert _encrypts(rt)


def test_a_bad_key_in_the_environment_names_its_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_ENCRYPTION_KEYS", "k9:" + base64.b64encode(b"short").decode())
    try:
        _echo_runtime()
    except ConfigError as e:
        assert "k9" in str(e)
    else:
        raise AssertionError("a 5-byte key was accepted")
