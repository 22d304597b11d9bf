"""Canvas: signatures, chain/group/chord compiled to nodes and messages (pure, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from runtime import ArgumentsError, ConfigError, EnqueueError, Runtime, UnknownTaskError
from runtime import canvas as cv
from runtime.canvas import Chain, Chord, Group, Signature, chain, chord, chunks, group, starmap
from runtime.canvas import map as cmap
from runtime.messages import ChainNode, ChordNode, GroupNode, SigNode, TaskMessage, TaskOptions

rt = Runtime()


@rt.task(name="add")
async def add(x: int, y: int) -> int:
    return x + y


@rt.task(name="inc", queue="io", priority=3, expires=60)
async def inc(x: int) -> int:
    return x + 1


@rt.task(name="tsum")
async def tsum(xs: list[int]) -> int:
    return sum(xs)


@rt.task(name="eb")
async def eb(task_id: str, error: dict[str, str]) -> None:
    pass


def start(node: Any, **kw: Any) -> list[TaskMessage]:
    return cv.start(node, rt.registry, **kw)


# -- signatures ---------------------------------------------------------------------


def test_s_and_si() -> None:
    s = add.s(1, y=2)
    assert (s.task, s.args, s.kwargs, s.immutable) == (add, (1,), {"y": 2}, False)
    assert add.si(1, 2).immutable
    assert repr(add.s(1, y=2)) == "add.s(1, y=2)"
    assert repr(add.si(1)) == "add.si(1)"
    assert s.owner is rt


def test_set_returns_a_changed_copy() -> None:
    s = add.si(1, 2).on_error(eb.s())
    t = s.set(queue="q", priority=9).set(countdown=1.5)
    assert t is not s
    assert t.options == TaskOptions(queue="q", priority=9, countdown=1.5)
    assert s.options == TaskOptions()
    assert t.immutable
    assert t.errbacks == s.errbacks
    assert (t.args, t.kwargs) == (s.args, s.kwargs)


def test_set_refuses_unknown_options_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'prio'") as info:
        add.s(1, 2).set(prio=1)
    assert "priority" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        dict(countdown=-1),
        dict(priority=10),
        dict(priority=-1),
        dict(retries=-1),
        dict(expires=0),
        dict(timeout=-1),
    ],
    ids=["countdown", "prio-high", "prio-low", "retries", "expires", "timeout"],
)
def test_set_validates_values(options: dict[str, Any]) -> None:
    with pytest.raises(EnqueueError, match=next(iter(options))):
        add.s(1, 2).set(**options)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_set_refuses_non_finite_durations(value: float) -> None:
    with pytest.raises(EnqueueError):
        add.s(1, 2).set(countdown=value)


def test_on_error_appends() -> None:
    s = add.s(1, 2).on_error(eb.s()).on_error(eb.s())
    assert len(s.errbacks) == 2
    assert add.s(1, 2).errbacks == ()


# -- composition --------------------------------------------------------------------


def test_pipe_makes_a_flat_chain() -> None:
    a, b, c = add.s(1, 2), inc.s(), inc.s()
    ch = a | b | c
    assert isinstance(ch, Chain)
    assert ch.steps == [a, b, c]
    assert chain(chain(a, b), chain(c)).steps == [a, b, c]
    assert (a | (b | c)).steps == [a, b, c]
    assert repr(ch) == "add.s(1, 2) | inc.s() | inc.s()"


def test_a_chain_with_an_errback_is_not_flattened() -> None:
    inner = chain(inc.s(), inc.s()).on_error(eb.s())
    outer = chain(add.s(1, 2), inner)
    assert outer.steps[1] is inner


def test_group_forms() -> None:
    a, b = add.s(1, 2), add.s(3, 4)
    assert group(a, b).members == [a, b]
    assert group([a, b]).members == [a, b]
    assert group(s for s in (a, b)).members == [a, b]
    assert group(a).members == [a]
    assert (a | group(b)).steps[1].members == [b]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "make",
    [chain, group, lambda: group([]), lambda: group(iter(())),
     lambda: chord([], tsum.s()), lambda: Chain([])],
    ids=["chain", "group", "group-list", "group-iter", "chord", "Chain"],
)
def test_empty_canvases_are_config_errors(make: Any) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        make()


def test_map_starmap_chunks_shapes() -> None:
    m = cmap(inc, [1, 2, 3])
    assert isinstance(m, Group)
    assert [(s.task, s.args) for s in m.members] == [(inc, (1,)), (inc, (2,)), (inc, (3,))]
    sm = starmap(add, [(1, 2), (3, 4)])
    assert [s.args for s in sm.members] == [(1, 2), (3, 4)]
    ch = chunks(tsum, range(10), 3)
    parts = [s.args[0] for s in ch.members]
    assert [x for part in parts for x in part] == list(range(10))
    assert len(parts) == 3
    assert all(isinstance(p, list) for p in parts)
    assert [len(p) for p in chunks(tsum, range(4), 10).members[0].args] == [1]
    with pytest.raises(ConfigError, match="n >= 1"):
        chunks(tsum, [1], 0)


def test_chunks_makes_exactly_n_tasks_when_there_are_enough_items() -> None:
    assert len(chunks(tsum, range(9), 4).members) == 4


def test_owner_is_the_runtime_of_the_first_task() -> None:
    assert chain(add.s(1, 2), inc.s()).owner is rt
    assert group(add.s(1, 2)).owner is rt
    assert chord([add.s(1, 2)], tsum.s()).owner is rt


# -- to_node ------------------------------------------------------------------------


def test_signature_node() -> None:
    node = cv.to_node(add.s(1, y=2), final="F")
    assert isinstance(node, SigNode)
    assert (node.id, node.task, node.args, node.kwargs) == ("F", "add", [1], {"y": 2})
    assert cv.final_id(node) == "F"
    other = cv.to_node(add.s(1, 2))
    assert other.id and other.id != cv.to_node(add.s(1, 2)).id


def test_chain_node_ids() -> None:
    node = cv.to_node(add.s(1, 2) | inc.s() | inc.s(), final="F")
    assert isinstance(node, ChainNode)
    assert node.id == "F"
    assert cv.final_id(node) == "F"
    assert node.steps[-1].id == "F"
    assert len({s.id for s in node.steps}) == 3


def test_a_group_followed_by_a_step_becomes_a_chord() -> None:
    node = cv.to_node(group(add.s(1, 2), add.s(3, 4)) | tsum.s(), final="F")
    assert isinstance(node, ChordNode)
    assert len(node.header) == 2
    assert isinstance(node.body, SigNode)
    assert node.body.task == "tsum"
    assert cv.final_id(node) == "F"
    assert node.id != "F"


def test_a_group_in_the_middle_of_a_pipeline() -> None:
    node = cv.to_node(add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s() | inc.s(), final="F")
    assert isinstance(node, ChainNode)
    kinds = [type(s) for s in node.steps]
    assert kinds == [SigNode, ChordNode, SigNode]
    assert cv.final_id(node) == "F"


def test_a_group_last_stays_a_group() -> None:
    node = cv.to_node(add.s(1, 1) | group(add.s(1), add.s(2)), final="F")
    assert isinstance(node, ChainNode)
    assert isinstance(node.steps[-1], GroupNode)
    assert node.steps[-1].id == "F"


def test_chord_node() -> None:
    node = cv.to_node(chord([add.s(1, 2), add.s(3, 4)], tsum.s()), final="F")
    assert isinstance(node, ChordNode)
    assert cv.final_id(node) == "F"
    assert cv.final_id(ChordNode(id="J", header=node.header)) == "J"


def test_arguments_are_checked_fully_first_and_partially_later() -> None:
    with pytest.raises(ArgumentsError, match="'y'"):
        cv.to_node(add.s(1))
    cv.to_node(add.s(1, 2) | add.s(5))  # the 2nd step gets the result as x
    with pytest.raises(ArgumentsError):
        cv.to_node(add.s(1, 2) | add.s("5"))
    with pytest.raises(ArgumentsError):
        cv.to_node(add.s(1, 2) | add.si(5))  # immutable: no result is prepended
    with pytest.raises(ArgumentsError):
        cv.to_node(group(add.s(1, 2), add.s(1)))
    cv.to_node(chord([add.s(1, 2)], tsum.s()))


@rt.task(name="fmt")
async def fmt(value: int, sep: str) -> str:
    return sep.join(str(value))


@rt.task(name="join")
async def join(items: list[int], sep: str) -> str:
    return sep.join(map(str, items))


@pytest.mark.parametrize("make", [lambda: add.s(1, 2) | fmt.s("-"),
                                  lambda: chord([add.s(1, 2), add.s(3, 4)], join.s(","))],
                         ids=["chain", "chord-body"])
def test_later_steps_are_checked_against_the_parameters_they_fill(make: Any) -> None:
    node = cv.to_node(make())
    assert node is not None
    with pytest.raises(ArgumentsError, match="'sep'"):
        cv.to_node(add.s(1, 2) | fmt.s(5))
    with pytest.raises(ArgumentsError):
        cv.to_node(add.s(1, 2) | add.s(5, 6))  # with the result, that is 3 arguments
    with pytest.raises(ArgumentsError):
        cv.to_node(chord([add.s(1, 2)], tsum.s([1])))  # the body gets the list as well: 2 args


# -- start: messages -------------------------------------------------------------------


def test_a_signature_starts_as_one_message_with_task_defaults() -> None:
    [m] = start(cv.to_node(inc.s(1), final="F"), now_ms=1_000)
    assert (m.id, m.task, m.args, m.queue, m.priority) == ("F", "inc", [1], "io", 3)
    assert m.root_id == "F"
    assert m.expires_ms == 1_000 + 60_000
    assert m.eta_ms is None
    assert (m.links, m.chord, m.downstream, m.errbacks, m.once) == ([], None, [], [], False)


def test_signature_options_reach_the_message() -> None:
    sig = inc.s(1).set(queue="q", priority=9, countdown=2.5, expires=10, retries=4, timeout=3)
    [m] = start(cv.to_node(sig), now_ms=1_000)
    assert (m.queue, m.priority, m.eta_ms, m.expires_ms, m.retries, m.timeout) == (
        "q", 9, 3_500, 11_000, 4, 3)


def test_overrides_win_over_signature_options() -> None:
    sig = inc.s(1).set(priority=9, queue="q")
    [m] = start(cv.to_node(sig), now_ms=0, overrides=TaskOptions(priority=1, countdown=1))
    assert (m.priority, m.queue, m.eta_ms) == (1, "q", 1000)


def test_prev_is_prepended_unless_immutable() -> None:
    [m] = start(cv.to_node(add.s(5), first=False), prev=1)
    assert m.args == [1, 5]
    [m] = start(cv.to_node(add.si(5, 6)), prev=1)
    assert m.args == [5, 6]


def test_a_chain_starts_with_its_first_step_carrying_the_rest() -> None:
    node = cv.to_node(add.s(1, 2) | inc.s() | inc.s(), final="F")
    assert isinstance(node, ChainNode)
    [m] = start(node)
    assert m.id == node.steps[0].id
    assert m.links == node.steps[1:]
    assert m.downstream == [node.steps[1].id, "F"]
    assert m.root_id == m.id


def test_a_group_starts_all_members_joining_into_it() -> None:
    node = cv.to_node(group(add.s(1, 2), add.s(3, 4), add.s(5, 6)), final="G")
    msgs = start(node)
    assert [m.args for m in msgs] == [[1, 2], [3, 4], [5, 6]]
    assert all(m.chord is not None for m in msgs)
    assert [(m.chord.id, m.chord.index, m.chord.size, m.chord.body) for m in msgs if m.chord] == [
        ("G", 0, 3, None), ("G", 1, 3, None), ("G", 2, 3, None)]
    assert all(m.downstream == ["G"] for m in msgs)


def test_a_chord_starts_its_header_with_the_body_in_the_ref() -> None:
    node = cv.to_node(chord([add.s(1, 2), add.s(3, 4)], tsum.s()), final="F")
    assert isinstance(node, ChordNode)
    msgs = start(node)
    assert len(msgs) == 2
    for i, m in enumerate(msgs):
        assert m.chord is not None
        assert (m.chord.id, m.chord.index, m.chord.size) == (node.id, i, 2)
        assert m.chord.body == node.body
        assert m.downstream == [node.id, "F"]


def test_a_chord_inside_a_chain_carries_the_rest_on_its_join() -> None:
    node = cv.to_node(add.s(1, 2) | chord([add.s(1), add.s(2)], tsum.s()) | inc.s(), final="F")
    assert isinstance(node, ChainNode)
    [first] = start(node)
    assert isinstance(first.links[0], ChordNode)
    assert first.downstream == [node.steps[1].body.id, "F"]  # type: ignore[union-attr]
    # what the worker does when the first step finishes with 3
    header = start(first.links[0], prev=3, links=first.links[1:])
    assert [m.args for m in header] == [[3, 1], [3, 2]]
    for m in header:
        assert m.chord is not None
        assert m.chord.links == [node.steps[2]]
        assert "F" in m.downstream


def test_nested_joins_point_outwards() -> None:
    inner = chord([add.s(1, 2), add.s(3, 4)], tsum.s())
    node = cv.to_node(chord([inner, add.s(5, 6)], tsum.s()), final="F")
    msgs = start(node)
    assert len(msgs) == 3
    inner_ref = msgs[0].chord
    assert inner_ref is not None and inner_ref.outer is not None
    assert inner_ref.outer.id == node.id
    assert inner_ref.outer.index == 0
    assert msgs[2].chord is not None and msgs[2].chord.outer is None
    assert "F" in msgs[0].downstream  # a deep failure reaches the outermost waiter


def test_group_of_chains() -> None:
    node = cv.to_node(group(add.s(1, 2) | inc.s(), add.s(3, 4) | inc.s()), final="G")
    msgs = start(node)
    assert len(msgs) == 2
    for m in msgs:
        assert len(m.links) == 1
        assert m.chord is not None and m.chord.id == "G"
        assert m.downstream == [m.links[0].id, "G"]


def test_errbacks_ride_on_every_message_that_can_fail() -> None:
    node = cv.to_node((add.s(1, 2) | inc.s()).on_error(eb.s()), final="F")
    [m] = start(node)
    assert [e.task for e in m.errbacks] == ["eb"]
    assert node.steps[1].errbacks == m.errbacks  # type: ignore[union-attr]
    ch = cv.to_node(chord([add.s(1, 2), add.s(3, 4)], tsum.s()).on_error(eb.s()))
    ids = {e.id for m in start(ch) for e in m.errbacks}
    assert len(ids) == 1  # one errback id: it can run once however many members fail


def test_start_refuses_an_unknown_task() -> None:
    with pytest.raises(UnknownTaskError):
        cv.start(SigNode(id="x", task="nope"), rt.registry)


def test_the_hot_path_message_matches_the_general_one() -> None:
    message_for = cv.message_for
    sig = inc.s(1).set(priority=9)
    fast = message_for(sig, task_id="F")
    slow = start(cv.to_node(sig, final="F"), now_ms=0)[0]
    assert (fast.id, fast.task, fast.args, fast.kwargs, fast.queue, fast.priority) == (
        slow.id, slow.task, slow.args, slow.kwargs, slow.queue, slow.priority)
    with pytest.raises(ArgumentsError):
        message_for(add.s(1))


def test_signature_and_canvas_classes_are_composable() -> None:
    for c in (add.s(1, 2), chain(add.s(1, 2)), group(add.s(1, 2)), chord([add.s(1, 2)], tsum.s())):
        assert isinstance(c | inc.s(), Chain)
    assert isinstance(Chord([add.s(1, 2)], tsum.s()), Chord)
    assert isinstance(add.s(1, 2), Signature)


@pytest.mark.parametrize("options", [dict(queue=5), dict(priority="high"), dict(retries=1.5)],
                         ids=["queue", "priority", "retries"])
def test_set_checks_option_types(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        add.s(1, 2).set(**options)
