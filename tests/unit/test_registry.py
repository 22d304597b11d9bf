"""Tasks and the registry: names, options, kinds, argument binding."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from runtime import ArgumentsError, ConfigError, Runtime, UnknownTaskError
from runtime.registry import Task, TaskRegistry


class Point(msgspec.Struct):
    x: int
    y: int


async def add(x: int, y: int) -> int:
    return x + y


def size(s: str) -> int:
    return len(s)


# -- names and registration ---------------------------------------------------------------


def test_default_name_is_module_and_qualname() -> None:
    rt = Runtime()
    t = rt.task(add)
    assert t.name == f"{__name__}.add"
    assert rt.registry[t.name] is t

    @rt.task
    async def local() -> None:
        pass

    assert local.name == f"{__name__}.test_default_name_is_module_and_qualname.<locals>.local"


def test_explicit_name_queue_and_options() -> None:
    rt = Runtime(default_queue="main")
    t = rt.task(name="math.add", queue="cpu", priority=7, retries=3, timeout=5, expires=60)(add)
    assert (t.name, t.queue, t.priority, t.timeout, t.expires) == ("math.add", "cpu", 7, 5, 60)
    assert t.retry.retries == 3
    assert rt.task(size).queue == "main"
    assert rt.registry.queues() == ["cpu", "main"]
    assert t.owner is rt


def test_a_duplicate_name_is_a_config_error() -> None:
    rt = Runtime()
    rt.task(name="same")(add)
    with pytest.raises(ConfigError, match="'same' is registered already") as info:
        rt.task(name="same")(size)
    assert "name=" in str(info.value)  # says what to do
    assert rt.registry["same"].fn is add


def test_registering_the_same_function_twice_is_harmless() -> None:
    rt = Runtime()
    rt.task(add)
    rt.task(add)
    assert len(rt.registry) == 1


def test_registry_lookups() -> None:
    rt = Runtime()
    a = rt.task(name="a")(add)
    b = rt.task(name="b", queue="io")(size)
    assert "a" in rt.registry
    assert "zzz" not in rt.registry
    assert rt.registry.get("zzz") is None
    assert list(rt.registry) == [a, b]
    assert len(rt.registry) == 2
    assert rt.registry.queues() == ["default", "io"]
    with pytest.raises(UnknownTaskError, match="'zzz'") as info:
        rt.registry["zzz"]
    assert info.value.name == "zzz"
    assert "registered: a, b" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_unknown_task_error_lists_at_most_ten_names() -> None:
    err = UnknownTaskError("x", [f"t{i:02}" for i in range(15)])
    assert "t09" in str(err)
    assert "t10" not in str(err)
    assert "…" in str(err)


def test_signature_by_name() -> None:
    rt = Runtime()
    rt.task(name="math.add")(add)
    sig = rt.signature("math.add", 1, y=2)
    assert (sig.task.name, sig.args, sig.kwargs) == ("math.add", (1,), {"y": 2})
    with pytest.raises(UnknownTaskError, match=r"'math\.sub'"):
        rt.registry["math.sub"]
    by_name = rt.signature("math.sub", 1, 2)  # not registered: sent unchecked, by name
    assert (by_name.task.name, by_name.args) == ("math.sub", (1, 2))


def test_empty_registry_queues() -> None:
    assert TaskRegistry().queues() == []


# -- kinds ------------------------------------------------------------------------------


def test_kind_is_inferred() -> None:
    rt = Runtime()
    assert rt.task(add).kind == "async"
    assert rt.task(size).kind == "thread"
    assert rt.task(kind="process", name="p")(size).kind == "process"


@pytest.mark.parametrize(
    ("fn", "kind", "match"),
    [
        (size, "async", "async def"),
        (add, "thread", "plain `def`"),
        (add, "process", "plain `def`"),
        (size, "fiber", "kind must be one of"),
    ],
)
def test_kind_mismatch_is_a_config_error(fn: Any, kind: str, match: str) -> None:
    rt = Runtime()
    with pytest.raises(ConfigError, match=match):
        rt.task(kind=kind)(fn)  # type: ignore[call-overload]
    assert len(rt.registry) == 0


# -- option validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(priority=-1),
        dict(priority=10),
        dict(timeout=0),
        dict(timeout=-1.5),
        dict(expires=0),
        dict(expires=-3),
    ],
    ids=["prio-low", "prio-high", "timeout-zero", "timeout-neg", "expires-zero", "expires-neg"],
)
def test_bad_options_are_config_errors(kwargs: dict[str, Any]) -> None:
    rt = Runtime()
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        rt.task(**kwargs)(add)
    assert len(rt.registry) == 0


@pytest.mark.parametrize("field", ["name", "queue"])
def test_empty_name_or_queue_is_a_config_error(field: str) -> None:
    kwargs: dict[str, Any] = {"name": "t", "queue": "q", field: ""}
    with pytest.raises(ConfigError, match=field):
        Task(add, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(priority="5"), dict(timeout="10")], ids=["priority", "timeout"])
def test_wrongly_typed_options_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Runtime().task(**kwargs)(add)


# -- calling and binding ---------------------------------------------------------------------


async def test_calling_a_task_runs_the_function_here() -> None:
    rt = Runtime()
    t = rt.task(add)
    assert await t(1, 2) == 3
    assert rt.task(size)("abc") == 3


def test_task_keeps_doc_and_return_type() -> None:
    rt = Runtime()

    @rt.task
    async def documented(x: int) -> list[int]:
        """Docs."""
        return [x]

    assert documented.__doc__ == "Docs."
    assert documented.return_type == list[int]
    assert documented.__wrapped__ is not None
    assert "documented" in repr(documented)


def test_bind_returns_converted_arguments() -> None:
    t = Task(add, name="add")
    assert t.bind((1, 2), {}) == ((1, 2), {})
    assert t.bind([1], {"y": 2}) == ((1, 2), {})


def test_missing_argument_is_named() -> None:
    t = Task(add, name="add")
    with pytest.raises(ArgumentsError, match="'y'") as info:
        t.bind((1,), {})
    assert info.value.task == "add"
    assert "signature" in str(info.value)


def test_extra_arguments_are_refused() -> None:
    t = Task(add, name="add")
    with pytest.raises(ArgumentsError, match="too many"):
        t.bind((1, 2, 3), {})
    with pytest.raises(ArgumentsError, match="'z'"):
        t.bind((1, 2), {"z": 3})
    with pytest.raises(ArgumentsError, match="multiple values"):
        t.bind((1, 2), {"x": 3})


@pytest.mark.parametrize(
    ("args", "name", "expected"),
    [
        (("1", 2), "'x'", "int"),
        ((1, "2"), "'y'", "int"),
        ((1.5, 2), "'x'", "int"),
        ((True, 2), "'x'", "int"),
        ((None, 2), "'x'", "int"),
        ((1, [2]), "'y'", "int"),
    ],
)
def test_wrong_type_names_the_argument_and_the_expected_type(args: tuple[Any, ...], name: str,
                                                             expected: str) -> None:
    t = Task(add, name="add")
    with pytest.raises(ArgumentsError) as info:
        t.bind(args, {})
    assert name in str(info.value)
    assert f"expected {expected}" in str(info.value)
    with pytest.raises(ArgumentsError, match=name):
        t.bind((), dict(zip("xy", args, strict=True)))


def test_json_ish_data_is_converted_to_the_hinted_types() -> None:
    def f(when: datetime, pair: tuple[int, int], ids: set[str], point: Point, u: uuid.UUID,
          maybe: int | None = None) -> None:
        pass

    t = Task(f, name="f")
    u = uuid.uuid4()
    args, kwargs = t.bind(["2024-01-02T03:04:05Z", [1, 2], ["a", "b"], {"x": 1, "y": 2}, str(u)], {})
    assert args == (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), (1, 2), {"a", "b"}, Point(1, 2), u)
    assert kwargs == {}
    assert isinstance(args[1], tuple)
    with pytest.raises(ArgumentsError, match="'pair'"):
        t.bind(["2024-01-02T03:04:05Z", [1, 2, 3], [], {"x": 1, "y": 2}, str(u)], {})
    with pytest.raises(ArgumentsError, match="'when'"):
        t.bind(["yesterday", [1, 2], [], {"x": 1, "y": 2}, str(u)], {})
    with pytest.raises(ArgumentsError, match="'point'"):
        t.bind(["2024-01-02T03:04:05Z", [1, 2], [], {"x": 1}, str(u)], {})


def test_unhinted_and_any_parameters_are_passed_through() -> None:
    def f(a, b: Any, *rest: int, **extra: str) -> None:  # type: ignore[no-untyped-def]
        pass

    t = Task(f, name="f")
    obj = object()
    assert t.bind((obj, obj, "not-an-int"), {"k": 5}) == ((obj, obj, "not-an-int"), {"k": 5})


def test_keyword_only_and_defaults() -> None:
    def f(a: int, *, b: int = 2, c: str = "x") -> None:
        pass

    t = Task(f, name="f")
    assert t.bind((1,), {}) == ((1,), {})
    assert t.bind((1,), {"c": "y"}) == ((1,), {"c": "y"})
    with pytest.raises(ArgumentsError, match="'b'"):
        t.bind((1,), {"b": "two"})
    with pytest.raises(ArgumentsError):
        t.bind((1, 2), {})


def test_partial_bind_allows_missing_but_checks_present() -> None:
    t = Task(add, name="add")
    assert t.bind((), {"y": 2}, partial=True) == ((), {"y": 2})
    assert t.bind((1,), {}, partial=True) == ((1,), {})
    with pytest.raises(ArgumentsError, match="'y'"):
        t.bind((), {"y": "2"}, partial=True)
    with pytest.raises(ArgumentsError, match="too many"):
        t.bind((1, 2, 3), {}, partial=True)


def test_arguments_error_is_a_type_error_and_an_enqueue_error() -> None:
    from runtime import EnqueueError

    err = ArgumentsError("t", "detail")
    assert isinstance(err, TypeError)
    assert isinstance(err, EnqueueError)
    assert err.detail == "detail"
