"""An application that crashes every process that imports it (crash-loop test)."""

from __future__ import annotations

import os

from tests.supervisor.app import ledger

ledger("IMPORT")
os._exit(7)
