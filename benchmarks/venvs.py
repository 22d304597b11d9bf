"""One virtual environment per peer framework, under benchmarks/venvs/ (gitignored).

A venv is made with ``python -m venv`` from this interpreter's base Python (so
every framework runs on the same CPython) and the peer is installed with pip.
It is reused while its requirement list and Python version are unchanged (a
stamp file records them); the first run installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.config import VENVS_DIR

__all__ = ["VenvError", "ensure_venv", "installed_versions", "venv_python", "venv_ready"]

_STAMP = ".taskloom-bench.json"


class VenvError(RuntimeError):
    """A framework's virtual environment could not be made."""


def venv_python(name: str, root: Path = VENVS_DIR) -> Path:
    return root / name / "bin" / "python"


def _spec(requirements: Sequence[str]) -> dict[str, object]:
    return {"requirements": sorted(requirements),
            "python": sys.version.split()[0],
            "base": sys.base_prefix}


def venv_ready(name: str, requirements: Sequence[str], *, root: Path = VENVS_DIR) -> bool:
    """Whether ``root/name`` exists with exactly ``requirements`` on this Python."""
    stamp = root / name / _STAMP
    if not (venv_python(name, root).exists() and stamp.exists()):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == _spec(requirements))
    except (OSError, ValueError):
        return False


def ensure_venv(name: str, requirements: Sequence[str], *, root: Path = VENVS_DIR,
                rebuild: bool = False, timeout_s: float = 900.0) -> Path:
    """The python of ``root/name`` with ``requirements`` installed (made if needed)."""
    home = root / name
    stamp = home / _STAMP
    spec = _spec(requirements)
    python = venv_python(name, root)
    if not rebuild and venv_ready(name, requirements, root=root):
        return python
    if home.exists():
        shutil.rmtree(home)
    root.mkdir(parents=True, exist_ok=True)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    creator = str(base) if base.exists() else sys.executable
    steps = [
        [creator, "-m", "venv", str(home)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *requirements],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise VenvError(f"{' '.join(step[:4])} … did not finish within {timeout_s:.0f}s; "
                            "check the network access to the package index") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise VenvError(
                f"making the {name} venv failed at `{' '.join(step[:4])} …`: "
                + " | ".join(tail)
                + f" — fix the cause, then run again (or delete {home})")
    stamp.write_text(json.dumps(spec, indent=1))
    return python


def installed_versions(python: Path | str, distributions: Sequence[str]) -> dict[str, str]:
    """The installed versions of ``distributions`` in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", code, *distributions], capture_output=True,
                              text=True, timeout=60, check=True)
        versions: dict[str, str] = json.loads(done.stdout)
    except (subprocess.SubprocessError, OSError, ValueError):
        return {}
    return versions

