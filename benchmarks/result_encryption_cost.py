"""What encrypting results costs the memory result store: ``put`` then
``get`` of one SUCCESS result, µs per call, without and with a keyring.

    python -m benchmarks.result_encryption_cost

Best of 9 interleaved rounds of 20,000 puts and 20,000 gets (fresh ids each
round), for a small value (16 bytes) and a 4 KiB one. The memory store keeps
results encoded as a remote store would, so this is the encode / decode and
seal / open cost a Redis store pays too, without the network.
"""

from __future__ import annotations

import os
import time

import anyio

from runtime.encryption import Keyring
from runtime.messages import Result, State
from runtime.results import MemoryResultStore

ROUNDS = 9
N = 20_000


async def _round(store: MemoryResultStore, value: str, tag: str) -> tuple[float, float]:
    results = [Result(id=f"{tag}-{i}", state=State.SUCCESS, value=value, task="bench.t")
               for i in range(N)]
    start = time.perf_counter()
    for result in results:
        await store.put(result)
    put = time.perf_counter() - start
    start = time.perf_counter()
    for result in results:
        await store.get(result.id)
    get = time.perf_counter() - start
    return put / N * 1e6, get / N * 1e6


async def main() -> None:
    keyring = Keyring({"k1": os.urandom(32)})
    for label, value in (("16 B", "x" * 16), ("4 KiB", "x" * 4096)):
        best: dict[str, list[float]] = {"off": [1e9, 1e9], "on": [1e9, 1e9]}
        for r in range(ROUNDS):
            for mode in ("off", "on"):
                store = MemoryResultStore()
                if mode == "on":
                    store.use_keyring(keyring)
                put, get = await _round(store, value, f"{mode}{r}")
                best[mode] = [min(best[mode][0], put), min(best[mode][1], get)]
        for mode, (put, get) in best.items():
            print(f"value {label:>5}  encryption {mode:>3}: put {put:5.2f} µs  get {get:5.2f} µs")


if __name__ == "__main__":
    anyio.run(main)
