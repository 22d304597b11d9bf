"""``python -m runtime.cli``: the ``taskloom`` command (how the supervisor starts its children)."""

from runtime.cli import main

main()
