"""One role of one framework's benchmark, run inside that framework's environment.

    python driver.py FRAMEWORK ROLE CONFIG_JSON

imports ``FRAMEWORK_app`` from this directory and calls ``ROLE(**config)``. The
app module reads its broker, queue and settings from ``BENCH_*`` environment
variables (set by benchmarks/harness.py). The role's outcome is printed as one
line, ``BENCH-RESULT {json}``, on stdout; a failure exits non-zero with the
traceback on stderr. Standard library only: this runs in the peers' venvs.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import traceback

RESULT_PREFIX = "BENCH-RESULT "


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    framework, role, config = argv[1], argv[2], json.loads(argv[3])
    try:
        app = importlib.import_module(f"{framework}_app")
        fn = getattr(app, role, None)
        if fn is None:
            raise SystemExit(f"{framework}_app has no role {role!r}")
        out = dict(fn(**config))
    except Exception:
        traceback.print_exc()
        return 1
    out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(RESULT_PREFIX + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # some clients leave non-daemon threads behind (result listeners, pools):
    # the role is over, so leave without waiting for them
    os._exit(code)
