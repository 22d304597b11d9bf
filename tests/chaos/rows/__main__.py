"""``python -m tests.chaos.rows --row H1|H2 --broker redis|amqp`` (see tests/chaos/rows/__init__.py)."""

import sys

from tests.chaos.rows import main

sys.exit(main())
