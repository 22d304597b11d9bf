"""Tasks and the registry that names them.

A :class:`Task` wraps a function with its options and knows how to check and
convert arguments against the function's type hints (``msgspec.convert``),
both when a call is enqueued and when a worker runs it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, Protocol, TypeVar, overload

import msgspec

from runtime.canvas import Signature
from runtime.errors import ArgumentsError, ConfigError, UnknownTaskError
from runtime.options import check_options
from runtime.retry import RetryPolicy

#: A lifecycle hook: ``on_success(ctx, value)``, ``on_failure(ctx, error)``,
#: ``on_retry(ctx, error, delay_s)``, ``on_cancel(ctx)``; sync or async.
Hook = Callable[..., Any]

if TYPE_CHECKING:
    from runtime.ops.limits import Limits

__all__ = ["Kind", "Task", "TaskDecorator", "TaskRegistry"]

P = ParamSpec("P")
Rest = ParamSpec("Rest")
R = TypeVar("R")

Kind = Literal["async", "thread", "process"]
_KINDS = ("async", "thread", "process")

_Converter = tuple[str, Any]  # (parameter name, type hint)


class _FilledLater:
    def __repr__(self) -> str:
        return "<filled in later>"


_FILLED_LATER: Any = _FilledLater()


def _check_limits_and_hooks(name: str, timeout: float | None, soft_timeout: float | None,
                            **hooks: Hook | None) -> None:
    if soft_timeout is not None and timeout is not None and soft_timeout >= timeout:
        raise ConfigError(f"task {name!r}: soft_timeout={soft_timeout} must be below "
                          f"timeout={timeout} (the soft limit warns the task before the "
                          "hard one stops it); lower it or raise timeout")
    for hook_name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise ConfigError(f"task {name!r}: {hook_name} must be a function (sync or "
                              f"async), not {hook!r}")


class Task(Generic[P, R]):
    """A registered task. Call it to run the function here and now; use
    ``.s()``/``.si()`` to make a signature that runs on a worker.

    Typed for the user's type checker: ``P`` is the function's parameters and
    ``R`` its result (of an ``async def``, what it returns when awaited), so
    ``add.s("x")`` is a type error and ``await run(add.s(1, 2))`` is an ``int``.
    """

    #: flow control (``@rt.task(rate_limit=...)``), read by the worker's LimitsGate
    limits: Limits | None = None

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        name: str,
        queue: str = "default",
        priority: int = 0,
        retry: RetryPolicy = RetryPolicy(),
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        timeout: float | None = None,
        expires: float | None = None,
        kind: Kind | None = None,
        owner: Any = None,
        soft_timeout: float | None = None,
        result_ttl: float | None = None,
        failure_ttl: float | None = None,
        on_success: Hook | None = None,
        on_failure: Hook | None = None,
        on_retry: Hook | None = None,
        on_cancel: Hook | None = None,
    ) -> None:
        is_async = inspect.iscoroutinefunction(fn)
        if kind is None:
            kind = "async" if is_async else "thread"
        if kind not in _KINDS:
            raise ConfigError(f"task {name!r}: kind must be one of {_KINDS}, not {kind!r}")
        if kind == "async" and not is_async:
            raise ConfigError(f"task {name!r}: kind='async' needs an `async def` function")
        if kind in ("thread", "process") and is_async:
            raise ConfigError(f"task {name!r}: kind={kind!r} needs a plain `def` function")
        if not name or not isinstance(name, str):
            raise ConfigError(f"a task name must be a non-empty string, not {name!r}")
        if not queue or not isinstance(queue, str):
            raise ConfigError(f"task {name!r}: queue must be a non-empty string, not {queue!r}")
        check_options(f"task {name!r}", ConfigError, priority=priority, timeout=timeout,
                      expires=expires, soft_timeout=soft_timeout, result_ttl=result_ttl,
                      failure_ttl=failure_ttl)
        _check_limits_and_hooks(name, timeout, soft_timeout, on_success=on_success,
                                on_failure=on_failure, on_retry=on_retry, on_cancel=on_cancel)
        self.fn = fn
        self.name = name
        self.queue = queue
        self.priority = priority
        self.retry = retry
        self.retry_on = retry_on
        self.timeout = timeout
        self.expires = expires
        self.soft_timeout = soft_timeout
        #: how long its result (success) / failure is kept; None: the store's ttl
        self.result_ttl = result_ttl
        self.failure_ttl = failure_ttl
        self.on_success = on_success
        self.on_failure = on_failure
        self.on_retry = on_retry
        self.on_cancel = on_cancel
        #: whether it has any hook (the worker does no hook work otherwise)
        self.hooked = any(h is not None for h in (on_success, on_failure, on_retry, on_cancel))
        self.kind: Kind = kind
        self.owner = owner
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self._signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        self.return_type: Any = hints.pop("return", Any)
        self._converters: list[_Converter] = [
            (p.name, hints[p.name])
            for p in self._signature.parameters.values()
            if p.name in hints
            and hints[p.name] is not Any
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        params = list(self._signature.parameters.values())
        simple = all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            for p in params
        )
        # the hot path: all-positional calls of simple signatures skip inspect.bind
        self._arity = len(params) if simple else -1
        index = {p.name: i for i, p in enumerate(params)}
        self._positional_converters = [(index[n], n, h) for n, h in self._converters]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Run the function in this process, now (no broker involved)."""
        return self.fn(*args, **kwargs)

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """A signature of this task with all its arguments (type-checked
        against the function). In a chain, a step made with ``.s()`` also gets
        the previous result prepended to ``args``: give such a step with
        :meth:`partial` so that a type checker agrees."""
        return Signature(self, tuple(args), kwargs)

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: it ignores the previous result in a chain."""
        return Signature(self, tuple(args), kwargs, immutable=True)

    def partial(self: Task[Concatenate[Any, Rest], R], *args: Rest.args,
                **kwargs: Rest.kwargs) -> Signature[R]:
        """A signature missing its first argument, which the chain (or chord)
        fills with the previous step's result: ``chain(add.s(1, 2), add.partial(3))``.
        The same as ``.s(3)`` at run time; typed as "every argument but the first"."""
        return Signature(self, tuple(args), kwargs)

    def bind(
        self,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        *,
        partial: bool = False,
        leading: int = 0,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Check ``args``/``kwargs`` against the signature and type hints and
        return them converted; raises ArgumentsError saying which argument is
        wrong and what was expected.

        ``leading`` positional arguments will be prepended later (a chain
        step's previous result, an errback's task id and error): they are
        counted in the arity check but not converted. ``partial`` allows
        missing arguments.
        """
        if leading:
            args = (*([_FILLED_LATER] * leading), *args)
        if not kwargs and len(args) == self._arity:
            if not self._converters:
                return tuple(args), {}
            converted = list(args)
            for i, pname, hint in self._positional_converters:
                if i >= leading:
                    converted[i] = self._convert(pname, converted[i], hint)
            return tuple(converted), {}
        try:
            binder = self._signature.bind_partial if partial else self._signature.bind
            bound = binder(*args, **kwargs)
        except TypeError as e:
            raise ArgumentsError(self.name, f"{e} (signature: {self.name}{self._signature})") from None
        if self._converters:
            arguments = bound.arguments
            for pname, hint in self._converters:
                if pname in arguments and arguments[pname] is not _FILLED_LATER:
                    arguments[pname] = self._convert(pname, arguments[pname], hint)
        return bound.args, bound.kwargs

    def _convert(self, pname: str, value: Any, hint: Any) -> Any:
        try:
            return msgspec.convert(value, hint)
        except msgspec.ValidationError as e:
            raise ArgumentsError(
                self.name, f"argument {pname!r}: {e} (expected {_hint_name(hint)})"
            ) from None

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue} kind={self.kind}>"


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__qualname__", None) or repr(hint)


class TaskDecorator(Protocol):
    """What ``@runtime.task(...)`` with options returns: a decorator typed like
    the bare ``@runtime.task`` (an ``async def``'s result is its awaited result)."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class TaskRegistry:
    """Tasks by name. Dispatch is by explicit registration only: a name in a
    message is never imported."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}
        #: stand-ins of tasks sent by name without their code (:meth:`remote`)
        self._remote: dict[str, Task[Any, Any]] = {}

    def remote(self, name: str, *, queue: str, owner: Any) -> Task[Any, Any]:
        """A stand-in for a task this process sends by name but does not have:
        it takes any arguments (none can be checked) and goes to ``queue``.
        It is never dispatched (``get``, ``in`` and iteration see registered
        tasks only), so a worker of this runtime dead-letters such a message as
        ``unknown_task``; canvases can still start with it."""
        task = self._remote.get(name)
        if task is None or task.queue != queue:
            task = self._remote[name] = Task(_sent_by_name, name=name, queue=queue, owner=owner)
        return task

    def add(self, task: Task[Any, Any]) -> None:
        existing = self._tasks.get(task.name)
        if existing is not None and existing.fn is not task.fn:
            raise ConfigError(
                f"a task named {task.name!r} is registered already ({existing.fn!r}); "
                "pass name=... to tell them apart"
            )
        self._tasks[task.name] = task

    def get(self, name: str) -> Task[Any, Any] | None:
        return self._tasks.get(name)

    def __getitem__(self, name: str) -> Task[Any, Any]:
        task = self._tasks.get(name) or self._remote.get(name)
        if task is None:
            raise UnknownTaskError(name, list(self._tasks))
        return task

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task[Any, Any]]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def queues(self) -> list[str]:
        return sorted({t.queue for t in self._tasks.values()})


async def _sent_by_name(*args: Any, **kwargs: Any) -> Any:
    """The body of a task sent by name: this process does not have its code."""
    raise ConfigError("this task was sent by name and its code is not in this process; "
                      "register it with @runtime.task on the workers that run it")
