"""The web UI in headless Chromium (as tests/dashboard/test_browser.py): a task
page shows its canvas (parent, root, children with states and links, and every
task under the root), and "Cancel matching…" on the tasks page confirms with
the number of pending tasks that match, then shows what it cancelled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from runtime import chain, group
from tests.dashboard.conftest import make_runtime, redis_up
from tests.dashboard.test_browser import SHOTS, WAIT_S, chromium, live_dashboard

pytestmark = [pytest.mark.redis, pytest.mark.slow]

HOLD = "hold"   # a queue no worker serves: its tasks stay pending until cancelled


async def until(client: httpx.AsyncClient, path: str, check: Any) -> Any:
    """GET ``path`` until ``check(json)`` holds (the index writes in batches)."""
    with anyio.fail_after(WAIT_S):
        while True:
            r = await client.get(path)
            if r.status_code == 200 and check(r.json()):
                return r.json()
            await anyio.sleep(0.05)


def flow(base: str, key: str, step: str, root: str, leaves: list[str]) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver = chromium()
    wait = WebDriverWait(driver, WAIT_S)

    def text_in(element_id: str, text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.ID, element_id), text))

    try:
        driver.get(base)
        wait.until(ec.visibility_of_element_located((By.ID, "key-input"))).send_keys(key)
        driver.find_element(By.ID, "key-save").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
        # the middle step of chain(a, b, group(c, d)): parent and root a, children c and d
        driver.get(base + "#/task/" + step)
        text_in("task-parent", root)
        text_in("task-root", root)
        for leaf in leaves:
            text_in("task-children", leaf)
        text_in("task-children", "SUCCESS")
        text_in("task-members", step)
        driver.save_screenshot(str(SHOTS / "task-canvas.png"))
        # a child's link leads to its page, whose parent is the step
        driver.find_element(By.CSS_SELECTOR, f'#task-children a[href="#/task/{leaves[0]}"]').click()
        wait.until(ec.url_contains(leaves[0]))
        text_in("task-parent", step)
        # the root's page lists its child (the step) and all three under it
        driver.get(base + "#/task/" + root)
        text_in("task-children", step)
        for leaf in leaves:
            text_in("task-members", leaf)
        # cancel by filter: the confirmation counts, the page shows the outcome
        driver.get(base + "#/tasks")
        box = wait.until(ec.visibility_of_element_located(
            (By.CSS_SELECTOR, '#task-filters input[name="queue"]')))
        box.send_keys(HOLD)
        driver.find_element(By.ID, "cancel-matching").click()
        alert = wait.until(ec.alert_is_present())
        assert "Cancel 3 pending task(s) of queue hold" in alert.text, alert.text
        alert.accept()
        text_in("cancel-result", "Cancelled 3 of 3 matching task(s) of queue hold")
        text_in("tasks-table", "REVOKED")
        driver.save_screenshot(str(SHOTS / "cancel-matching.png"))
        # nothing matches now: a message, no confirmation
        driver.find_element(By.ID, "cancel-matching").click()
        text_in("toast", "no pending task matches queue hold")
    finally:
        driver.quit()


async def test_canvas_and_cancel_by_filter_in_chromium(namespace: str,
                                                      key_file: tuple[Path, str, str]) -> None:
    await redis_up()
    path, admin, _ = key_file
    async with live_dashboard(namespace, path) as base, \
            httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin}"}) as api:
        producer = make_runtime(namespace)
        add = producer.registry["tasks.add"]
        async with producer:
            await producer.enqueue(chain(add.s(1, 2), add.partial(3),
                                         group(add.partial(10), add.partial(20))))
        done = await until(api, "/api/tasks?name=tasks.add&state=SUCCESS&limit=50",
                           lambda j: len(j["items"]) == 4)
        by_parent: dict[str, list[str]] = {}
        for t in done["items"]:
            by_parent.setdefault(t.get("parent_id", ""), []).append(t["id"])
        root = by_parent[""][0]
        step = by_parent[root][0]
        leaves = sorted(by_parent[step])
        held = set()
        for _ in range(3):
            r = await api.post("/api/tasks", json={"name": "tasks.slow", "args": [30],
                                                   "options": {"queue": HOLD, "countdown": 600}})
            held.add(r.json()["id"])
        await until(api, f"/api/tasks?queue={HOLD}",
                    lambda j: {t["id"] for t in j["items"]} == held)
        await anyio.to_thread.run_sync(flow, base, admin, step, root, leaves)
        for task_id in held:
            t = (await api.get(f"/api/tasks/{task_id}")).json()
            assert t["state"] == "REVOKED", t
