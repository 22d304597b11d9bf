"""Every command the README shows is registered on the installed ``taskloom``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_taskloom_command_in_the_readme_exists() -> None:
    shown = set(re.findall(r"^taskloom ([a-z][a-z-]+)", README.read_text(), flags=re.M))
    assert {"worker", "tasks", "inspect", "schedules", "dashboard", "keys"} <= shown
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "--help"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    listed = set(re.findall(r"^  ([a-z][a-z-]+)\s", out, flags=re.M))
    assert shown <= listed, f"in the README but not registered: {sorted(shown - listed)}"
