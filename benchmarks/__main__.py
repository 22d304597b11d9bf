"""``python -m benchmarks``: the benchmark suite's command (``taskloom bench`` in a checkout)."""

from benchmarks.cli import bench

bench()
