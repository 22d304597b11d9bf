"""One process of a :class:`runtime.process.pool.ProcessPool`, started as a fresh interpreter::

    python -m runtime.process.pool_child package.module:runtime_attr

It imports the application, then answers calls over its stdin/stdout: each
frame is a 4-byte big-endian length and a MessagePack body (never pickle).
A call names a task; the function is looked up by that name in the runtime's
registry and its arguments are checked and converted by ``Task.bind`` again.
The reply carries the value, or the error as type name, message and traceback;
before it, while the body runs, come its progress reports (coalesced) and, at
the task's ``soft_timeout``, ``SoftTimeLimitExceeded`` is raised in the body
(:mod:`runtime.process.pool_live`).

The file descriptors 0 and 1 are kept for the protocol and replaced by
``/dev/null`` and stderr, so a task that prints cannot corrupt a frame. The
process dies with its parent (``PR_SET_PDEATHSIG``) and exits at EOF on stdin.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import sys
import traceback
from typing import TYPE_CHECKING, Any

import msgspec

from runtime.context import CurrentTask, current
from runtime.messages import Progress, TaskMessage
from runtime.process.pool_live import Progressed, ProgressOut, SoftLimit

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Call", "Done", "Failed", "Progressed", "Ready", "Reply", "main", "read_frame",
           "write_frame"]

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


class Call(msgspec.Struct, tag="call", tag_field="op", frozen=True):
    """Run the task named ``task``."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    #: the message (without arguments and canvas) for ``current_task()`` in the child
    context: TaskMessage | None = None
    delivery_count: int = 0
    worker: str = ""


class Ready(msgspec.Struct, tag="ready", tag_field="op", frozen=True):
    """The application is imported; calls may come."""

    pid: int


class Done(msgspec.Struct, tag="done", tag_field="op", frozen=True):
    value: Any = None
    #: what the task left in ``current_task().meta`` and its last progress
    meta: dict[str, Any] = {}
    progress: Progress | None = None


class Failed(msgspec.Struct, tag="failed", tag_field="op", frozen=True):
    """The task raised: ``type`` is the qualified name of its class."""

    type: str
    message: str
    traceback: str = ""
    #: for runtime.errors.Retry
    delay_s: float | None = None
    #: for runtime.errors.Retry and Reject
    reason: str = ""
    meta: dict[str, Any] = {}
    progress: Progress | None = None


Reply = Ready | Done | Failed | Progressed


def read_frame(fd: int) -> bytes | None:
    """The next frame's body, or None at EOF."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return body


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, body: bytes) -> None:
    data = memoryview(_HEADER.pack(len(body)) + body)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _failure(exc: BaseException) -> Failed:
    from runtime.errors import Reject, Retry

    tb = "".join(traceback.format_exception(exc))
    if isinstance(exc, Retry):
        return Failed(type=_type_name(exc), message=str(exc), traceback=tb, delay_s=exc.delay_s,
                      reason=exc.reason)
    if isinstance(exc, Reject):
        return Failed(type=_type_name(exc), message=str(exc), traceback=tb, reason=exc.reason)
    return Failed(type=_type_name(exc), message=str(exc), traceback=tb)


def serve(spec: str, proto_in: int, proto_out: int) -> int:
    """Import ``spec`` and answer calls until EOF; the exit code."""
    from runtime.process.loading import load_runtime

    rt = load_runtime(spec)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Call)
    live = ProgressOut(functools.partial(write_frame, proto_out))
    soft = SoftLimit()
    write_frame(proto_out, encoder.encode(Ready(pid=os.getpid())))
    while True:
        body = read_frame(proto_in)
        if body is None:
            return 0
        out = _answer(rt, decoder.decode(body), encoder, live, soft)
        write_frame(proto_out, out)


def _answer(rt: Runtime, call: Call, encoder: msgspec.msgpack.Encoder, live: ProgressOut,
            soft: SoftLimit) -> bytes:
    """Run ``call``; its encoded reply. Its progress goes out through ``live`` as it runs."""
    ctx = None if call.context is None else CurrentTask(
        call.context, delivery_count=call.delivery_count, worker=call.worker, sink=live.note)
    token = current.set(ctx)
    try:
        task = rt.registry[call.task]
        args, kwargs = task.bind(call.args, call.kwargs)
        live.begin({} if ctx is None else ctx.meta)
        try:
            if task.soft_timeout is not None:
                soft.arm(task.soft_timeout)
            value = task.fn(*args, **kwargs)
        finally:
            soft.disarm()
            live.end()
        reply = Done(value=value)
        if ctx is not None and (ctx.meta or ctx.last_progress is not None):
            reply = Done(value=value, meta=ctx.meta, progress=ctx.last_progress)
        return encoder.encode(reply)
    except BaseException as e:  # the task's failure is the caller's to handle
        failed = _failure(e)
        if ctx is not None and (ctx.meta or ctx.last_progress is not None):
            failed = msgspec.structs.replace(failed, meta=ctx.meta, progress=ctx.last_progress)
        try:
            return encoder.encode(failed)
        except (TypeError, ValueError):  # meta that cannot be encoded: leave it out
            return encoder.encode(_failure(e))
    finally:
        current.reset(token)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m runtime.process.pool_child package.module:runtime_attr\n")
        return 2
    from runtime.process.loading import die_with_parent

    parent = os.environ.get("TASKLOOM_POOL_PARENT_PID")
    die_with_parent(signal.SIGKILL, int(parent) if parent else None)
    # the parent stops its pool; a terminal's Ctrl-C is for the parent only
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    try:
        return serve(args[0], proto_in, proto_out)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
