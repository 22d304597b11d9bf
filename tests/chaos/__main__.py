"""``python -m tests.chaos --minutes N --broker redis|amqp`` (see tests/chaos/__init__.py)."""

import sys

from tests.chaos import main

sys.exit(main())
