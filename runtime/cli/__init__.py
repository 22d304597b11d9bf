"""The ``taskloom`` command (``taskloom = "runtime.cli:main"``): the commands
live in :mod:`runtime.cli.commands`, the demo pipeline in
:mod:`runtime.cli.demo`. Nothing imports this package."""

from runtime.cli import dashboard, limits, ops, schedules
from runtime.cli.commands import main

for _module in (ops, schedules, limits, dashboard):
    _module.register(main)

__all__ = ["main"]
