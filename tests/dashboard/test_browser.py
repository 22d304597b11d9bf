"""The web UI in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against a live dashboard served by uvicorn with a worker on Redis:
every page opens, a task submitted from the UI goes STARTED (with its progress)
then SUCCESS live, a failure is retried, a dead letter replayed, the worker is
online with what it runs. Screenshots go to tests/dashboard/screenshots/."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from runtime.dashboard import dashboard_app
from runtime.process.liveness import publish_heartbeats, store_for
from tests.conftest import require_tool
from tests.dashboard.conftest import GATES, make_runtime, purge, redis_up

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SHOTS = Path(__file__).with_name("screenshots")
README_SHOT = Path(__file__).parents[2] / "docs" / "dashboard-overview.png"
WAIT_S = 60   # generous: the machine is shared; the point is "it happens live", not how fast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def live_dashboard(namespace: str, key_file: Path) -> AsyncIterator[str]:
    rt = make_runtime(namespace)
    port = free_port()
    store = store_for(rt)
    server = uvicorn.Server(uvicorn.Config(dashboard_app(rt, api_keys=key_file), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=2))
    try:
        # entered here first, so the runtime is closed in this task (uvicorn runs the
        # app's lifespan, which enters it too, in a task of its own)
        async with rt, anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            try:
                with anyio.fail_after(WAIT_S):
                    while not server.started:
                        await anyio.sleep(0.05)
                async with rt.worker(concurrency=4) as worker, anyio.create_task_group() as beats:
                    # heartbeats as `taskloom worker` publishes them: a live worker online
                    await beats.start(functools.partial(publish_heartbeats, store, worker,
                                                        interval_s=1.0))
                    try:
                        yield f"http://127.0.0.1:{port}/"
                    finally:
                        beats.cancel_scope.cancel()
            finally:
                server.should_exit = True   # a graceful stop: the lifespan ends before rt
    finally:
        await store.aclose()
        await purge(namespace)


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium", "apt-get install -y chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    service = webdriver.ChromeService(
        executable_path=require_tool("chromedriver", "apt-get install -y chromium-driver"))
    return webdriver.Chrome(options=options, service=service)


def flow(base: str, key: str, gate: str, release: Callable[[], None]) -> None:
    SHOTS.mkdir(exist_ok=True)
    driver = chromium()
    wait = WebDriverWait(driver, WAIT_S)

    def state_is(text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.ID, "task-state"), text))

    def text_in(element_id: str, text: str) -> None:
        """Waits, as the page re-renders on live events (an element read once may be
        replaced by the time its text is read)."""
        wait.until(ec.text_to_be_present_in_element((By.ID, element_id), text))

    def click(element_id: str) -> None:
        """Clicks once the element is there, finding it again if a live re-render
        replaced it between the find and the click."""
        def done(d: Any) -> bool:
            try:
                d.find_element(By.ID, element_id).click()
            except (StaleElementReferenceException, NoSuchElementException):
                return False
            return True
        wait.until(done)

    def accept_confirm() -> None:
        wait.until(ec.alert_is_present()).accept()

    try:
        driver.get(base)
        wait.until(ec.visibility_of_element_located((By.ID, "key-input"))).send_keys(key)
        driver.find_element(By.ID, "key-save").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "live"), "live"))
        assert "tlk_" not in driver.current_url
        assert driver.execute_script("return document.cookie") == ""
        # submit from the UI; the detail page follows it live (SSE): STARTED with its
        # progress while the task waits on its gate, then SUCCESS once it is opened
        wait.until(ec.visibility_of_element_located((By.ID, "submit-name"))).send_keys("tasks.steps")
        driver.find_element(By.ID, "submit-args").send_keys(f'["{gate}", 3]')
        driver.find_element(By.ID, "submit-btn").click()
        wait.until(ec.url_contains("#/task/"))
        state_is("STARTED")
        text_in("task-progress", "3 / 3 step 3")
        driver.save_screenshot(str(SHOTS / "task-started.png"))
        driver.get(base + "#/workers")   # the worker runs it now
        text_in("workers-table", "tasks.steps")
        driver.save_screenshot(str(SHOTS / "workers-running.png"))
        driver.back()
        state_is("STARTED")
        release()
        state_is("SUCCESS")
        text_in("task-result", "3")
        text_in("task-attempts", "SUCCESS")
        driver.save_screenshot(str(SHOTS / "task.png"))
        # a failure, retried from its page
        driver.get(base + "#/overview")
        wait.until(ec.visibility_of_element_located((By.ID, "submit-name"))).send_keys("tasks.boom")
        driver.find_element(By.ID, "submit-args").send_keys('["from the ui"]')
        driver.find_element(By.ID, "submit-btn").click()
        state_is("FAILURE")
        text_in("task-traceback", "boom: from the ui")
        failed_url = driver.current_url
        click("retry-btn")
        wait.until(lambda d: d.current_url != failed_url)
        state_is("FAILURE")   # the retry ran (and failed again, as the task always does)
        # a dead letter replayed, with confirmation
        driver.get(base + "#/dead")
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#dead-table .replay-one"))).click()
        accept_confirm()
        wait.until(ec.url_contains("#/task/"))
        state_is("FAILURE")
        driver.get(base + "#/dead")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#dead-table tbody tr")))
        driver.save_screenshot(str(SHOTS / "dead.png"))
        # every page opens
        for page, marker in (("queues", "queues-table"), ("tasks", "tasks-table"),
                             ("workers", "workers-table"), ("schedules", "schedules-table")):
            driver.get(base + "#/" + page)
            wait.until(ec.presence_of_element_located((By.ID, marker)))
            driver.save_screenshot(str(SHOTS / f"{page}.png"))
        driver.get(base + "#/overview")
        text_in("workers-online", "1")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".chart path")))
        wait.until(lambda d: len(d.find_element(By.CSS_SELECTOR, ".chart path")
                                 .get_attribute("d") or "") > 20)   # a few live snapshots drawn
        driver.save_screenshot(str(SHOTS / "overview.png"))
        if os.environ.get("TASKLOOM_UPDATE_README_SHOT"):   # refresh the README's picture
            shutil.copyfile(SHOTS / "overview.png", README_SHOT)
    finally:
        driver.quit()


async def test_ui_in_headless_chromium(namespace: str, key_file: tuple[Path, str, str]) -> None:
    await redis_up()
    path, admin, _ = key_file
    gate = uuid.uuid4().hex
    opened = GATES.setdefault(gate, anyio.Event())

    def release() -> None:   # from the browser's thread: open the gate in the event loop
        anyio.from_thread.run_sync(opened.set)

    async with live_dashboard(namespace, path) as base:
        try:
            await anyio.to_thread.run_sync(flow, base, admin, gate, release)
        finally:
            opened.set()
