"""Every numbered promise of ``brokers/base.py`` is proved by a contract test on every
broker of the contract suite (memory, Redis, RabbitMQ), and every numbered promise of
``runtime/results/base.py`` by a test of ``tests/results_contract`` on every result
store (memory, Redis), tagged ``@pytest.mark.result_promise(n, ...)`` and taking a
fixture that runs it on each store (``store``, ``open_store``, ``peer``, ``kind``).

A contract test says which promises it proves with ``@pytest.mark.promise(n, ...)``
(on the function or as the module's ``pytestmark``) and runs on every broker by taking
the ``broker`` fixture. Only ``tests/contract`` counts: a test in a transport-specific
folder proves something about one broker, not the contract. A (broker, promise) cell
listed in ``tests.contract.helpers.KNOWN_BROKEN`` is not proved (its tests are strict
xfails), so its cell here is a strict xfail too, with the same reason.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import brokers.base
import runtime.results.base
from tests.contract.conftest import BROKERS
from tests.contract.helpers import KNOWN_BROKEN
from tests.results_contract.conftest import STORES

CONTRACT_DIR = Path(__file__).parent / "contract"
KINDS = [str(p.values[0]) for p in BROKERS]
#: The numbers of the promises, read from the contract in brokers/base.py itself.
PROMISES = [int(n) for n in re.findall(r"^(\d+)\. ", brokers.base.__doc__ or "", re.M)]


def _marks(obj: Any) -> list[pytest.Mark]:
    marks = getattr(obj, "pytestmark", [])
    return list(marks) if isinstance(marks, list) else [marks]


def contract_tests() -> list[tuple[str, set[int], bool]]:
    """(test id, promises it is tagged with, runs on every broker) of every test
    function in tests/contract."""
    found = []
    for path in sorted(CONTRACT_DIR.glob("test_*.py")):
        module = importlib.import_module(f"tests.contract.{path.stem}")
        for name, fn in vars(module).items():
            if not (name.startswith("test_") and inspect.isfunction(fn)):
                continue
            promises = {int(n) for m in _marks(module) + _marks(fn) if m.name == "promise"
                        for n in m.args}
            takes_broker = "broker" in inspect.signature(fn).parameters
            found.append((f"{path.name}::{name}", promises, takes_broker))
    return found


def proofs() -> dict[tuple[str, int], list[str]]:
    cells: dict[tuple[str, int], list[str]] = defaultdict(list)
    for test, promises, takes_broker in contract_tests():
        if not takes_broker:
            continue
        for kind in KINDS:
            for n in promises:
                if (kind, n) not in KNOWN_BROKEN:
                    cells[kind, n].append(test)
    return cells


def test_the_contract_numbers_its_promises_and_the_suite_covers_every_broker() -> None:
    # the parse of brokers/base.py found the promises 1..N (so none is missed here)
    assert len(PROMISES) >= 10 and sorted(PROMISES) == list(range(1, len(PROMISES) + 1)), PROMISES
    assert set(KINDS) == {"memory", "redis", "amqp"}, KINDS


def test_every_promise_tag_names_a_promise_on_a_test_that_runs_on_every_broker() -> None:
    for test, promises, takes_broker in contract_tests():
        assert promises <= set(PROMISES), f"{test} is tagged with an unknown promise {promises}"
        assert not promises or takes_broker, (
            f"{test} is tagged {sorted(promises)} but does not take the `broker` fixture, "
            f"so it runs on no broker of the contract suite")


def _cells() -> list[Any]:
    cells = []
    for kind in KINDS:
        for n in PROMISES:
            reason = KNOWN_BROKEN.get((kind, n))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cells.append(pytest.param(kind, n, id=f"{kind}-promise{n}", marks=marks))
    return cells


@pytest.mark.parametrize(("kind", "promise"), _cells())
def test_every_promise_has_a_contract_test_on_every_broker(kind: str, promise: int) -> None:
    assert proofs()[kind, promise], (
        f"promise {promise} of brokers/base.py has no contract test on the {kind} broker: "
        f"tag the test(s) in tests/contract that prove it with @pytest.mark.promise({promise})")


# -- the result stores: runtime/results/base.py numbers its promises too --------------------

RESULTS_DIR = Path(__file__).parent / "results_contract"
STORE_KINDS = [str(p.values[0]) for p in STORES]
#: fixtures that run a test on every store of the suite (memory and Redis)
STORE_FIXTURES = {"store", "open_store", "peer", "kind"}
RESULT_PROMISES = [int(n) for n in
                   re.findall(r"^(\d+)\. ", runtime.results.base.__doc__ or "", re.M)]


@pytest.fixture(autouse=True)
def _result_promise_marker(request: pytest.FixtureRequest) -> None:
    """Registered here too: this file imports the result-store tests without
    collecting tests/results_contract (whose conftest registers the marker)."""
    request.config.addinivalue_line("markers", "result_promise(*numbers): see "
                                    "tests/results_contract/conftest.py")


def result_contract_tests() -> list[tuple[str, set[int], bool]]:
    """(test id, result promises it is tagged with, runs on every store) of every
    test function in tests/results_contract."""
    found = []
    for path in sorted(RESULTS_DIR.glob("test_*.py")):
        module = importlib.import_module(f"tests.results_contract.{path.stem}")
        for name, fn in vars(module).items():
            if not (name.startswith("test_") and inspect.isfunction(fn)):
                continue
            promises = {int(n) for m in _marks(module) + _marks(fn) if m.name == "result_promise"
                        for n in m.args}
            every_store = bool(STORE_FIXTURES & set(inspect.signature(fn).parameters))
            found.append((f"{path.name}::{name}", promises, every_store))
    return found


def test_the_result_store_numbers_its_promises_and_the_suite_covers_every_store() -> None:
    assert len(RESULT_PROMISES) >= 10, RESULT_PROMISES
    assert sorted(RESULT_PROMISES) == list(range(1, len(RESULT_PROMISES) + 1)), RESULT_PROMISES
    assert set(STORE_KINDS) == {"memory", "redis"}, STORE_KINDS


def test_every_result_promise_tag_names_a_promise_on_a_test_that_runs_on_every_store() -> None:
    for test, promises, every_store in result_contract_tests():
        assert promises <= set(RESULT_PROMISES), f"{test} is tagged with an unknown {promises}"
        assert not promises or every_store, (
            f"{test} is tagged result_promise{sorted(promises)} but takes none of the "
            f"fixtures {sorted(STORE_FIXTURES)}, so it runs on one store only")


@pytest.mark.parametrize(("kind", "promise"), [
    pytest.param(kind, n, id=f"{kind}-result-promise{n}")
    for kind in STORE_KINDS for n in RESULT_PROMISES])
def test_every_result_promise_has_a_contract_test_on_every_store(kind: str, promise: int) -> None:
    proved = [test for test, promises, every_store in result_contract_tests()
              if every_store and promise in promises]
    assert proved, (
        f"promise {promise} of runtime/results/base.py has no contract test on the {kind} "
        f"store: tag the test(s) in tests/results_contract that prove it with "
        f"@pytest.mark.result_promise({promise})")
