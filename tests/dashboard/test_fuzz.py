"""schemathesis fuzzes the API from its own OpenAPI document: no 500, ever.

Cases are drawn (bounded: 25 per operation) from schemathesis' strategies,
then sent to the app through httpx's ASGI transport against the runtime on
the shared Redis (so the server runs in the test's own event loop)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core import NotSet

from runtime.dashboard.openapi import openapi
from tests.dashboard.conftest import Env

pytestmark = [pytest.mark.redis, pytest.mark.slow]

_STREAMS = ("/api/events", "/metrics")   # not JSON: tested elsewhere


def draw_cases(limit: int = 25) -> list[Any]:
    schema = schemathesis.openapi.from_dict(openapi())
    cases: list[Any] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in _STREAMS:
            continue

        @settings(max_examples=limit, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def collect(case: Any) -> None:
            cases.append(case)

        collect()
    return cases


async def test_no_500_from_the_openapi_document(env: Env) -> None:
    cases = draw_cases()
    assert len(cases) > 100
    failures = []
    for case in cases:
        kw: dict[str, Any] = {"headers": env.admin}
        if case.query:
            kw["params"] = case.query
        if not isinstance(case.body, NotSet):
            kw["json"] = case.body
        r = await env.client.request(case.method, case.formatted_path, **kw)
        if r.status_code == 500 or not r.headers["content-type"].startswith("application/json"):
            failures.append(f"{case.method} {case.formatted_path} {kw} -> {r.status_code} "
                            f"{r.text[:200]}")
    assert failures == []
