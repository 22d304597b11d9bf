"""Every numbered promise of ``brokers/base.py`` is proved by a contract test on every
broker of the contract suite (memory, Redis, RabbitMQ).

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
from tests.contract.conftest import BROKERS
from tests.contract.helpers import KNOWN_BROKEN

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
