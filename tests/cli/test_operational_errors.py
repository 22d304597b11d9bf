"""The CLI never prints a traceback for an operational error (issue 12.7): a
server down, an application that cannot be imported, a bad URL. Each is one
line saying what failed and what to do, and exit code 1, for every subcommand.

Subprocesses, as a user runs the command (the CLI configures logging for its
whole process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.process.serve import EXIT_CONFIG
from tests.conftest import AMQP_URL

DOWN_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
DOWN_AMQP = "amqp://guest:s3cret-pw@127.0.0.1:1/"

#: A server that cannot be reached: every command exits EXIT_CONFIG (1), except
#: that ``taskloom worker`` may exit 5 (EXIT_UNREACHABLE of runtime.process.serve: try
#: again later; a supervisor restarts such a child with backoff).
UNREACHABLE = {"worker": (EXIT_CONFIG, 5)}

COMMANDS = {  # every subcommand that takes APP, with the options it needs
    "status": [],
    "dlq": ["--queue", "default"],
    "purge": ["--queue", "default", "--yes"],
    "worker": ["--heartbeat", "0", "--pool-size", "0"],
}


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    """A directory of small applications, each broken in one way."""
    def write(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))

    write("redis_down", f"""
        from runtime import Runtime
        rt = Runtime("{DOWN_REDIS}")
    """)
    write("amqp_down", f"""
        from runtime import Runtime
        rt = Runtime("{DOWN_AMQP}", results="{DOWN_REDIS}")
    """)
    write("results_down", f"""
        import uuid
        from runtime import Runtime
        rt = Runtime("{AMQP_URL}", results="{DOWN_REDIS}",
                     namespace="cli-ops-" + uuid.uuid4().hex[:8])
    """)
    write("bad_url", """
        from runtime import Runtime
        rt = Runtime("nosuch://somewhere")
    """)
    write("raises_at_import", """
        from runtime import Runtime
        rt = Runtime()
        settings = undefined_name
    """)
    return tmp_path


def taskloom(cwd: Path, *args: str) -> tuple[int, list[str], str]:
    """Run ``taskloom ARGS`` in ``cwd``: exit code, non-empty stderr lines, stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKLOOM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    # a generous bound: a refused connection fails at once, but the machine is shared
    done = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, [ln for ln in done.stderr.splitlines() if ln.strip()], done.stdout


def assert_one_line(code: int, lines: list[str], *expected: str,
                    exit_codes: tuple[int, ...] = (EXIT_CONFIG,)) -> None:
    text = "\n".join(lines)
    assert "Traceback" not in text, text
    assert code in exit_codes, text
    assert len(lines) == 1, text
    for part in expected:
        assert part in lines[0], text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_broker_that_is_down_is_one_line_and_exit_1(apps: Path, command: str) -> None:
    code, lines, _ = taskloom(apps, command, "redis_down:rt", *COMMANDS[command])
    assert_one_line(code, lines, "could not connect to Redis", "127.0.0.1:1",
                    "check the URL and that redis-server is running",
                    exit_codes=UNREACHABLE.get(command, (EXIT_CONFIG,)))
    if command != "worker":
        assert lines[0].split("] ", 1)[1].startswith(f"taskloom {command}: "), lines[0]


@pytest.mark.parametrize("command", ["status", "worker"])
def test_rabbitmq_down_is_one_line_without_the_password(apps: Path, command: str) -> None:
    code, lines, _ = taskloom(apps, command, "amqp_down:rt", *COMMANDS[command])
    assert_one_line(code, lines, "could not connect to RabbitMQ", "guest:***@",
                    exit_codes=UNREACHABLE.get(command, (EXIT_CONFIG,)))
    assert "s3cret-pw" not in lines[0]


@pytest.mark.amqp
def test_a_result_store_that_is_down_is_one_line(apps: Path) -> None:
    code, lines, _ = taskloom(apps, "status", "results_down:rt")
    assert_one_line(code, lines, "taskloom status", "Connection refused", "check")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_app_that_cannot_be_imported_is_one_line_and_exit_1(apps: Path, command: str) -> None:
    code, lines, _ = taskloom(apps, command, "no_such_module:rt", *COMMANDS[command])
    assert_one_line(code, lines, "cannot load the application", "cannot import 'no_such_module'",
                    "run from the directory that holds the package")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_app_with_a_bad_broker_url_is_one_line_and_exit_1(apps: Path, command: str) -> None:
    code, lines, _ = taskloom(apps, command, "bad_url:rt", *COMMANDS[command])
    assert_one_line(code, lines, "cannot load the application", "'nosuch'", "use one of")


def test_an_app_that_raises_at_import_says_where(apps: Path) -> None:
    code, lines, _ = taskloom(apps, "status", "raises_at_import:rt")
    assert_one_line(code, lines, "NameError", "undefined_name", "raises_at_import.py:4",
                    "--log-level DEBUG")
    # the traceback is there for whoever asks for it
    code, lines, _ = taskloom(apps, "--log-level", "DEBUG", "status", "raises_at_import:rt")
    assert code == 1 and any("Traceback" in ln for ln in lines)


def test_a_malformed_app_spec_is_one_line(apps: Path) -> None:
    code, lines, _ = taskloom(apps, "status", "no_colon_here")
    assert_one_line(code, lines, "expected the application as module:attribute")


@pytest.mark.parametrize("url,expected", [
    (DOWN_REDIS, "could not connect to Redis"),
    ("nosuch://somewhere", "no broker handles the URL scheme 'nosuch'"),
])
def test_the_demo_on_a_broker_it_cannot_use_is_one_line(apps: Path, url: str,
                                                        expected: str) -> None:
    code, lines, _ = taskloom(apps, "demo", "--broker", url)
    assert_one_line(code, lines, "taskloom demo", expected)
