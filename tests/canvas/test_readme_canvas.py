"""The README's Canvas examples, run verbatim on every broker.

``README_LINES`` are copied from README.md; the test checks that each still
appears in README.md and in the body of the test below (so the code that
runs is the code the README shows), then runs them with tasks named as in
the README.
"""

from __future__ import annotations

import collections
import inspect
from pathlib import Path
from typing import Any

import anyio

from runtime import Runtime
from tests.canvas.tasks import LIMIT

README = Path(__file__).resolve().parents[2] / "README.md"

README_LINES = [
    "from runtime import chain, group, chord, run",
    "total = await run(chain(fetch.s(url), parse.s(), store.s()))      # each result feeds the next",
    "sizes = await run(group(fetch.s(u) for u in urls))                 # a list, in order",
    "report = await run(chord((fetch.s(u) for u in urls), summarize.s()))  # summarize(results) once",
    "pipeline = fetch.s(url) | parse.s() | group(index.s(), thumb.s())  # `|` chains",
]

PAGES = {
    "https://a.example/": "alpha beta gamma",
    "https://b.example/": "delta",
    "https://c.example/": "epsilon zeta",
}


class Site:
    """The README's tasks: fetch a page, parse it into words, store, summarize,
    index and thumbnail. ``runs`` counts executions per task."""

    def __init__(self, rt: Runtime) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.stored: list[list[str]] = []
        runs = self.runs

        @rt.task
        async def fetch(url: str) -> int:
            """The size of the page."""
            runs["fetch"] += 1
            return len(PAGES[url])

        @rt.task
        async def parse(size: int) -> list[str]:
            runs["parse"] += 1
            return [f"chunk{i}" for i in range(size // 5)]

        @rt.task
        async def store(chunks: list[str]) -> int:
            runs["store"] += 1
            self.stored.append(chunks)
            return len(chunks)

        @rt.task
        async def summarize(sizes: list[int]) -> dict[str, Any]:
            runs["summarize"] += 1
            return {"pages": len(sizes), "bytes": sum(sizes), "sizes": sizes}

        @rt.task
        async def index(chunks: list[str]) -> int:
            runs["index"] += 1
            return len(chunks)

        @rt.task
        async def thumb(chunks: list[str]) -> str:
            runs["thumb"] += 1
            return chunks[0]

        self.fetch, self.parse, self.store, self.summarize = fetch, parse, store, summarize
        self.index, self.thumb = index, thumb


async def test_the_readme_canvas_lines_are_still_in_the_readme() -> None:
    readme = README.read_text()
    source = inspect.getsource(test_the_readme_canvas_examples_run)
    for line in README_LINES:
        assert line in readme, f"README.md no longer shows {line!r}: update {__file__}"
        assert line in source, f"{line!r} is not run verbatim by the test"


async def test_the_readme_canvas_examples_run(rt: Runtime) -> None:
    site = Site(rt)
    fetch, parse, store, summarize = site.fetch, site.parse, site.store, site.summarize
    index, thumb = site.index, site.thumb
    url = "https://a.example/"
    urls = list(PAGES)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            from runtime import chain, group, chord, run  # noqa: I001 - as in the README

            total = await run(chain(fetch.s(url), parse.s(), store.s()))      # each result feeds the next
            sizes = await run(group(fetch.s(u) for u in urls))                 # a list, in order
            report = await run(chord((fetch.s(u) for u in urls), summarize.s()))  # summarize(results) once
            pipeline = fetch.s(url) | parse.s() | group(index.s(), thumb.s())  # `|` chains
            piped = await run(pipeline)
            await worker.idle()
    assert total == 3  # 16 bytes -> 3 chunks stored
    assert site.stored == [["chunk0", "chunk1", "chunk2"]]
    assert sizes == [16, 5, 12]
    assert report == {"pages": 3, "bytes": 33, "sizes": [16, 5, 12]}
    assert site.runs["summarize"] == 1
    assert piped == [3, "chunk0"]
    assert site.runs["fetch"] == 1 + 3 + 3 + 1
